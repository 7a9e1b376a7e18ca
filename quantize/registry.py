"""The quantization methods by name: one table, read from the methods' own files without importing them.

A method is a class in a module of this folder decorated with `@register_method` (see `base.py`).
Its plain facts are literal class attributes, its own or a base class's in this folder: `name`,
`library`, `bits`, `title`, `about` (what the format stores), `sizes` (how disk and run-time bytes
relate), `repacks` (hubquant.load changes the layout for the device) and `default_eval` (`hubquant
eval` makes it when no `--variants` is given).
This module reads them from the source with `ast`, so that `--help`, the model card and every list of
variants name the methods without importing torch, torchao or bitsandbytes; `get_method` imports
the one module a method lives in, when the method is used. A test checks that table and classes agree.

Adding a method is its own file (or a class in one) and its tests: nothing here names a method.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError

if TYPE_CHECKING:
    from .base import Method


@dataclass(frozen=True)
class MethodInfo:
    """A method's facts, as its class states them.

    Attributes:
        name: the method's name ("int4"), as `--method` and `--variants` take it.
        module: the module that defines it ("hubquant.quantize.nf4").
        class_name: the class in that module ("NF4").
        library: the library that runs it ("torchao", "bitsandbytes").
        bits: bits per weight value.
        title: a short title for the card ("int4 weight-only").
        about / sizes: the card's sentences (Markdown) on what is stored and on disk vs run-time bytes.
        repacks: hubquant.load packs the saved layout into another for the device.
        default_eval: `hubquant eval` makes it by default.
    """

    name: str
    module: str
    class_name: str
    library: str
    bits: int
    title: str
    about: str
    sizes: str
    repacks: bool = False
    default_eval: bool = True


_FIELDS = {f.name for f in fields(MethodInfo)} - {"module", "class_name"}
_REQUIRED = ("name", "library", "bits", "title", "about", "sizes")


@functools.cache
def methods() -> dict[str, MethodInfo]:
    """Every registered method, by name, ordered by bits then name (int4, nf4, fp8, int8)."""
    found: list[MethodInfo] = []
    folder = Path(__file__).parent
    for path in sorted(folder.glob("*.py")):
        found += _read_module(path, f"{__package__}.{path.stem}")
    found.sort(key=lambda info: (info.bits, info.name))
    table = {info.name: info for info in found}
    if len(table) != len(found):
        raise RuntimeError(f"two quantization methods share a name: {[info.name for info in found]}")
    return table


def method_names() -> list[str]:
    """The methods' names, in the table's order."""
    return list(methods())


def default_variants() -> tuple[str, ...]:
    """What `hubquant eval` (and a sweep) makes without `--variants`: the base and the default methods."""
    return ("base", *(name for name, info in methods().items() if info.default_eval))


VARIANT_OPTIONS = "gN (group size N), hqq, act (activation order), head-METHOD (the output head in METHOD)"


def parse_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """A variant name as `--variants` and sweeps take it: a method, then settings after colons:
    `int4`, `int4:g64` (group size 64), `int4:hqq`, `int4-gptq:g64:act` (activation order),
    `int4:head-int8` (the output head quantized with int8, the projections with int4).

    Returns:
        (the method's name, its settings by keyword).

    Raises:
        HubquantError: an unknown method or option (the settings' values are the method's to check).
    """
    name, *options = variant.split(":")
    if name not in methods():
        known = ", ".join(method_names())
        raise HubquantError(f"variant '{variant}': method '{name}' is unknown; use one of {known}")
    settings: dict[str, Any] = {}
    for option in options:
        if option[:1] == "g" and option[1:].isdigit():
            settings["group_size"] = int(option[1:])
        elif option.startswith("head-") and "head" not in settings:
            if option[5:] not in methods():
                known = ", ".join(method_names())
                raise HubquantError(
                    f"variant '{variant}': head method '{option[5:]}' is unknown; use one of {known}"
                )
            settings["head"] = option[5:]
        elif option in ("hqq", "act"):
            settings["hqq" if option == "hqq" else "act_order"] = True
        else:
            raise HubquantError(f"variant '{variant}': option '{option}' is unknown; use {VARIANT_OPTIONS}")
    return name, settings


def variant_folder(variant: str) -> str:
    """The folder name of a variant under an eval's OUT/variants ("int4:g64" -> "int4_g64")."""
    return variant.replace(":", "_")


def method_class(name: str) -> type[Method]:
    """The class of the method `name`, its module imported now (torch and the method's library).

    Raises:
        HubquantError: for an unknown name, listing the known ones.
    """
    info = methods().get(name)
    if info is None:
        raise HubquantError(
            f"quantization method '{name}' is unknown; use one of {', '.join(method_names())}"
        )
    return getattr(importlib.import_module(info.module), info.class_name)


def get_method(name: str, **settings: Any) -> Method:
    """The method `name`, configured with `settings` (group_size, hqq...); `head="int8"` pairs it
    with another method for the output head (`quantize/mixed.py`).

    Raises:
        HubquantError: for an unknown name or settings the method refuses.
    """
    head = settings.pop("head", None)
    method = method_class(name)(**settings)
    if head is None:
        return method
    # Imported by name, as method_class imports the methods: the pairing needs torch and torchao.
    return importlib.import_module(f"{__package__}.mixed").WithHead(method, get_method(head))


def method_from_hf_config(quantization_config: dict[str, Any]) -> Method:
    """The method (with its settings) that wrote a checkpoint's `quantization_config`.

    Raises:
        HubquantError: for a quantization hubquant does not read.
    """
    mixed = importlib.import_module(f"{__package__}.mixed")
    parts = mixed.fqn_parts(quantization_config)
    if parts is not None:  # one method for the projections, another for the head
        body, head = (
            method_from_hf_config({**quantization_config, "quant_type": {"default": p}}) for p in parts
        )
        return mixed.WithHead(body, head)
    for name in methods():
        method = method_class(name).from_hf_config(quantization_config)
        if method is not None:
            return method
    kind = quantization_config.get("quant_method", "?")
    raise HubquantError(
        f"config.json's quantization_config ({kind}) is not one hubquant reads; "
        f"hubquant reads its own variants: {', '.join(method_names())}"
    )


def _read_module(path: Path, module: str) -> list[MethodInfo]:
    source = path.read_text(encoding="utf-8")
    if "register_method" not in source:
        return []
    found = []
    namespaces: dict[Path, _Namespace] = {}  # each module of the folder parsed once
    for cls, where in _namespace(path, namespaces).values():
        if where != path:
            continue  # imported from another module
        if not any(_names(decorator) == "register_method" for decorator in cls.decorator_list):
            continue
        attributes: dict[str, Any] = {}
        for node in reversed(_lineage(cls, path, namespaces)):  # bases first: a subclass overrides
            attributes.update(_literal_attributes(node))
        known = {k: v for k, v in attributes.items() if k in _FIELDS}
        missing = [k for k in _REQUIRED if k not in known]
        if missing:
            raise RuntimeError(
                f"{path}: method class {cls.name} must state {', '.join(missing)} as literal class attributes"
            )
        found.append(MethodInfo(module=module, class_name=cls.name, **known))
    return found


_Namespace = dict[str, tuple[ast.ClassDef, Path]]


def _namespace(path: Path, namespaces: dict[Path, _Namespace]) -> _Namespace:
    """The classes a module can name at its top level: its own, and those it imports from the
    modules beside it (`from .solved import SolvedInt4`), each with the file that defines it.
    Kept in `namespaces`, so that each module is parsed once (an import cycle sees the part
    being read)."""
    if path in namespaces:
        return namespaces[path]
    names = namespaces[path] = {}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            source = path.parent / f"{node.module.replace('.', '/')}.py"
            if source.is_file():
                theirs = _namespace(source, namespaces)
                for alias in node.names:
                    if alias.name in theirs:
                        names[alias.asname or alias.name] = theirs[alias.name]
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = (node, path)
    return names


def _names(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _lineage(cls: ast.ClassDef, path: Path, namespaces: dict[Path, _Namespace]) -> list[ast.ClassDef]:
    """`cls` (defined in `path`) and its bases defined in this folder, nearest first."""
    chain = [cls]
    namespace = _namespace(path, namespaces)
    for base in cls.bases:
        parent = namespace.get(_names(base))
        if parent is not None and parent[0] is not cls:
            chain += _lineage(*parent, namespaces)
    return chain


def _literal_attributes(cls: ast.ClassDef) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for statement in cls.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                out[target.id] = ast.literal_eval(value)
            except ValueError:
                continue
    return out
