"""Measurements of a model: perplexity now; agreement, speed, memory and lm-eval scores next."""

from .perplexity import PerplexityResult, perplexity, pydoc_text

__all__ = ["PerplexityResult", "perplexity", "pydoc_text"]
