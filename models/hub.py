"""Find a checkpoint: a local folder as is, or a Hub repo downloaded into the HF cache.

Only what loading needs is fetched, with two `huggingface_hub.snapshot_download` calls: the first
takes the config, generation config, tokenizer files and the safetensors index; the second takes
exactly the shards that index lists, several at a time, resuming any interrupted download.
`HF_HUB_OFFLINE`, `HF_TOKEN` and `revision` are honoured by `huggingface_hub` itself; its errors
become one-line `HubquantError`s that say what to do.

This module imports neither torch nor huggingface_hub at import time.
"""

from __future__ import annotations

import glob
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from hubquant.errors import HubquantError
from hubquant.files import read_json

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
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
OPTIONAL_FILES = (GENERATION_CONFIG, *TOKENIZER_FILES)
# A sentence-transformers model's pipeline (pooling, normalisation, truncation) and BERT's slow
# vocabulary: fetched with the small files, carried into variants, so that a model embeds as its
# base does (`hubquant.embed`, sentence-transformers). Module folders (`1_Pooling/`) that
# `modules.json` names come too (`sentence_module_paths`).
SENTENCE_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "vocab.txt",
)
# Parallel shard downloads: enough to fill a fast link, few enough not to trip the Hub's limits.
MAX_WORKERS = 8

_COMMIT = re.compile(r"[0-9a-f]{40}")


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
            "any" also fetches `pytorch_model*.bin` shards and slow-tokenizer files (for the
            converter), when the repo has no safetensors.
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


def read_weight_map(index_path: Path, where: str | None = None) -> dict[str, str]:
    """The tensor name -> shard file map of a `*.index.json`, checked: valid JSON, a non-empty
    weight_map, every shard a relative file name inside the folder. The one index rule: loading,
    downloading and converting all read indexes through it. Whether the shards exist is the
    caller's business (on the Hub they are not downloaded yet).

    Args:
        index_path: `model.safetensors.index.json` or `pytorch_model.bin.index.json`.
        where: how to name the index in messages (default: its path).

    Raises:
        HubquantError: one line naming the index and what is wrong with it.
    """
    where = where or str(index_path)
    fix = "re-download the checkpoint, or fix or remove the index"
    data = read_json(index_path, index_path.name, fix, name=where)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubquantError(f"{where} has no weight_map (tensor name -> shard file); {fix}")
    for tensor, shard in weight_map.items():
        # A shard name is joined to the checkpoint folder: it must stay inside it.
        parts = PurePosixPath(shard).parts if isinstance(shard, str) else ()
        if not parts or parts[0] == "/" or ".." in parts or "\\" in shard:
            raise HubquantError(f"{where} maps {tensor} to {shard!r}, not a shard file name; {fix}")
    return weight_map


def index_shards(index_path: Path, where: str | None = None) -> list[str]:
    """The shard file names a `*.index.json` lists (see `read_weight_map`)."""
    return sorted(set(read_weight_map(index_path, where).values()))


