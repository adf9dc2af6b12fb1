"""Model bundles: a folder of config.json, safetensors files and manifest.json with each file's sha256."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
CONFIG = "config.json"


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete, altered or not a bundle at all."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(
    path: str | os.PathLike,
    config: dict,
    weights: dict[str, dict[str, torch.Tensor]],
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write a bundle: `weights` maps a file stem (e.g. "transformer") to its state dict.

    Floating tensors are stored as `dtype` (fp16 by default, None keeps them as they are)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    files = {}
    for stem, state in weights.items():
        name = f"{stem}.safetensors"
        tensors = {
            k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state.items()
        }
        save_file(tensors, folder / name)
        files[name] = sha256(folder / name)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    files[CONFIG] = sha256(folder / CONFIG)
    (folder / MANIFEST).write_text(json.dumps({"sha256": dict(sorted(files.items()))}, indent=2) + "\n")
    return folder


def seal_folder(path: str | os.PathLike, config: dict) -> Path:
    """Make a bundle of a folder that keeps its weights in a layout of its own (e.g. the one diffusers writes):
    write config.json, then a manifest with the sha256 of every file under the folder, subfolders included."""
    folder = Path(path)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    files = {}
    for file in sorted(folder.rglob("*")):
        name = file.relative_to(folder).as_posix()
        if file.is_file() and name != MANIFEST and not any(part.startswith(".") for part in name.split("/")):
            files[name] = sha256(file)
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its folder and parsed config."""

    path: Path
    config: dict

    def weights(self, stem: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """A state dict by file stem, floating tensors cast to `dtype`."""
        file = self.path / f"{stem}.safetensors"
        if not file.exists():
            raise BundleError(f"{self.path}: no weights file {file.name}")
        state = load_file(file)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    def resolve(self, reference: str) -> Bundle:
        """Another bundle named by a path relative to this one (bundles share a tokenizer this way)."""
        return read_bundle(self.path / reference)


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle after checking that every file is listed in the manifest with a matching sha256."""
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{folder}: no {MANIFEST}; a bundle lists the sha256 of each of its files")
    try:
        listed = json.loads(manifest_path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    weights_unlisted = sorted(n for n in present - set(listed) if n.endswith((".safetensors", ".json")))
    if weights_unlisted:
        raise BundleError(f"{folder}: files not in the manifest: {', '.join(weights_unlisted)}")
    for name, expected in listed.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{folder}: {name} is listed in the manifest but missing")
        if sha256(file) != expected:
            raise BundleError(f"{folder}: checksum mismatch for {name}; the file was altered or corrupted")
    if CONFIG not in listed:
        raise BundleError(f"{folder}: the manifest lists no {CONFIG}")
    return Bundle(path=folder, config=json.loads((folder / CONFIG).read_text()))
