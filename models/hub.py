"""Find a checkpoint: a local folder as is, or a Hub repo downloaded file by file into the HF cache.

Only what loading needs is fetched: config, generation config, tokenizer files and the
safetensors shards the index lists. `HF_HUB_OFFLINE`, `HF_TOKEN` and `revision` are honoured by
`huggingface_hub` itself; its errors become one-line `HubquantError`s that say what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from hubquant.errors import HubquantError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# What a conversion also carries over: slow-tokenizer files some repos (Phi...) ship beside
# or instead of tokenizer.json.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
OPTIONAL_FILES = ("generation_config.json", *TOKENIZER_FILES)


def resolve(
    source: str | Path,
    revision: str | None = None,
    *,
    weights: Literal["safetensors", "any"] = "safetensors",
) -> Path:
    """A local folder holding `source`'s checkpoint.

    Args:
        source: a local folder, or a Hub repo id ("org/name").
        revision: branch, tag or commit on the Hub (ignored for local folders).
        weights: "safetensors" refuses pickle-only checkpoints (pointing to `hubquant convert`);
            "any" also fetches `pytorch_model*.bin` shards (for the converter).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.suffix in {".gguf", ".bin", ".pt", ".pth"}:
        raise HubquantError(
            f"'{source}' is a single-file checkpoint; run `hubquant convert {source} --out DIR` and load DIR"
        )
    # "org/name" or a legacy bare name ("gpt2"); anything path-like that is not a folder is wrong.
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise HubquantError(f"'{source}' is neither a checkpoint folder nor a Hub repo id (org/name)")
    return _download(str(source), revision, weights)


def _download(repo: str, revision: str | None, weights: str) -> Path:
    from huggingface_hub import hf_hub_download

    offline_misses: list[HubquantError] = []

    def fetch(name: str) -> Path | None:
        """Download one file (or take it from the cache); None if the repo (or cache) lacks it."""
        try:
            with _hub_errors(repo, revision):
                return Path(hf_hub_download(repo, name, revision=revision))
        except _Missing:
            return None
        except _NotCached as error:
            offline_misses.append(error)
            return None

    config = fetch(CONFIG)
    if config is None:
        if offline_misses:
            raise offline_misses[0]
        raise HubquantError(f"{repo} has no config.json; it is not a transformers checkpoint")
    for name in OPTIONAL_FILES + (SLOW_TOKENIZER_FILES if weights == "any" else ()):
        fetch(name)
    kinds = [(SAFETENSORS_INDEX, SAFETENSORS)] + ([(BIN_INDEX, BIN)] if weights == "any" else [])
    for index_name, single in kinds:
        index = fetch(index_name)
        if index is not None:
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                if fetch(shard) is None:
                    if offline_misses:
                        raise offline_misses[0]
                    raise HubquantError(
                        f"{repo}: shard {shard} listed in {index_name} is missing from the repo"
                    )
            return config.parent
        if fetch(single) is not None:
            return config.parent
    if offline_misses:
        raise offline_misses[0]
    if weights != "any" and (_exists(repo, BIN_INDEX, revision) or _exists(repo, BIN, revision)):
        raise HubquantError(
            f"{repo} has only pickle weights (pytorch_model*.bin); run `hubquant convert {repo} --out DIR` and load DIR"
        )
    raise HubquantError(f"{repo} has no model.safetensors or model.safetensors.index.json to load")


def _exists(repo: str, name: str, revision: str | None) -> bool:
    """Whether the repo has `name`, asked without downloading it (False when offline)."""
    from huggingface_hub import file_exists

    try:
        return file_exists(repo, name, revision=revision)
    except Exception:
        return False


class _Missing(HubquantError):
    """A file the repo does not have (optional files are skipped on this)."""


class _NotCached(HubquantError):
    """Offline (or unreachable Hub) and the file is not in the cache."""


class _hub_errors:
    """Turn huggingface_hub's exceptions into one-line errors with the fix."""

    def __init__(self, repo: str, revision: str | None) -> None:
        self.repo, self.revision = repo, revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        from huggingface_hub import errors

        repo, rev = self.repo, self.revision or "main"
        if isinstance(error, errors.GatedRepoError):
            raise HubquantError(
                f"{repo} is gated: accept its licence on huggingface.co/{repo} and set HF_TOKEN "
                "(or run `hf auth login`)"
            ) from error
        if isinstance(error, errors.RepositoryNotFoundError):
            raise HubquantError(
                f"'{repo}' is not a local folder, and no Hub repo of that id was found "
                "(or it is private: set HF_TOKEN); check the path or id"
            ) from error
        if isinstance(error, errors.RevisionNotFoundError):
            raise HubquantError(f"revision '{rev}' not found in {repo}; check --revision") from error
        # Offline misses subclass EntryNotFoundError: test them first.
        if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            raise _NotCached(
                f"{repo} is not in the local Hugging Face cache and the Hub cannot be reached "
                "(HF_HUB_OFFLINE is set or no network); download it once online, or pass a local folder"
            ) from error
        if isinstance(error, errors.EntryNotFoundError):
            raise _Missing(f"{repo}@{rev} has no such file") from error
        if isinstance(error, errors.HfHubHTTPError):
            raise HubquantError(f"Hub request for {repo} failed: {str(error).splitlines()[0]}") from error
        return False