def _download(repo: str, revision: str | None, weights: str) -> Path:
    small = [CONFIG, *OPTIONAL_FILES, *SENTENCE_FILES, SAFETENSORS_INDEX]
    small += SLOW_TOKENIZER_FILES if weights == "any" else ()
    folder = _snapshot(repo, revision, revision, small)
    # Every later call names the commit this one resolved: no second revision lookup, and all
    # files come from one commit even if the branch moves meanwhile.
    commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
    listing = _listing(repo, commit)  # None: unknown (offline with a cache made without it)

    def in_repo(name: str) -> bool:
        return listing is None or name in listing  # unknown: try it

    def fetch(names: list[str]) -> list[str]:
        """Download `names` into `folder`; return those that are still not there."""
        if any(in_repo(name) for name in names):
            _snapshot(repo, commit, revision, names)
        return [name for name in names if not (folder / name).is_file()]

    if not (folder / CONFIG).is_file():
        if listing is None and _offline():
            raise _not_cached(repo)
        raise HubquantError(f"{repo} has no config.json; it is not a transformers checkpoint")
    modules = [f"{path}/config.json" for path in sentence_module_paths(folder)]
    if modules:
        fetch([name for name in modules if in_repo(name)])  # the pooling config, when declared
    kinds = [(SAFETENSORS_INDEX, SAFETENSORS)] + ([(BIN_INDEX, BIN)] if weights == "any" else [])
    for index_name, single in kinds:
        if index_name != SAFETENSORS_INDEX and in_repo(index_name):
            fetch([index_name])  # the safetensors index came with the small files
        if (folder / index_name).is_file():
            shards = index_shards(folder / index_name, f"{index_name} of {repo}")
            unlisted = [shard for shard in shards if not in_repo(shard)]
            missing = unlisted or fetch(shards)
            if missing:
                if not unlisted and listing is None and _offline():
                    raise _not_cached(repo)
                raise HubquantError(
                    f"{repo}: shard {missing[0]} listed in {index_name} is missing from the repo; "
                    "its index and files disagree: try another --revision"
                )
            return folder
        if in_repo(single) and not fetch([single]):
            return folder
    if listing is None and _offline():
        raise _not_cached(repo)
    if weights != "any" and listing is not None and any(_is_pickle(name) for name in listing):
        raise HubquantError(
            f"{repo} has only pickle weights (pytorch_model*.bin); run `hubquant convert {repo} --out DIR` and load DIR"
        )
    raise HubquantError(f"{repo} has no model.safetensors or model.safetensors.index.json to load")


def sentence_module_paths(folder: Path) -> list[str]:
    """The module subfolders (`1_Pooling`, `2_Normalize`) a sentence-transformers `modules.json`
    names, in its order; paths leaving the folder are ignored. Empty without `modules.json`."""
    path = folder / "modules.json"
    try:
        modules = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        return []
    out: list[str] = []
    for module in modules if isinstance(modules, list) else []:
        sub = module.get("path") if isinstance(module, dict) else None
        if not isinstance(sub, str) or not sub or Path(sub).is_absolute() or ".." in Path(sub).parts:
            continue
        if sub not in out:
            out.append(sub)
    return out


def _is_pickle(name: str) -> bool:
    return name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))


def _snapshot(repo: str, revision: str | None, asked: str | None, names: list[str]) -> Path:
    """`snapshot_download` of exactly `names` (they are escaped: a name is never a pattern).

    Args:
        repo: the Hub repo id.
        revision: what to download from: the user's revision, then the commit it resolved to.
        asked: the user's revision, for messages.
        names: file names in the repo.
    """
    from huggingface_hub import snapshot_download

    with _hub_errors(repo, asked):
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=[glob.escape(name) for name in names],
                max_workers=MAX_WORKERS,
            )
        )


def _listing(repo: str, commit: str | None) -> set[str] | None:
    """The repo's files at `commit`, from the listing `snapshot_download` cached (no request).

    None when there is none: a cache filled by another tool, or a huggingface_hub without the
    listing cache. Callers then go by the files on disk, which only loses some precision in
    messages (a missing file reads as not cached, or as absent).
    """
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        return None
    try:
        return {file.path for file in get_cached_repo_tree(repo, revision=commit)}
    except Exception:  # no listing cached for this commit: the same as having none
        return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_cached(repo: str) -> HubquantError:
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
    return HubquantError(
        f"{repo} is not in the local Hugging Face cache and {why}; "
        "download it once online (HF_HUB_OFFLINE unset), or pass a local folder"
    )


def _unreachable(repo: str, failure: BaseException) -> HubquantError:
    """The Hub did not answer at all: name the endpoint asked and the transport's reason."""
    if isinstance(failure, RuntimeError):  # the shared client, closed under a parallel download
        reason = "a connection failed during the download"
    else:
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    return HubquantError(
        f"cannot reach the Hub at {hub_endpoint()} to fetch {repo} ({reason}); "
        "check the network, or set HF_HUB_OFFLINE=1 to use the cache"
    )


