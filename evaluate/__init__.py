"""Measurements of a model and its quantized variants: `run_eval` (the driver behind `hubquant
eval`) with its `EvalSettings`; the tasks it runs are in `hubquant.evaluate.tasks`; `perplexity`
scores one model on a text.

The public names are resolved on first use (PEP 562), like `hubquant`'s own: importing this
package (as `hubquant eval` does on its way to `run.py`) costs nothing until a name is used.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from hubquant import _LazyPackage

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .data import pydoc_text
    from .perplexity import PerplexityResult, perplexity
    from .run import run_eval
    from .settings import EvalSettings

# Public name -> the submodule (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "EvalSettings": "settings",
    "run_eval": "run",
    "PerplexityResult": "perplexity",
    "perplexity": "perplexity",
    "pydoc_text": "data",
}

__all__ = ["EvalSettings", "PerplexityResult", "perplexity", "pydoc_text", "run_eval"]


# A submodule import (run.py imports .perplexity) must not replace `perplexity`, the function.
sys.modules[__name__].__class__ = _LazyPackage
