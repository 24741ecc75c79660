"""Layer direction (DESIGN.md section 5, docs/architecture.md): no module imports a higher layer, nothing inside
imports the package's ``__init__``, and the package's modules import each other without cycles. Read from the
source (every import statement, lazy ones inside functions included), so nothing has to be importable."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "splitveil"

# lower number = lower layer; a module may import its own layer's packages and lower ones
LAYERS = {
    "version": 0, "utils": 0, "params": 0, "registry": 0,
    "yaml_io": 0, "runtime": 0, "lifeline": 0, "references": 0,   # safe YAML, allocator, worker lifeline, name:function
    "tracking": 1,                                                 # run loggers (TensorBoard, MLflow): beside results
    "results": 1,
    "data": 2, "models": 2, "metrics": 2, "precision": 2,
    "defenses": 3, "attacks": 3, "training": 3,
    "experiments": 4,
    "report": 5,
    "commands": 6, "cli": 7, "__main__": 8,
}

# imports that break the rule today, each with its reason; the test fails when one is no longer there (then drop
# it from this list), so the list only shrinks
KNOWN_EXCEPTIONS: dict = {
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every ``splitveil`` import in ``path`` (``from . import x`` gives the
    package and, when ``x`` is a submodule, ``package.x``)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "splitveil"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "splitveil":
                continue
            found = False
            for a in node.names:
                sub = f"{target}.{a.name}"
                if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or \
                        (PKG.parent / sub.replace(".", "/") / "__init__.py").exists():
                    out.append((node.lineno, sub))
                    found = True
            if not found:
                out.append((node.lineno, target))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "import_submodules"
              and path.name == "__init__.py"):
            # registry.import_submodules(__name__): the package imports every public module in its folder
            out += [(node.lineno, f"{mod}.{p.stem}") for p in sorted(path.parent.glob("*.py"))
                    if not p.stem.startswith("_")]
    return out


def layer_of(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = sorted(p for p in PKG.rglob("*.py"))


def test_every_top_level_module_has_a_layer():
    tops = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert tops <= set(LAYERS), f"no layer for {sorted(tops - set(LAYERS))}: add it to LAYERS (and the docs)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_import_of_a_higher_layer_or_of_the_package_init(path):
    mod = module_name(path)
    if mod == "splitveil":
        return
    own = layer_of(mod)
    bad = []
    for line, target in imports_of(path):
        if target == "splitveil":
            bad.append(f"line {line}: imports the package __init__ (import the module that defines the name)")
            continue
        other = layer_of(target)
        if (mod, target) in KNOWN_EXCEPTIONS:
            continue
        if own is not None and other is not None and other > own:
            bad.append(f"line {line}: {mod} (layer {own}) imports {target} (layer {other})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    """Cycles between the package's modules (a package counts as its __init__ plus every module below it that
    it imports); lazy imports inside functions count too: a cycle hidden behind one is still a cycle."""
    graph: dict[str, set[str]] = {}
    for p in MODULES:
        mod = module_name(p)
        targets = set()
        for _, t in imports_of(p):
            if (mod, t) in KNOWN_EXCEPTIONS:
                continue
            parts = t.split(".")
            # importing splitveil.a.b runs splitveil.a's __init__ first: an edge to every package on the way
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[mod] = targets - {mod, "splitveil"}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                # a package importing its own submodules (``from .x import y`` in __init__) is not a cycle unless
                # the submodule imports back into the package's __init__ through a path that leaves the package
                cyc = stack[stack.index(n):] + [n]
                if not _within_package_reexport(cyc):
                    cycles.append(cyc)
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _within_package_reexport(cycle: list[str]) -> bool:
    """``pkg`` (its __init__) -> ``pkg.a`` -> ... -> ``pkg``: every submodule of a package that imports a sibling
    through ``from . import`` or ``from .. x import`` runs the package __init__ first, which Python allows while
    the package is initialising only if nothing in the cycle leaves the package. Such a cycle stays inside one
    package and is the ordinary re-export pattern, not a layer cycle."""
    top = {m.split(".")[1] if "." in m else m for m in cycle}
    return len(top) == 1


def test_known_exceptions_are_still_there():
    """An exception that was fixed must leave KNOWN_EXCEPTIONS (so the list never hides a new upward import)."""
    found = {(module_name(p), t) for p in MODULES for _, t in imports_of(p)}
    gone = [k for k in KNOWN_EXCEPTIONS if k not in found]
    assert not gone, f"fixed, remove from KNOWN_EXCEPTIONS: {gone}"


def test_the_checker_sees_lazy_relative_and_package_imports(tmp_path):
    """The checker itself: a lazy relative import of a higher layer and ``from .. import name`` are found."""
    pkg = tmp_path / "splitveil"
    (pkg / "metrics").mkdir(parents=True)
    (pkg / "report").mkdir()
    for f in ("__init__.py", "metrics/__init__.py", "report/__init__.py", "report/tables.py"):
        (pkg / f).write_text("")
    bad = pkg / "metrics" / "cost.py"
    bad.write_text("from .. import __version__\ndef f():\n    from ..report.tables import x\n")
    global PKG
    saved, PKG = PKG, pkg
    try:
        assert imports_of(bad) == [(1, "splitveil"), (3, "splitveil.report.tables")]
        with pytest.raises(AssertionError, match="package __init__"):
            test_no_import_of_a_higher_layer_or_of_the_package_init(bad)
        bad.write_text("def f():\n    from ..report.tables import x\n")
        with pytest.raises(AssertionError, match=r"metrics.cost \(layer 2\) imports splitveil.report.tables \(layer 5\)"):
            test_no_import_of_a_higher_layer_or_of_the_package_init(bad)
    finally:
        PKG = saved
