"""Packages depend one way (ARCHITECTURE.md): a module imports only from lower layers or its own package, and never
inside a function (where an upward import would hide). Read from the source with ast, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {  # package -> layer; a package may import from strictly lower layers only
    "flexdemo": 0, "flexmore.atomic": 0, "flexmore.distributed": 0,
    "flexmore.model": 1, "flexmore.data": 1,
    "flexmore.parallel": 2,
    "flexmore.config": 3, "flexmore.store": 3,
    "flexmore.eval": 4,
    "flexmore.train": 5,
    "flexmore.experts": 6,
    "flexmore.study": 7,
    "flexmore.cli": 8,
    "flexmore": 9,  # the package's own __init__
}


def package_of(module: str) -> str:
    parts = module.split(".")
    pkg = "flexdemo" if parts[0] == "flexdemo" else ".".join(parts[:2])
    if pkg not in LAYERS:
        raise KeyError(f"module {module} is in no layer: add its package to LAYERS in tests/test_layers.py")
    return pkg


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function or class) for every import of flexmore / flexdemo."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, node.lineno, id(node) not in top) for n in names if n.split(".")[0] in ("flexmore", "flexdemo")]
    return found


def check(path: Path, module: str) -> list[str]:
    out = []
    here = package_of(module)
    for target, line, hidden in imports(path):
        there = package_of(target)
        where = f"{module} ({path.name}:{line}) imports {target}"
        if there == here:
            continue
        if hidden:
            out.append(f"{where} inside a function (hoist it to the top of the module)")
        if LAYERS[there] >= LAYERS[here]:
            out.append(f"{where}: {here} (layer {LAYERS[here]}) may not depend on {there} (layer {LAYERS[there]})")
    return out


def test_no_import_runs_upwards_or_hides_in_a_function():
    paths = sorted([*REPO.glob("flexmore/**/*.py"), *REPO.glob("flexdemo/**/*.py")])
    assert len(paths) > 60
    assert [v for p in paths for v in check(p, module_name(p))] == []


def test_the_check_catches_an_upward_and_a_hidden_import(tmp_path):
    bad = tmp_path / "_layer_probe.py"
    bad.write_text("from flexmore.model import build_model\n\ndef f():\n    from flexmore.train.loop import train\n")
    found = check(bad, "flexmore.data._layer_probe")
    assert len(found) == 3
    assert any("_layer_probe.py:1" in v and "flexmore.data (layer 1) may not depend on flexmore.model" in v for v in found)
    assert any("_layer_probe.py:4" in v and "inside a function" in v for v in found)
    assert any("_layer_probe.py:4" in v and "may not depend on flexmore.train" in v for v in found)
    with pytest.raises(KeyError, match="in no layer"):
        package_of("flexmore.newthing.x")
