"""The package as a whole: the notebook API names what it says, and the layers import downwards only."""

import ast
import subprocess
import sys
from pathlib import Path


def test_exported_functions_are_not_replaced_by_their_modules():
    # Importing a module binds it to its package's attribute of the same name: zfnet's exported names must
    # still be the functions (zfnet.mine, zfnet.project, ...) after the modules that use them are loaded.
    code = ("import types, zfnet.understanding.atlas, zfnet.understanding.correspondence, zfnet\n"
            "bad = [n for n in zfnet.__all__ if isinstance(getattr(zfnet, n), types.ModuleType)]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------------
# The layering: each subpackage imports only those below it, and no module imports itself back.
PACKAGE = Path(__file__).resolve().parents[1] / "zfnet"
RANK = {"core": 0, "data": 1, "models": 2, "inspect": 3, "engine": 4, "present": 4, "understanding": 5,
        "training": 5, "generalization": 5, "cs231n": 5, "report": 6, "cli": 7}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is named by its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("zfnet",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import checkpoints` imports a module, `from .x import f` a name
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_subpackage_has_a_rank():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(RANK)


def test_imports_point_down_only():
    upward = []
    for module, targets in _graph().items():
        layer = _layer(module)
        if layer is None:  # zfnet/__init__.py and __main__.py sit on top of everything
            continue
        for t in sorted(targets):
            other = _layer(t)
            if other is None or (other != layer and RANK[other] >= RANK[layer]):
                upward.append(f"{module} -> {t}")
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, [" -> ".join(c) for c in cycles]
