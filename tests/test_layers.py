"""No package imports a package above it: the layer order documented in specmoe/__init__.py, checked on every
import statement (function-level ones included) with ast."""

import ast
import sys
from pathlib import Path

import specmoe

ROOT = Path(__file__).resolve().parents[1] / "specmoe"

# bottom first; packages in one layer may not import each other
LAYERS = [
    {"io", "geometry", "hub", "_version"},
    {"measure"},
    {"kernels", "predictors"},
    {"runtime"},
    {"traces"},
    {"training", "sim"},
    {"reference"},
    {"bench"},
    {"serve"},
    {"(app)"},  # specmoe.cli, specmoe.generate, specmoe.__main__, specmoe/__init__ (the public API), every <package>.cli
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit(module: str) -> str:
    """The layer unit of a dotted module name under specmoe."""
    parts = module.split(".")
    if len(parts) == 1 or parts[-1] in ("cli", "__main__") or module == "specmoe.generate":
        return "(app)"
    return parts[1]


def imports(path: Path, module: str, is_package: bool):
    """(imported module, line) for every import of a specmoe module in `path`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "specmoe")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module.split(".")[0] == "specmoe":
                    yield node.module, node.lineno
                continue
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            if node.module:
                yield ".".join(base + [node.module]), node.lineno
            else:
                yield from ((".".join(base + [a.name]), node.lineno) for a in node.names)


def violations():
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        src = unit(module)
        assert src in RANK, f"{module}: package {src!r} is in no layer; add it to LAYERS and specmoe/__init__.py"
        for target, line in imports(path, module, is_package):
            if target == "specmoe":
                dst = "(app)"
            else:
                dst = unit(target) if target.split(".")[-1] not in ("cli", "__main__") else "(app)"
                # `from ..x import name` may name a module or an object; the unit is the package either way
            if dst not in RANK:
                continue
            if src != dst and RANK[dst] >= RANK[src]:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: {src} imports {target} ({dst}, not below it)")
    return out


def test_no_package_imports_a_package_above_it():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check is not vacuous: an upward import written into a copy of a leaf module is found."""
    fake = tmp_path / "specmoe"
    (fake / "measure").mkdir(parents=True)
    (fake / "measure" / "__init__.py").write_text("from ..runtime.wrapper import SpeculativeMoE\n")
    (fake / "runtime").mkdir()
    (fake / "runtime" / "__init__.py").write_text("def f():\n    from ..measure import timing\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert [v.split(": ", 1)[1] for v in violations()] == [
        "measure imports specmoe.runtime.wrapper (runtime, not below it)"]


def test_layers_are_documented():
    doc = " ".join(specmoe.__doc__.split())
    assert "measure < kernels, predictors < runtime < traces < training, sim < reference < bench" in doc
