"""Layers point one way (tooling over the service over the library, each module only down), with no import circle."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic_settings")
# Highest first. A module belongs to the layer of the longest prefix that names it, and may import modules of its
# own layer or a lower one, never a higher one.
LAYERS = (
    ("tooling", ("benchmarks",)),  # benchmarks, load and soak clients, the peer server, the installed command
    ("service", ("server",)),  # the HTTP service: what runs in production
    ("command", ("softdimo.cli",)),  # the library's `softdimo` commands
    (
        "measurement",
        ("softdimo.evaluation", "softdimo.edit_evaluation", "softdimo.bench"),
    ),  # evaluations, offline benchmark
    ("training", ("softdimo.train",)),  # one module per stage, their loop and recipes
    ("pipelines", ("softdimo.pipeline", "softdimo.warmup")),  # loaded parts composed into models that run
    ("parts", ("softdimo",)),  # the model's parts and the helpers under them
)
PACKAGES = tuple(sorted({prefix.split(".")[0] for _, prefixes in LAYERS for prefix in prefixes}))


def _module_files() -> dict[str, Path]:
    """Every project module by its dotted name (a package by its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _project_module(name: str) -> str | None:
    """The project module `name` imports: itself, else its longest dotted prefix that is one (a namespace package
    holds no code, so importing from it reaches its modules or nothing); None outside the project."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(module: str, path: Path) -> set[str]:
    """Dotted names `module` imports anywhere in its code, module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level` steps up
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from package import module` imports the module, else a name of `base`
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return names


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the other project modules it imports."""
    graph = {}
    for module, path in MODULES.items():
        imported = {_project_module(name) for name in _imported_names(module, path)}
        graph[module] = {target for target in imported if target is not None and target != module}
    return graph


def layer_of(module: str) -> int:
    """The module's layer, 0 the highest: the layer of the longest prefix that names it."""
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer of LAYERS"
    return max(matches)[1]


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import one another, directly or through others (Tarjan's strongly connected
    components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def _importers(graph: dict[str, set[str]], package: str, forbidden: set[str]) -> dict[str, list[str]]:
    """Modules of `package` that import a module of a `forbidden` package, with what they import from it."""
    found = {}
    for module, targets in sorted(graph.items()):
        if module.split(".")[0] == package:
            bad = sorted(target for target in targets if target.split(".")[0] in forbidden)
            if bad:
                found[module] = bad
    return found


def test_the_layers_name_every_package_the_project_ships():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert shipped == set(PACKAGES)


def test_the_service_never_imports_the_tooling():
    assert _importers(import_graph(), "server", {"benchmarks"}) == {}


def test_the_library_never_imports_the_service_or_the_tooling():
    assert _importers(import_graph(), "softdimo", {"server", "benchmarks"}) == {}


def test_no_module_imports_a_higher_layer():
    upward = {}
    for module, targets in sorted(import_graph().items()):
        higher = [target for target in sorted(targets) if layer_of(target) < layer_of(module)]
        if higher:
            upward[f"{module} ({LAYERS[layer_of(module)][0]})"] = [f"{t} ({LAYERS[layer_of(t)][0]})" for t in higher]
    assert upward == {}


def test_no_modules_import_one_another():
    assert import_circles(import_graph()) == []


def test_the_checks_see_lazy_imports_and_circles():
    """The checks above read imports inside functions too, and find a circle through a third module."""
    graph = import_graph()
    assert "softdimo.train.recipe" in graph["softdimo.cli"]  # imported inside cli's `_train` only
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_softdimo_module_imports_web_packages():
    offenders = {}
    for module, path in MODULES.items():
        if module.split(".")[0] == "softdimo":
            web = {name.split(".")[0] for name in _imported_names(module, path)} & set(WEB)
            if web:
                offenders[module] = sorted(web)
    assert offenders == {}


def _loaded_after(code: str, packages: tuple[str, ...]) -> str:
    """The modules of `packages` that running `code` in a fresh interpreter leaves loaded."""
    probe = f"{code}; print(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.strip()


def test_the_library_and_its_command_load_without_web_packages():
    code = (
        "import sys, softdimo.cli, softdimo.pipeline, softdimo.train.recipe, softdimo.evaluation; "
        "softdimo.cli.build_parser()"
    )
    assert _loaded_after(code, (*WEB, "server", "benchmarks")) == "[]"


def test_the_service_and_its_command_load_without_the_tooling():
    code = "import sys, server.app, server.cli, softdimo.cli; softdimo.cli.build_parser(server.cli.register)"
    assert _loaded_after(code, ("benchmarks",)) == "[]"
