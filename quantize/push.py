"""Push a quantized folder to the Hugging Face Hub in one commit.

The folder is checked first (config.json with a quantization_config, README.md, safetensors), then
the repo is created if missing, the branch too when one is asked for, and every file goes up in a
single `create_commit`. (`upload_folder` is not used: with hf_xet installed it splits large uploads
into several commits.) The card's loading snippets get the repo id in the copy that is uploaded;
the local folder is not changed.

A variant that `hubquant eval` made (OUT/variants/NAME, OUT/results.json beside) goes up with its
figures: the uploaded card gets an Evaluation section with the variant's and the base's figures and
the `model-index` metadata the Hub reads (`card.add_evaluation`); `results=` names the results.json
of any other folder. That too is done in the uploaded copy only.

Errors are one line with the fix; "no connection" is recognised as downloads recognise it
(`hubquant.models.hub.transport_failure`).

The token comes from `HF_TOKEN` or the saved login, resolved by huggingface_hub. It is passed to
huggingface_hub only: never printed, logged or written, and scrubbed from every error message.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError
from hubquant.evaluate.results import read_results  # the one reader; light (no torch)
from hubquant.files import read_json
from hubquant.models.hub import hub_endpoint, transport_failure
from hubquant.quantize.registry import method_names

from .card import (
    CARD,
    REPORT,
    add_evaluation,
    fill_repo_id,
    human_bytes,
    is_repo_id,
    read_front_matter,
    result_rows,
    variant_row,
)

RESULTS = "results.json"

# Never uploaded: hidden files and folders (.git, .cache/huggingface, editor files...).
IGNORE = (".*", "*/.*")

_REQUANTIZE = "re-run `hubquant quantize --out`"
_LOGIN = "run `hf auth login` or set HF_TOKEN to a token with write access"


def _files(folder: Path) -> list[tuple[str, Path]]:
    """(path in the repo, local path) of every file to upload, sorted."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in IGNORE):
            found.append((relative, path))
    return found


def check_folder(folder: Path) -> tuple[str, str, list[tuple[str, Path]]]:
    """Check that `folder` is a quantized variant ready to push.

    Args:
        folder: the folder `hubquant quantize --out` wrote.

    Returns:
        (the method, the base model, the files to upload as (path in repo, local path)).

    Raises:
        HubquantError: one line naming what is missing.
    """
    redo = "push a folder written by `hubquant quantize --out`"
    if not folder.is_dir():
        raise HubquantError(f"{folder} is not a folder; {redo}")
    if not (folder / "config.json").is_file():
        raise HubquantError(f"{folder} has no config.json; {redo}")
    config = read_json(folder / "config.json", "config.json", _REQUANTIZE)
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or not quantization:
        raise HubquantError(f"{folder}/config.json has no quantization_config: it is not quantized; {redo}")
    if not (folder / CARD).is_file():
        raise HubquantError(f"{folder} has no {CARD} (model card); {redo}")
    files = _files(folder)
    if not any(name.endswith(".safetensors") for name, _ in files):
        raise HubquantError(f"{folder} has no .safetensors weights; {redo}")
    report = read_json(folder / REPORT, REPORT, _REQUANTIZE) if (folder / REPORT).is_file() else {}
    card = read_front_matter(folder / CARD)
    method = report.get("method") or quantization.get("quant_method") or "quantized"
    base = (
        report.get("base_model") or card.get("base_model") or config.get("_name_or_path") or "a local model"
    )
    return str(method), str(base), files


def _check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise HubquantError(
            f"--repo-id '{repo_id}' is not a Hub model id: write it as ORG/NAME (letters, digits, '-', '_', '.')"
        )


@dataclass(frozen=True)
class Figures:
    """A variant's measurements: the results.json they come from, and the variant's row name."""

    path: Path
    results: dict[str, Any]
    variant: str


def _read_results(path: Path) -> dict[str, Any]:
    return read_results(path)


