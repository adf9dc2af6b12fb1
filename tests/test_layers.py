"""Layers point one way: `server` uses `softdimo`; the model library never imports the server or web packages."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic_settings")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_softdimo_module_imports_the_server_or_web_packages():
    offenders = {
        str(path.relative_to(ROOT)): sorted(names & {"server", *WEB})
        for path in sorted((ROOT / "softdimo").rglob("*.py"))
        if (names := _imports(path)) & {"server", *WEB}
    }
    assert offenders == {}


def test_the_library_and_its_command_load_without_web_packages():
    code = (
        "import sys, softdimo.cli, softdimo.pipeline, softdimo.train.recipe, softdimo.report; "
        "softdimo.cli.build_parser(); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WEB!r} or m.split('.')[0] == 'server'))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert loaded == "[]"
