"""The evaluation texts, where evaluation has always found them: they live in `hubquant.texts`
(below quantize, which calibrates on the same texts)."""

from hubquant.texts import DATASETS, Text, calibration_split, load_text, pydoc_text

__all__ = ["DATASETS", "Text", "calibration_split", "load_text", "pydoc_text"]
