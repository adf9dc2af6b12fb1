"""Bundles round-trip exactly and refuse anything altered, missing or unlisted."""

import json

import pytest
import torch

from softdimo.bundle import BundleError, read_bundle, save_bundle


def _state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g), "ids": torch.arange(5)}


def test_round_trip_is_exact(tmp_path):
    state = _state()
    save_bundle(tmp_path / "b", {"name": "x", "kind": "tokenizer"}, {"model": state}, dtype=None)
    bundle = read_bundle(tmp_path / "b")
    assert bundle.config == {"name": "x", "kind": "tokenizer"}
    loaded = bundle.weights("model")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["ids"], state["ids"])


def test_fp16_storage_loads_as_float32(tmp_path):
    save_bundle(tmp_path / "b", {"name": "x"}, {"model": _state()})
    loaded = read_bundle(tmp_path / "b").weights("model")
    assert loaded["w"].dtype == torch.float32
    assert torch.equal(loaded["w"], _state()["w"].half().float())


def test_checksum_mismatch_is_refused(tmp_path):
    save_bundle(tmp_path / "b", {"name": "x"}, {"model": _state()})
    path = tmp_path / "b" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for model.safetensors"):
        read_bundle(tmp_path / "b")


def test_edited_config_missing_file_and_unlisted_file_are_refused(tmp_path):
    save_bundle(tmp_path / "b", {"name": "x"}, {"model": _state()})
    config = tmp_path / "b" / "config.json"
    config.write_text(json.dumps({"name": "y"}))
    with pytest.raises(BundleError, match="config.json"):
        read_bundle(tmp_path / "b")

    save_bundle(tmp_path / "c", {"name": "x"}, {"model": _state()})
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_bundle(tmp_path / "c")

    save_bundle(tmp_path / "d", {"name": "x"}, {"model": _state()})
    (tmp_path / "d" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match="not in the manifest"):
        read_bundle(tmp_path / "d")

    with pytest.raises(BundleError, match="no manifest.json"):
        (tmp_path / "e").mkdir()
        read_bundle(tmp_path / "e")


def test_pickles_are_never_loaded(tmp_path):
    save_bundle(tmp_path / "b", {"name": "x"}, {"model": _state()})
    torch.save(_state(), tmp_path / "b" / "model.safetensors")  # a pickle under a safetensors name
    with pytest.raises(BundleError):
        read_bundle(tmp_path / "b")
