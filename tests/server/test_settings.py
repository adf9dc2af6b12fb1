"""Settings come from flags and SOFTDIMO_* variables; bad values stop `softdimo serve` with one clear line."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.cli import ENVIRONMENT_ONLY
from server.settings import Settings, shown_default


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
        [sys.executable, "-m", "server.cli", "serve", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "invalid settings" in run.stderr and fragment in run.stderr and "Traceback" not in run.stderr


def test_runtime_options_reach_every_served_model_and_bf16_serves(tiny_bundles, monkeypatch):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from softdimo.runtime import RuntimeSettings

    monkeypatch.setenv("SOFTDIMO_PRECISION", "bf16")
    monkeypatch.setenv("SOFTDIMO_PIN_MEMORY", "true")
    settings = Settings(
        weights=[str(tiny_bundles["one-step"]), str(tiny_bundles["text"])], device="cpu", max_batch_size=2
    )
    assert settings.runtime() == RuntimeSettings(precision="bf16", pin_memory=True) and Settings().compile is False
    with TestClient(create_app(settings)) as client:  # runs the lifespan: load, warm up, serve
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        engine = client.app.state.service.engine
        assert {model.runtime.settings for model in engine.models.values()} == {settings.runtime()}
        for model in ("tiny-one-step", "tiny-text"):
            assert client.post("/generate", json={"prompt": "a red circle", "model": model, "n": 3}).status_code == 200
    with pytest.raises(ValueError, match="precision"):
        Settings(precision="fp16")


def test_refine_chunk_is_as_set_else_one_image_on_a_cpu_and_whole_batches_on_a_gpu():
    assert Settings().refine_chunk_on("cpu") == 1 and Settings().refine_chunk_on("cuda") is None
    assert Settings(refine_chunk=4).refine_chunk_on("cpu") == Settings(refine_chunk=4).refine_chunk_on("cuda") == 4
    with pytest.raises(ValueError, match="refine_chunk"):
        Settings(refine_chunk=0)


def _readme_flag_rows() -> list[list[str]]:
    """The cells of README's `softdimo serve` flag table, backticks removed."""
    lines = (Path(__file__).parents[2] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("`softdimo serve` takes flags")) + 4
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("`", "") for cell in line.strip("|").split(" | ")])
    return rows


def test_readme_flag_table_states_every_setting_with_its_default():
    rows = {flag.removeprefix("--").replace("-", "_"): (env, default) for flag, env, default, _ in _readme_flag_rows()}
    # every setting but the secrets, which come from the environment only
    assert sorted(rows) == sorted(name for name in Settings.model_fields if name not in ENVIRONMENT_ONLY)
    for name, (env, default) in rows.items():
        assert env.split(" ")[0] == "SOFTDIMO_" + name.upper() and default == shown_default(name), name


def test_serve_help_states_every_default(monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    entries = [" ".join(entry.split()) for entry in capsys.readouterr().out.split("\n  --")[1:]]  # one per flag
    for name in Settings.model_fields.keys() - set(ENVIRONMENT_ONLY):
        flag, default = name.replace("_", "-"), f"(default: {shown_default(name)})"
        assert any(e.split()[0].rstrip(",") == flag and e.endswith(default) for e in entries), name
