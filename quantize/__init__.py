"""Quantized variants: int4 and int8/fp8 (torchao), nf4 (bitsandbytes), their model card, and push.

The package is callable: `hubquant.quantize(model, "int4", ...)` is `hubquant.quantize.quantize`,
and `import hubquant.quantize.core` still works.

The public names are resolved on first use (PEP 562), so `import hubquant.quantize` costs nothing:
torch, torchao and bitsandbytes are imported when `quantize` or `quantize_checkpoint` is first
used, and `push` needs none of them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from hubquant import _LazyPackage

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .base import LayerRecord, QuantReport
    from .core import quantize, quantize_checkpoint
    from .push import push

# Public name -> the submodule (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "LayerRecord": "base",
    "QuantReport": "base",
    "push": "push",
    "quantize": "core",
    "quantize_checkpoint": "core",
}

__all__ = ["LayerRecord", "QuantReport", "push", "quantize", "quantize_checkpoint"]


class _QuantizePackage(_LazyPackage):
    """This package's module type: lazy names (a submodule import must not replace `push` the
    function with quantize/push.py), and callable as `quantize` itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .core import quantize

        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _QuantizePackage