def _check_row(figures: Figures, folder: Path) -> None:
    """Refuse a row measured on other settings than the folder's (quantization_report.json)."""
    report = read_json(folder / REPORT, REPORT, _REQUANTIZE) if (folder / REPORT).is_file() else {}
    row = variant_row(figures.results, [figures.variant]) or {}
    measured = row.get("method_settings")
    if not report or not isinstance(measured, dict):
        return
    method, settings = report.get("method"), report.get("settings") or {}
    differ = [f"method {measured['method']}"] if measured.get("method") not in (None, method) else []
    differ += [
        f"{key}={measured[key]}" for key in settings if key in measured and measured[key] != settings[key]
    ]
    if differ:
        held = ", ".join([f"method {method}", *(f"{key}={value}" for key, value in settings.items())])
        raise HubquantError(
            f"{figures.path}'s row {figures.variant} was measured with {', '.join(differ)}, but {folder} holds "
            f"{held}; pass --results with the results.json of the eval that measured this folder, or rerun "
            "`hubquant eval` on it"
        )


def find_results(folder: Path, method: str, results: str | Path | None = None) -> Figures | None:
    """The figures to put in the card of `folder`, a quantized variant.

    With `results`, that results.json's row of the variant: the row named as the folder, else as
    its method. Without, the figures of a folder `hubquant eval` made: OUT/results.json's row named
    as the folder, when the folder is OUT/variants/NAME; None when there is no such file or row.

    Args:
        folder: the quantized folder.
        method: its quantization method (quantization_report.json's).
        results: a results.json of `hubquant eval`.

    Raises:
        HubquantError: one line: `results` cannot be read or has no row for the variant, or the
            row was measured on other settings than the folder's.
    """
    if results is not None:
        path = Path(results).expanduser()
        data = _read_results(path)
        names = [name for name in dict.fromkeys((_variant_name(folder), method)) if name != "base"]
        row = variant_row(data, names)
        if row is None:
            rows = ", ".join(r["variant"] for r in result_rows(data)) or "none"
            raise HubquantError(
                f"{path} has no row for {' or '.join(names)} (its rows: {rows}); pass --results with the "
                f"results.json of the `hubquant eval` run that measured this variant (OUT/results.json, "
                f"beside OUT/variants/{folder.name}), or push without --results"
            )
    else:
        path = folder.parent.parent / RESULTS
        if folder.parent.name != "variants" or not path.is_file():
            return None
        try:
            data = _read_results(path)
        except HubquantError:  # not results of this hubquant: then no figures, as without a file
            return None
        row = variant_row(data, [_variant_name(folder)]) if folder.name != "base" else None
        if row is None:
            return None
    figures = Figures(path, data, row["variant"])
    _check_row(figures, folder)
    return figures


def _results_file(figures: Figures | None) -> list[tuple[str, Path]]:
    """The results.json quoted in the card, to be checked for the token as the files are."""
    return [(figures.path.name, figures.path)] if figures is not None else []


def _card_bytes(folder: Path, repo_id: str, figures: Figures | None = None) -> bytes:
    """The card as uploaded: the repo id in its snippets, and the figures when there are some."""
    card = (folder / CARD).read_text(encoding="utf-8")
    if figures is not None:
        try:
            card = add_evaluation(card, figures.results, figures.variant, repo_id=repo_id)
        except ValueError as error:
            raise HubquantError(
                f"cannot add the figures of {figures.path} to {folder / CARD}: {error}; fix the card, or "
                f"re-run `hubquant quantize --out` to write it again"
            ) from None
    return fill_repo_id(card, repo_id).encode("utf-8")


