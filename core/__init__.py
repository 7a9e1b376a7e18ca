"""hubquant: Hub checkpoints into canonical PyTorch models, quantized variants, measured.

The public names are resolved on first use (PEP 562), so `import hubquant` and the CLI's `--help`
do not import torch: only `HubquantError` and `__version__` are defined eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from hubquant import quantize
    from hubquant.models.config import ModelConfig
    from hubquant.models.decoder import Decoder
    from hubquant.models.embed import embed
    from hubquant.models.encoder import Encoder
    from hubquant.models.generate import generate
    from hubquant.models.layers import KVCache
    from hubquant.models.loading import load
    from hubquant.models.tokenizer import Tokenizer

__version__ = "0.1.0"

# Public name -> the module that defines it. Each points at the defining module itself, not at
# `hubquant.models`, so that a submodule sharing a name with a function (models/generate.py and
# `generate`) can never be returned in the function's place.
_LAZY: dict[str, str] = {
    "Decoder": "hubquant.models.decoder",
    "KVCache": "hubquant.models.layers",
    "Encoder": "hubquant.models.encoder",
    "embed": "hubquant.models.embed",
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
    "Encoder",
    "HubquantError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "__version__",
    "embed",
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

    It also resolves the package's lazy names: a package opts in with
    `sys.modules[__name__].__class__ = _LazyPackage`, and its `_LAZY` dict maps each public name to
    the submodule (relative to the package) that defines it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_LAZY", ()):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        """Import a public name's submodule (`_LAZY`, relative to the package) on first access,
        and cache the name in the package.

        Args:
            name: the attribute asked for.
        """
        module = self.__dict__.get("_LAZY", {}).get(name)
        if module is None:
            raise AttributeError(f"module '{self.__name__}' has no attribute '{name}'")
        value = getattr(importlib.import_module(f".{module}", self.__name__), name)
        self.__dict__[name] = value  # later lookups find it directly
        return value

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("__all__", ())})


# `import hubquant.quantize.core` must not replace `hubquant.quantize` (the function) with the
# subpackage of the same name.
sys.modules[__name__].__class__ = _LazyPackage


# lm-eval finds a model by its name in its registry and has no plugin discovery (0.4.x reads no
# entry points). So that `lm_eval.simple_evaluate(model="hubquant", ...)` works after `import
# hubquant`, "hubquant" is entered into that registry as a lazy "module:Class" placeholder as soon as
# lm-eval's registry module is imported (at once, if it already is). Neither lm-eval nor torch is
# imported here; hubquant.evaluate.lm_eval is imported when lm-eval first asks for the model.
_LM_EVAL_REGISTRY = "lm_eval.api.registry"
_LM_EVAL_MODEL = ("hubquant", "hubquant.evaluate.lm_eval:HubquantLM")


def _register_lm_eval_model(registry: types.ModuleType) -> None:
    """Enter the placeholder into lm-eval's model registry, unless the name is taken.

    Args:
        registry: the module `lm_eval.api.registry`, executed.
    """
    try:
        # lm-eval adds its own models only to an empty registry, so they must come first.
        importlib.import_module("lm_eval.models")
        name, target = _LM_EVAL_MODEL
        if name not in registry.model_registry:
            registry.model_registry.register(name, target=target)
    except Exception as error:  # lm-eval must keep working whatever happens here
        warnings.warn(f"hubquant: could not register lm-eval's model 'hubquant': {error}", stacklevel=2)


class _LmEvalHook:
    """A `sys.meta_path` finder that finds nothing itself: when `lm_eval.api.registry` is about to
    be imported, it has the next finder find it and wraps the loader's `exec_module`, so that the
    placeholder is registered right after the module has run."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        """Args: as `importlib.abc.MetaPathFinder.find_spec`."""
        if fullname != _LM_EVAL_REGISTRY:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if finder is not self and find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_register(module: types.ModuleType) -> None:
            exec_module(module)
            _register_lm_eval_model(module)

        loader.exec_module = exec_and_register  # this loader instance serves this one module
        return spec


if _LM_EVAL_REGISTRY in sys.modules:
    _register_lm_eval_model(sys.modules[_LM_EVAL_REGISTRY])
elif not any(type(finder).__name__ == "_LmEvalHook" for finder in sys.meta_path):
    sys.meta_path.insert(0, _LmEvalHook())
