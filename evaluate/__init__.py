"""Measurements of a model: perplexity now; agreement, speed, memory and lm-eval scores next.

The public names are resolved on first use (PEP 562), like `hubquant`'s own: importing this
package (as `hubquant eval` does on its way to `run.py`) costs nothing until a name is used.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from hubquant import _LazyPackage

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .perplexity import PerplexityResult, perplexity, pydoc_text

# Public name -> the submodule (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "PerplexityResult": "perplexity",
    "perplexity": "perplexity",
    "pydoc_text": "perplexity",
}

__all__ = ["PerplexityResult", "perplexity", "pydoc_text"]


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first access and cache the name here.

    Args:
        name: the attribute asked for.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# A submodule import (run.py imports .perplexity) must not replace `perplexity`, the function.
sys.modules[__name__].__class__ = _LazyPackage