def dry_run_text(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    results: str | Path | None = None,
) -> str:
    """What `push` would do, as text: the repo, the commit message, where the figures come from,
    every file with its size, and the model card as it would be uploaded. Contacts nothing.

    Args:
        folder: the quantized folder.
        repo_id: the target repo (ORG/NAME).
        private: whether the repo would be created private.
        revision: the branch the commit would go to (default: main).
        results: the results.json whose figures go into the card (see `find_results`).
    """
    folder = Path(folder)
    _check_repo_id(repo_id)
    method, base, files = check_folder(folder)
    figures = find_results(folder, method, results)
    # The card is printed: a token in it (or in the results.json it quotes) would be too.
    _refuse_secrets([*files, *_results_file(figures)], _secrets(None))
    card = _card_bytes(folder, repo_id, figures)
    sizes = {name: (len(card) if name == CARD else path.stat().st_size) for name, path in files}
    width = max(len(human_bytes(size)) for size in sizes.values())
    lines = [
        f"dry run: nothing is sent. Would push {folder} to {repo_id} "
        f"({'private' if private else 'public'} if created), branch {revision or 'main'}, in one commit:",
        f"  {_commit_message(method, base)}",
        (
            f"figures in the card: {figures.variant} and the base, from {figures.path}"
            if figures is not None
            else f"figures in the card: none (no {RESULTS} of `hubquant eval` found; add them with --results PATH)"
        ),
        f"{len(files)} files, {human_bytes(sum(sizes.values()))}:",
        *(f"  {human_bytes(size):>{width}}  {name}" for name, size in sizes.items()),
        "",
        f"{CARD}:",
        card.decode("utf-8").rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


def _secrets(token: str | None) -> list[str]:
    """The Hub tokens in play (`token`, then HF_TOKEN or the saved login): kept to scrub messages
    and to check files against; never shown. Read locally, contacting nothing."""
    try:
        import huggingface_hub

        saved = huggingface_hub.get_token()
    except Exception:  # an unreadable token file is no reason to fail here
        saved = None
    # Anything shorter than a real token (hf_ and 34 characters) would match ordinary text.
    return [secret for secret in dict.fromkeys((token, saved)) if secret and len(secret) >= 8]


def _refuse_secrets(files: list[tuple[str, Path]], secrets: list[str]) -> None:
    """Refuse to upload (or print, in a dry run) a small file (config, card, tokenizer...) that
    holds the Hub token, or a file named with it."""
    for name, path in files:
        if any(secret in name for secret in secrets):
            raise HubquantError("a file in the folder is named with your Hub token; rename it before pushing")
        if name.endswith(".safetensors") or path.stat().st_size > 64 * 2**20:
            continue
        data = path.read_bytes()
        if any(secret.encode() in data for secret in secrets):
            raise HubquantError(f"{name} contains your Hub token; remove it from the file before pushing")


def _commit_message(method: str, base: str) -> str:
    return f"Add {method} quantization of {base} (hubquant)"


def _hub_error(error: BaseException, repo_id: str, revision: str | None, secrets: list[str]) -> HubquantError:
    """One line for a failed Hub call: what happened and what to do."""
    from huggingface_hub import errors

    org = repo_id.split("/")[0]
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.OfflineModeIsEnabled):
        message = "HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and retry"
    elif isinstance(error, errors.LocalTokenNotFoundError):
        message = f"not logged in to the Hugging Face Hub; {_LOGIN}"
    elif isinstance(error, errors.HfHubHTTPError) and status == 401:
        message = (
            f"the Hub refused the token (401: not logged in, or the token is invalid or expired); {_LOGIN}"
        )
    elif isinstance(error, errors.HfHubHTTPError) and status == 403:
        message = (
            f"no write access to '{org}' on the Hub (403); use a token with write permission for {org} "
            f"(a member's write token for an organization), or push to your own namespace"
        )
    elif isinstance(error, errors.RevisionNotFoundError):
        message = f"branch '{revision}' was not found in {repo_id} (404); check --revision"
    elif isinstance(error, errors.HfHubHTTPError) and status == 404:
        message = (
            f"{repo_id} was not found on the Hub (404); check that the namespace '{org}' exists and --repo-id"
        )
    elif isinstance(error, errors.HfHubHTTPError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = f"the Hub refused the push to {repo_id} ({status}): {first}"
    elif (failure := transport_failure(error)) is not None:
        message = (
            f"cannot reach the Hugging Face Hub (no connection: {type(failure).__name__}) at {hub_endpoint()}; "
            "check the network (or HF_ENDPOINT) and retry"
        )
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = f"pushing to {repo_id} failed: {type(error).__name__}: {first}"
    for secret in secrets:
        message = message.replace(secret, "***")
    return HubquantError(re.sub(r"\s+", " ", message))


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    api: Any = None,
    token: str | None = None,
    results: str | Path | None = None,
) -> str:
    """Upload a quantized folder to the Hub in one commit, creating the repo (and branch) if missing.

    The uploaded card carries the variant's figures and the base's (an Evaluation section and the
    `model-index` metadata) from `results`, or, for a folder `hubquant eval` made
    (OUT/variants/NAME), from OUT/results.json when it has the variant's row. The local folder is
    not changed.

    Args:
        folder: the folder `hubquant quantize --out` wrote (config.json with quantization_config,
            README.md, safetensors).
        repo_id: the target repo, ORG/NAME.
        private: create the repo private. An existing public repo is refused rather than pushed to.
        revision: the branch to commit to, created from main if missing (default: main).
        dry_run: print the file list and the card, contact nothing, and return that text.
        api: an `HfApi`-like object (default: `huggingface_hub.HfApi(token=token)`).
        token: a Hub token (default: `HF_TOKEN` or the saved login, as huggingface_hub resolves it).
        results: a `hubquant eval` results.json with a row for this variant (named as the folder,
            or as its method).

    Returns:
        The commit's URL (with `dry_run`: the text printed).

    Raises:
        HubquantError: one line for a bad folder or repo id, a results.json without the variant's
            row, a missing login, 401, 403, 404 or no connection.
    """
    folder = Path(folder).expanduser()
    if dry_run:
        text = dry_run_text(folder, repo_id, private=private, revision=revision, results=results)
        print(text, end="")
        return text
    _check_repo_id(repo_id)
    method, base, files = check_folder(folder)
    card_figures = find_results(folder, method, results)
    card = _card_bytes(folder, repo_id, card_figures)  # before any request
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd

    secrets = _secrets(token)  # kept to scrub error messages; never shown
    if api is None:
        token = token or huggingface_hub.get_token()
        if not token:
            raise HubquantError(f"not logged in to the Hugging Face Hub; {_LOGIN}")
        api = huggingface_hub.HfApi(token=token)
        auth: dict[str, Any] = {}
    else:
        auth = {"token": token} if token else {}
    _refuse_secrets([*files, *_results_file(card_figures)], secrets)
    message = _commit_message(method, base)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True, **auth)
        if private and not getattr(
            api.repo_info(repo_id=repo_id, repo_type="model", **auth), "private", True
        ):
            raise HubquantError(
                f"{repo_id} already exists and is public, and --private does not change an existing repo; "
                "make it private on the Hub first, or choose another --repo-id"
            )
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True, **auth)
        operations = [CommitOperationAdd(name, card if name == CARD else str(path)) for name, path in files]
        info = api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=operations,
            commit_message=message,
            commit_description=f"{len(files)} files from {folder.name}, made with hubquant.",
            revision=revision,
            **auth,
        )
    except HubquantError:
        raise
    except Exception as error:
        raise _hub_error(error, repo_id, revision, secrets) from error
    url = getattr(info, "commit_url", None) or str(info)
    return str(url)


def _variant_name(folder: Path) -> str:
    """The variant a folder under an eval's OUT/variants holds ("int4_g64" -> "int4:g64")."""
    name = folder.name
    return name.replace("_", ":") if name.split("_")[0] in method_names() else name
