"""The texts hubquant scores and calibrates on: CPython's own documentation (always there),
wikitext-2's test split (fetched once through huggingface_hub and cached), or any local .txt file.

Each text's tokens are split once, the same way for every run (`calibration_split`): the first
three quarters are the scoring part, the only tokens `hubquant eval` scores; the last quarter is the
calibration slice, the only tokens a calibrated method (`int4-gptq`) learns from, whether `hubquant
eval` makes the variant or `hubquant quantize --calib-dataset` does. An eval of a text never
scores a token that a calibration on that text has seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

from hubquant.errors import HubquantError

DATASETS = ("python-docs", "wikitext2")
# wikitext-2-raw-v1, test split, as the Hub's parquet conversion of Salesforce/wikitext stores it.
_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet")


@dataclass(frozen=True)
class Text:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def pydoc_text() -> str:
    """Real English text that ships with CPython: its documentation topics, keys sorted, joined by
    blank lines."""

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(dataset: str) -> Text:
    """The evaluation text named by `--dataset`.

    Args:
        dataset: "python-docs", "wikitext2", or a path to a UTF-8 .txt file.

    Raises:
        HubquantError: an unknown name, an unreadable file, or wikitext2 offline and not cached.
    """
    if dataset == "python-docs":
        return Text(dataset, pydoc_text())
    if dataset == "wikitext2":
        return Text(dataset, _wikitext2())
    path = Path(dataset).expanduser()
    if path.suffix != ".txt" and not path.is_file():
        raise HubquantError(
            f"--dataset '{dataset}' is unknown; use {', '.join(DATASETS)} or a path to a .txt file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HubquantError(f"--dataset file {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise HubquantError(f"--dataset file {path} cannot be read as UTF-8 text ({error})") from None
    if not text.strip():
        raise HubquantError(f"--dataset file {path} is empty; give a file with text to score")
    return Text(path.name, text)


def _wikitext2() -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        path = hf_hub_download(_WIKITEXT[0], _WIKITEXT[1], repo_type="dataset")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise HubquantError(
            "wikitext2 is not in the local Hugging Face cache and the Hub cannot be reached; "
            "run once online, or use --dataset python-docs or a .txt file"
        ) from None
    except Exception as error:  # network and HTTP errors: one line
        raise HubquantError(
            f"wikitext2 could not be fetched ({str(error).splitlines()[0]}); retry, or use --dataset python-docs"
        ) from None
    import pandas as pd

    return "".join(pd.read_parquet(path)["text"])


CALIBRATION_SHARE = 4  # the last 1/4 of a text's tokens is its calibration slice


def calibration_split(tokens: int) -> int:
    """Where a text of `tokens` tokens splits: tokens [0, split) are scored, [split, tokens) are
    the calibration slice (the last quarter, rounded down; at least one token each side).

    Args:
        tokens: the text's length in tokens (its own tokenizer's).
    """
    if tokens < 2:
        raise HubquantError(f"a text of {tokens} token(s) cannot be split into scoring and calibration parts")
    return tokens - max(1, tokens // CALIBRATION_SHARE)


@dataclass(frozen=True)
class TokenSplit:
    """One text's tokens split once (`calibration_split`): tokens [0, split) are the scoring part,
    [split, total) the calibration slice. The one place both sides read the split from: a
    calibration records what it drew on (`record`), and an eval checks a variant's record against
    what it scores (`scores_any_of`).

    Attributes:
        text: the text.
        total: its length in tokens (the checkpoint's own tokenizer's).
    """

    text: Text
    total: int

    @property
    def split(self) -> int:
        return calibration_split(self.total)

    def record(self) -> dict[str, object]:
        """What a calibration on this text records about where its tokens came from."""
        return {
            "text": self.text.name,
            "sha256": self.text.sha256,
            "token_range": [self.split, self.total],
            "rule": "the last quarter of the text's tokens, never scored by an eval of it; sequences "
            "at seeded random offsets inside it",
        }

    def scores_any_of(self, calibration: dict[str, object]) -> bool:
        """Whether an eval of this text scores tokens a calibration (its record) learnt from."""
        token_range = calibration.get("token_range")
        if not isinstance(token_range, list | tuple) or not token_range:
            return False  # calibrated on no text (seeded random ids)
        return calibration.get("sha256") == self.text.sha256 and int(token_range[0]) < self.split
