"""Settings come from flags and SOFTDIMO_* variables; bad values stop `softdimo serve` with one clear line."""

import os
import subprocess
import sys

import pytest

from server.settings import Settings


def test_environment_and_lists(monkeypatch):
    monkeypatch.setenv("SOFTDIMO_WEIGHTS", "a, b")
    monkeypatch.setenv("SOFTDIMO_MAX_BATCH_SIZE", "8")
    settings = Settings()
    assert settings.weights == ["a", "b"] and settings.max_batch_size == 8 and settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    "args,env,fragment",
    [(["--max-batch-size", "0"], {}, "max_batch_size"), ([], {"SOFTDIMO_MAX_QUEUE": "lots"}, "max_queue")],
)
def test_invalid_settings_exit_with_one_line(args, env, fragment):
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "invalid settings" in run.stderr and fragment in run.stderr and "Traceback" not in run.stderr
