"""The package's import graph runs one way, layer by layer (docs/ARCHITECTURE.md): no module imports
from a layer above its own, no import circles (imports inside functions count), and no module
imports another module's underscore names. Read from the source with `ast`, nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "zeus_ray"

# Bottom to top: a module may import from its own layer and the layers before it.
LAYERS = ["errors", "config", "storage", "maps", "truth", "slides", "cohort_input", "prompts", "encoders",
          "results", "engine", "studio", "doctor", "commands cli __main__", "demo"]
RANK = {name: i for i, group in enumerate(LAYERS) for name in group.split()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported zeus_ray module, names taken from it, line) for every import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "zeus_ray"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "zeus_ray":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            out += [(m, [], node.lineno) for m in submodules]
            out.append((target, [n for n in names if f"{target}.{n}" not in mods], node.lineno))
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in imports(path, mods):
            if target in mods and target != m and not m.startswith(target + "."):
                edges[m].add(target)
    return edges


def test_every_module_has_a_layer():
    unknown = sorted({layer(m) for m in modules()} - set(RANK) - {"__init__"})
    assert not unknown, f"add these folders/modules to LAYERS (and to docs/ARCHITECTURE.md): {unknown}"


def test_no_upward_imports():
    mods = modules()
    bad = []
    for m, path in mods.items():
        if m == "zeus_ray":
            continue
        for target, _, line in imports(path, mods):
            if target != "zeus_ray" and RANK[layer(target)] > RANK[layer(m)]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} {layer(m)} imports {target} ({layer(target)} is above it)")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_no_private_names_across_modules():
    mods = modules()
    bad = [f"{path.relative_to(PKG.parent)}:{line} takes {private} from {target}"
           for m, path in mods.items() for target, names, line in imports(path, mods)
           if target != m and (private := [n for n in names if n.startswith("_")])]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("bad_source, what", [
    ("from ..engine.driver import run_cohort\n", "upward"),
    ("from .. import engine\n", "upward"),
    ("from .keys import _private\n", "private"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, bad_source, what):
    """The checks above fail on a planted violation (so they are not vacuous)."""
    pkg = tmp_path / "zeus_ray"
    for sub in ("storage", "engine"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "storage" / "keys.py").write_text("_private = 1\n")
    (pkg / "engine" / "driver.py").write_text("run_cohort = 1\n")
    (pkg / "storage" / "store.py").write_text(bad_source)
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    check = test_no_upward_imports if what == "upward" else test_no_private_names_across_modules
    with pytest.raises(AssertionError):
        check()


def test_the_circle_check_catches_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "zeus_ray"
    (pkg / "results").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "results" / "__init__.py").write_text("")
    (pkg / "results" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "results" / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    with pytest.raises(AssertionError, match="circles"):
        test_no_import_circles()
