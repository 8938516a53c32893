"""Imports only point down the layer list of STYLE.md §2; no module imports one above it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "windtunnel"

# Lower number = lower layer. A module may import modules of a strictly lower layer (or its own
# subpackage's private helpers). Subpackages are one layer each.
LAYERS = {
    "_checks": 0,
    "_progress": 0,
    "hooks": 1,
    "runs": 1,
    "paper_numbers": 1,
    "dynamics": 2,
    "tasks": 2,
    "metrics": 2,
    "geometry": 2,
    "attention": 3,
    "telemetry": 3,
    "models": 4,
    "sites": 4,
    "probes": 5,
    "arms": 5,
    "train": 6,
    "presets": 7,
    "replicas": 7,
    "experiments": 8,
    "reports": 2,
    "comparison": 2,
    "cli": 9,
    "__main__": 10,
}


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, path


def _internal_imports(path: Path, name: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("windtunnel"):
                    yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("windtunnel"):
                yield node.module


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: str(x))
def test_imports_point_down(name, path):
    if name == "windtunnel":
        return
    own = _layer_of(name)
    assert own in LAYERS, f"{name}: add its layer to LAYERS in tests/test_layering.py"
    for imported in _internal_imports(path, name):
        if imported == "windtunnel":
            assert own == "cli", f"{name} imports the package root; import the module instead"
            continue
        other = _layer_of(imported)
        assert other in LAYERS, f"{name} imports unknown module {imported}"
        if other == own:
            continue
        assert LAYERS[other] < LAYERS[own], (
            f"{name} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[other]}): "
            "imports must point down the layer list"
        )