def hub_endpoint() -> str:
    """The Hub endpoint huggingface_hub talks to (HF_ENDPOINT), without any user:password@."""

    from huggingface_hub import constants

    url = str(constants.ENDPOINT)
    parts = urlsplit(url)
    if parts.netloc and "@" in parts.netloc:
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return url


# Transport failures (no HTTP answer: DNS, refused or reset connection, timeout, proxy, TLS), by
# class name within the HTTP clients huggingface_hub has used; `TransportError` is httpx's base
# of them all, `ConnectionError` and `Timeout` are requests'.
_TRANSPORT_CLASSES = frozenset({"TransportError", "ConnectionError", "Timeout", "ProxyError", "SSLError"})
_HTTP_CLIENTS = frozenset({"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"})


def _in_chain(error: BaseException, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception `wanted` accepts down `error`'s chain of causes (itself first), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if wanted(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def _raised_by_http_client(error: BaseException) -> bool:
    """Whether `error` was raised inside an HTTP client library (its innermost frame)."""
    tb, module = error.__traceback__, ""
    while tb is not None:
        module, tb = str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_next
    return module.partition(".")[0] in _HTTP_CLIENTS


def transport_failure(error: BaseException) -> BaseException | None:
    """The failure to reach the Hub at all (no HTTP answer: DNS, refused or reset connection,
    timeout, proxy, TLS) down `error`'s chain of causes, or None. HTTP answers (401, 404, 5xx...),
    HF_HUB_OFFLINE and cache misses are not such failures. The one test of "no connection" that
    downloads (`_hub_errors`) and `hubquant push` share.

    Args:
        error: what a huggingface_hub call raised.
    """
    return _in_chain(error, _is_transport_failure)


def _is_transport_failure(error: BaseException) -> bool:
    from huggingface_hub import errors

    # OfflineModeIsEnabled is a ConnectionError, and HTTP answers are OSErrors: neither counts.
    if isinstance(
        error, (errors.OfflineModeIsEnabled, errors.HfHubHTTPError, errors.LocalEntryNotFoundError)
    ):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    if isinstance(error, RuntimeError) and _raised_by_http_client(error):
        # "Cannot send a request, as the client has been closed": huggingface_hub closes its shared
        # client when a request fails to connect, under the parallel downloads still using it.
        return True
    return any(
        cls.__name__ in _TRANSPORT_CLASSES and cls.__module__.partition(".")[0] in _HTTP_CLIENTS
        for cls in type(error).__mro__
    )


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
        # HF_HUB_OFFLINE and nothing cached: huggingface_hub raises LocalEntryNotFoundError from
        # OfflineModeIsEnabled (a ConnectionError): before the network failures.
        if _offline() or _in_chain(error, lambda e: isinstance(e, errors.OfflineModeIsEnabled)):
            if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
                raise _not_cached(repo) from error
        # No answer from the Hub (DNS, refused, timeout, proxy...), raised as is or as the cause of
        # a LocalEntryNotFoundError when nothing is cached.
        failure = transport_failure(error)
        if failure is not None:
            raise _unreachable(repo, failure) from error
        # An HTTP error answer (a 5xx after the retries), as is or behind a cache miss.
        answer = _in_chain(
            error,
            lambda e: (
                isinstance(e, errors.HfHubHTTPError) and not isinstance(e, errors.LocalEntryNotFoundError)
            ),
        )
        if answer is not None:
            first = str(answer).strip().splitlines()[0] if str(answer).strip() else type(answer).__name__
            status = getattr(getattr(answer, "response", None), "status_code", None)
            later = (
                "; the Hub is busy or down: try again later" if status == 429 or (status or 0) >= 500 else ""
            )
            raise HubquantError(f"Hub request for {repo} failed: {first}{later}") from error
        # Incomplete cached snapshots subclass EntryNotFoundError too.
        if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            raise _not_cached(repo) from error
        return False
