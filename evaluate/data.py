"""Evaluation text: CPython's own documentation (always there), wikitext-2's test split (fetched
once through huggingface_hub and cached), or any local .txt file."""

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
