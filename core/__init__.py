"""hubquant: Hub checkpoints into canonical PyTorch models, quantized variants, measured.

The public names are resolved on first use (PEP 562), so `import hubquant` and the CLI's `--help`
do not import torch: only `HubquantError` and `__version__` are defined eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from hubquant import quantize
    from hubquant.models.config import ModelConfig
    from hubquant.models.decoder import Decoder, KVCache
    from hubquant.models.generate import generate
    from hubquant.models.loading import load
    from hubquant.models.tokenizer import Tokenizer

__version__ = "0.1.0"

# Public name -> the module that defines it. Each points at the defining module itself, not at
# `hubquant.models`, so that a submodule sharing a name with a function (models/generate.py and
# `generate`) can never be returned in the function's place.
_LAZY: dict[str, str] = {
    "Decoder": "hubquant.models.decoder",
    "KVCache": "hubquant.models.decoder",
    "ModelConfig": "hubquant.models.config",
    "Tokenizer": "hubquant.models.tokenizer",
    "generate": "hubquant.models.generate",
    "load": "hubquant.models.loading",
}

# Subpackages reachable as attributes (`hubquant.models.load`) without importing them up front.
# `hubquant.quantize` is the subpackage, and it is callable: `hubquant.quantize(model, "int4")`
# runs `hubquant.quantize.core.quantize` (see quantize/__init__.py).
_SUBMODULES = frozenset({"cli", "convert", "errors", "evaluate", "models", "quantize", "reports"})

__all__ = [
    "Decoder",
    "HubquantError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "__version__",
    "generate",
    "load",
    "quantize",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here.

    Args:
        name: the attribute asked for.
    """
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it here as well
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hubquant' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _LazyPackage(types.ModuleType):
    """The module type of a package with lazy names: a submodule may not hide a name it shares.

    When a submodule is imported, Python binds it as an attribute of its package. Where a public
    function has its submodule's name (`hubquant.models.generate`, `hubquant.evaluate.perplexity`),
    eager imports used to rebind the function right after; with lazy names nothing would, and
    `from hubquant.models import generate` would hand out the module once anything (the decoder,
    lazily) had imported it. So such a binding is dropped; the submodule stays reachable through
    `sys.modules` and `from hubquant.models.generate import ...`, as before.

    A package opts in with `sys.modules[__name__].__class__ = _LazyPackage`; its `_LAZY` dict
    names its public lazy attributes.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_LAZY", ()):
            return
        super().__setattr__(name, value)


# `import hubquant.quantize.core` must not replace `hubquant.quantize` (the function) with the
# subpackage of the same name.
sys.modules[__name__].__class__ = _LazyPackage
