"""The package graph points one way (docs/architecture.md):

    cli -> demo -> train -> {eval, checkpoint, data, curate, tokenizer, model, estimate/flops} -> runtime
                                                                        -> config, errors, utils

Checked on the source with an AST walk that includes imports inside functions (lazy imports hide cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cpt_megatron"

# package (first component under cpt_megatron) -> packages it must never import
FORBIDDEN = {
    "curate": {"model", "train", "eval", "checkpoint", "cli", "demo"},
    "tokenizer": {"model", "train", "eval", "checkpoint", "curate", "cli", "demo"},
    "data": {"model", "train", "eval", "checkpoint", "curate", "cli", "demo"},
    "model": {"train", "eval", "checkpoint", "data", "curate", "cli", "demo", "estimate", "flops"},
    "checkpoint": {"train", "eval", "cli", "demo"},
    "eval": {"train", "cli", "demo"},
    "flops": {"train", "eval", "checkpoint", "data", "curate", "cli", "demo", "estimate"},
    "estimate": {"train", "eval", "checkpoint", "data", "curate", "cli", "demo"},
    "runtime": {"train", "eval", "checkpoint", "data", "curate", "tokenizer", "model", "cli", "demo", "estimate",
                "flops"},
    "train": {"cli", "demo"},
    "demo": {"cli"},
}
LEAVES = {"config": {"errors"}, "errors": set(), "utils": {"errors"}}
"""Type/helper modules: may import only these cpt_megatron modules (config holds types only)."""


def imports_of(root: Path) -> list[tuple[str, str, int, str]]:
    """(importing package, imported package, line, file) for every cpt_megatron import, at any depth."""
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("").parts
        src = rel[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] if node.module != root.name else [f"{root.name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{f}:{node.lineno}: use absolute imports (cpt_megatron....)")
            for n in names:
                parts = n.split(".")
                if parts[0] == root.name and len(parts) > 1:
                    out.append((src, parts[1], node.lineno, str(f.relative_to(root.parent))))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for src, dst, line, where in imports_of(root):
        if src == dst or src in ("__init__", "__main__"):
            continue
        if dst == "cli":
            bad.append(f"{where}:{line}: imports cli/ (nothing may)")
        elif src in LEAVES and dst not in LEAVES[src]:
            bad.append(f"{where}:{line}: {src} may import only {sorted(LEAVES[src]) or 'nothing'}, imports {dst}")
        elif dst in FORBIDDEN.get(src, ()):
            bad.append(f"{where}:{line}: {src}/ must not import {dst}/")
    return bad


def private_reaches(root: Path) -> list[str]:
    """`from cpt_megatron.X.m import _name` (or `.m._name` access) from another package: use a public name."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        src = f.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{root.name}."):
                dst = node.module.split(".")[1]
                for a in node.names:
                    if dst != src and a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{f.relative_to(root.parent)}:{node.lineno}: {node.module}.{a.name} is private")
    return bad


def module_cycles(root: Path, package: str) -> list[list[str]]:
    """Import cycles between the modules of one package (e.g. train.driver <-> train.prepare)."""
    edges: dict[str, set[str]] = {}
    for f in sorted((root / package).glob("*.py")):
        me = f.stem
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{root.name}.{package}."):
                edges.setdefault(me, set()).add(node.module.split(".")[2])
    cycles, seen = [], set()

    def walk(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cyc = path[path.index(nxt):] + [nxt]
                if frozenset(cyc) not in seen:
                    seen.add(frozenset(cyc))
                    cycles.append(cyc)
            elif len(path) < 12:
                walk(nxt, path + [nxt])

    for start in sorted(edges):
        walk(start, [start])
    return cycles


def test_package_graph_points_one_way():
    assert violations(PKG) == []


def test_no_private_names_across_packages():
    assert private_reaches(PKG) == []


@pytest.mark.parametrize("package", ["train", "checkpoint", "data", "eval", "model", "runtime", "curate", "tokenizer"])
def test_no_import_cycles_inside_a_package(package):
    assert module_cycles(PKG, package) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "cpt_megatron"
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_catches_planted_back_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "data/mixture.py": "def f():\n    from cpt_megatron.train.driver import train  # lazy: still counted\n",
        "model/build.py": "import cpt_megatron.train.engine\n",
        "eval/select.py": "from cpt_megatron import cli\n",
        "config.py": "from cpt_megatron.model.build import ModelOptions\n",
        "train/driver.py": "from cpt_megatron.train.prepare import prepare\n",
        "train/prepare.py": "def g():\n    from cpt_megatron.train.driver import plan_steps\n",
        "train/engine.py": "from cpt_megatron.model import build\nfrom cpt_megatron.runtime import dist_env\n",
        "cli/env.py": "from cpt_megatron.model.specs import _have, select_kernels\n",
    })
    got = violations(root)
    assert any("data/mixture.py:2: data/ must not import train/" in v for v in got), got
    assert any("model/build.py:1: model/ must not import train/" in v for v in got), got
    assert any("eval/select.py:1: imports cli/" in v for v in got), got
    assert any("config.py:1: config may import only ['errors'], imports model" in v for v in got), got
    assert len(got) == 4, got  # train -> model / runtime is the allowed direction
    assert module_cycles(root, "train") == [["driver", "prepare", "driver"]]
    assert private_reaches(root) == ["cpt_megatron/cli/env.py:1: cpt_megatron.model.specs._have is private"]
