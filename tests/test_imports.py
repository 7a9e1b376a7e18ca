"""The import graph holds its shape: no circle (imports inside functions count, `TYPE_CHECKING` ones do
not), lower layers never import higher ones, and an import sits inside a function only where it
keeps a third-party package (torch for `--help`, an optional library) from loading with the module."""

from __future__ import annotations

import textwrap
from pathlib import Path

import import_graph as g

# Lowest first. A module belongs to the layer of its longest matching prefix. `models.loading` and
# `models.embed` read every checkpoint format, quantized ones included, so they sit above quantize;
# the evaluation driver, push (the pipeline's last step) and the CLI sit above the reports.
LAYERS = [
    ("hubquant", "hubquant.errors", "hubquant.files", "hubquant.locks", "hubquant.memory", "hubquant.texts"),
    ("hubquant.models",),
    ("hubquant.convert",),
    ("hubquant.quantize",),
    ("hubquant.models.loading", "hubquant.models.embed"),
    ("hubquant.evaluate",),
    ("hubquant.reports",),
    (
        "hubquant.evaluate.driver",
        "hubquant.evaluate.run",
        "hubquant.evaluate.sweep",
        "hubquant.quantize.push",
        "hubquant.cli",
        "hubquant.__main__",
    ),
]


def layer(module: str) -> int:
    best = (-1, "")
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (index, prefix)
    assert best[0] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _internal() -> tuple[list[g.Import], dict[str, Path]]:
    known = g.modules()
    return [e for e in g.imports() if e.target in known], known


def test_no_import_circle() -> None:
    edges, _ = _internal()
    found = g.cycles(edges)
    where = {
        tuple(c): [f"{e.source} -> {e.target} ({e.where()})" for e in edges if {e.source, e.target} <= set(c)]
        for c in found
    }
    assert not found, "import circles:\n" + "\n".join(f"{c}: {lines}" for c, lines in where.items())


def test_lower_layers_never_import_higher_ones() -> None:
    edges, known = _internal()
    assert {layer(m) for m in known}  # every module has a layer
    upward = [f"{e.where()}: {e.source} -> {e.target}" for e in edges if layer(e.target) > layer(e.source)]
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_save_something() -> None:
    edges = g.imports()
    needless = g.needless_function_imports(edges, g.modules())
    assert not needless, "move to the top:\n" + "\n".join(f"{e.where()}: {e.target}" for e in needless)
    assert sum(e.in_function for e in edges) > 0  # the walker sees function-level imports at all


def _package(tmp_path: Path, files: dict[str, str]) -> list[g.Import]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return g.imports(tmp_path, {"hubquant": "pkg"})


def test_the_walker_finds_a_circle_through_a_function_and_not_through_type_checking(tmp_path: Path) -> None:
    edges = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import torch\nfrom . import b\n",
            "b.py": "def f():\n    from .a import x\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n",
            "d.py": "from .c import z\n",
            "e.py": "import torch\ndef f():\n    import torch\n    import json\n    import yaml\n"
            "    from torch._inductor.x import y\n    from torch.nn import z\n",
            "sub/__init__.py": "_LAZY: dict[str, str] = {'thing': 'deep'}\n",
            "sub/deep.py": "import numpy\n",
            "f.py": "def f():\n    from .sub import thing\n",
        },
    )
    known = g.modules(tmp_path, {"hubquant": "pkg"})
    assert g.cycles([e for e in edges if e.target in known]) == [["hubquant.a", "hubquant.b"]]
    needless = {(e.source, e.target) for e in g.needless_function_imports(edges, known)}
    # torch (torch.nn too) is already loaded by e and json is the standard library; yaml, numpy
    # and inductor (HEAVY_SUBPACKAGES: `import torch` leaves it unloaded) load anew.
    assert needless == {("hubquant.e", "torch"), ("hubquant.e", "json")}
    lazy = [e for e in edges if e.source == "hubquant.f"]
    assert [e.target for e in lazy] == ["hubquant.sub.deep"]
