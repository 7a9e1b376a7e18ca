"""One table of quantization methods: read from the methods' own files without importing them,
equal to the classes themselves, and the only list every command and default reads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from hubquant.errors import HubquantError
from hubquant.quantize import registry
from hubquant.quantize.registry import MethodInfo


def test_table_equals_the_method_classes() -> None:
    import importlib
    import inspect
    import pkgutil

    import hubquant.quantize as package
    from hubquant.quantize.base import Method

    table = registry.methods()
    assert {"int4", "nf4", "int8", "fp8"} <= set(table)
    for name, info in table.items():
        cls = type(registry.get_method(name))
        assert (cls.__module__, cls.__name__) == (info.module, info.class_name), name
        for f in fields(MethodInfo):
            if f.name not in ("module", "class_name"):
                assert getattr(cls, f.name) == getattr(info, f.name), (name, f.name)
    # Every concrete method class in the folder is in the table (none is missed by the reader).
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    from hubquant.quantize.mixed import WithHead

    seen, stack = set(), [Method]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if sub is WithHead:  # pairs two methods of the table (`--head`), takes the first's name
                continue
            if not inspect.isabstract(sub) and sub.__module__.startswith(package.__name__):
                seen.add(sub.name)
    assert seen == set(table)
    assert registry.method_names() == list(table)


def test_table_is_read_without_torch() -> None:
    code = (
        "import sys\nfrom hubquant.quantize.registry import methods, default_variants\n"
        "print(list(methods()), default_variants())\n"
        "assert not {'torch', 'torchao', 'bitsandbytes'} & set(sys.modules), sorted(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "int4" in out and "'base'" in out


def test_reader_follows_bases_in_the_module_and_refuses_a_method_without_its_facts(tmp_path: Path) -> None:
    path = tmp_path / "int3.py"
    path.write_text(
        textwrap.dedent(
            """
            from typing import ClassVar
            from .base import Method, register_method

            class _Shared(Method):
                library: ClassVar[str] = "somelib"
                sizes = "the same on disk " "and in memory"

            @register_method
            class Int3(_Shared):
                name: ClassVar[str] = "int3"
                bits = 3
                title = "int3"
                about = "three bits"
                default_eval = False

            class NotRegistered(_Shared):
                name = "int2"
            """
        )
    )
    (info,) = registry._read_module(path, "pkg.int3")
    assert info == MethodInfo(
        "int3",
        "pkg.int3",
        "Int3",
        "somelib",
        3,
        "int3",
        "three bits",
        "the same on disk and in memory",
        False,
        False,
    )
    path.write_text(
        "from .base import register_method\n@register_method\nclass X:\n    name = 'x'\n    bits = 2\n"
    )
    with pytest.raises(RuntimeError, match="must state library, title, about, sizes"):
        registry._read_module(path, "pkg.x")


def test_reader_follows_a_base_imported_from_a_module_beside_it(tmp_path: Path) -> None:
    """A fact stated once on a shared base in another file of the folder (as `sizes` on
    `SolvedInt4` for `int4-gptq` and `int4-awq`) reaches every method built on it; a subclass
    still overrides it, and the base's own base is followed too."""
    (tmp_path / "shared.py").write_text(
        "from .root import Root\nclass Shared(Root):\n    sizes = 'stated once'\n    bits = 4\n"
    )
    (tmp_path / "root.py").write_text("class Root:\n    library = 'somelib'\n    bits = 8\n")
    path = tmp_path / "int4x.py"
    path.write_text(
        "from .base import register_method\nfrom .shared import Shared as Base\n"
        "@register_method\nclass Int4X(Base):\n    name = 'int4-x'\n    title = 't'\n    about = 'a'\n"
        "@register_method\nclass Int4Y(Base):\n    name = 'int4-y'\n    title = 't'\n    about = 'a'\n"
        "    sizes = 'its own'\n"
    )
    x, y = registry._read_module(path, "pkg.int4x")
    assert (x.name, x.library, x.bits, x.sizes) == ("int4-x", "somelib", 4, "stated once")
    assert (y.name, y.sizes) == ("int4-y", "its own")


@pytest.fixture
def int3(monkeypatch: pytest.MonkeyPatch) -> MethodInfo:
    """A method added to the table: what a new method's file adds, and nothing else."""
    table = dict(registry.methods())
    info = MethodInfo("int3", "pkg.int3", "Int3", "somelib", 3, "int3 weight-only", "three bits", "same")
    table = {"int3": info, **table}
    monkeypatch.setattr(registry, "methods", lambda: table)
    return info


def test_a_new_method_reaches_every_list(int3: MethodInfo, tmp_path: Path) -> None:
    from hubquant.cli import build_parser
    from hubquant.evaluate.settings import check_variants
    from hubquant.evaluate.sweep import read_spec

    parser = build_parser()
    args = parser.parse_args(["quantize", "some/model", "--method", "int3"])
    assert args.method == "int3"
    check_variants(["base", "int3"])  # eval's variants
    assert registry.default_variants()[:2] == ("base", "int3")
    spec = tmp_path / "sweep.yaml"
    spec.write_text("models: [some/model]\n")
    assert read_spec(spec)["variants"][:2] == ["base", "int3"]  # the sweep's default
    with pytest.raises(HubquantError, match="use any of base, int3, int4"):
        check_variants(["int5"])
