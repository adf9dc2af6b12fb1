"""A server refuses to start on a bundle that fails verification: `softdimo serve` exits non-zero with one clear line,
and an app built in code stays unready, saying why on /readyz."""

import asyncio
import shutil
import subprocess
import sys

import pytest
from benchmarks.running import free_port

from server.engine import verify_bundles
from server.metrics import Metrics
from server.service import Service
from server.settings import Settings
from softdimo.bundle import BundleError


@pytest.fixture
def copied(tiny_bundles, tmp_path):
    """A private copy of the tiny bundles (they reference each other by relative paths), safe to damage."""
    root = tmp_path / "bundles"
    shutil.copytree(tiny_bundles["text"].parent, root)
    return root


def _serve(*weights) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--weights",
        *map(str, weights),
        "--device",
        "cpu",
        "--port",
        str(free_port()),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_serve_refuses_an_altered_file_with_one_clear_line(copied):
    _flip_a_byte(copied / "teacher-text" / "transformer.safetensors")
    done = _serve(copied / "teacher-class", copied / "teacher-text")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "teacher-text" in done.stderr and "checksum mismatch for transformer.safetensors" in done.stderr


def test_serve_refuses_a_missing_file_in_a_referenced_bundle(copied):
    (copied / "tokenizer" / "tokenizer.safetensors").unlink()
    done = _serve(copied / "teacher-text")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "tokenizer" in done.stderr and "tokenizer.safetensors is listed in the manifest but missing" in done.stderr


def test_verification_follows_references_to_tokenizers_and_rewards(copied):
    verify_bundles([copied / "one-step-text", copied / "teacher-text"])  # intact: passes
    _flip_a_byte(copied / "reward" / "reward.safetensors")
    with pytest.raises(BundleError, match="reward.*checksum mismatch for reward.safetensors"):
        verify_bundles([copied / "one-step-text"])
    verify_bundles([copied / "teacher-text"])  # does not reference the reward
    with pytest.raises(BundleError, match="no bundles to serve"):
        verify_bundles([])


def test_an_app_built_in_code_stays_unready_and_says_why(copied):
    _flip_a_byte(copied / "teacher-text" / "config.json")
    service = Service(Settings(weights=[str(copied / "teacher-text")], device="cpu"), Metrics())
    with pytest.raises(BundleError):
        asyncio.run(service.start())
    assert (
        not service.ready
        and service.load_error.startswith("BundleError:")
        and "checksum mismatch for config.json" in service.load_error
    )
