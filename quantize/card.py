"""The model card (README.md) and quantization_report.json of a quantized variant.

The card is rendered with jinja2 from `templates/model_card.md.j2`. Every value the template prints
is escaped for Markdown and HTML unless it was built here as safe (the YAML front matter, which
`yaml.safe_dump` quotes, and table rows, escaped cell by cell), so a model name holding quotes,
colons, pipes or `<script>` can neither break the YAML nor inject markup.

Given a `hubquant eval` results.json and the variant's row name, the card has an Evaluation
section (how the figures were measured, the verdict, a table of the variant beside the base) and
the same figures as the Hub's `model-index` metadata. `add_evaluation` puts them into a card
written without them (what `push` uploads), rendering the template's `evaluation` block alone.

This module imports neither torch nor huggingface_hub at import time: `hubquant push --dry-run`
and the CLI's report summary use it without them. (The Hub is only asked for the base model's
README, to carry its license over, when the source folder does not have it.)
"""

from __future__ import annotations

import html
import json
import math
import re
import shlex
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant import __version__

from .registry import MethodInfo, methods

if TYPE_CHECKING:
    from .base import QuantReport

CARD = "README.md"
REPORT = "quantization_report.json"
TEMPLATE = "model_card.md.j2"

# The loading snippets name the model through this line. The card is written before the repo it
# goes to is known, so `push` fills in the repo id (`fill_repo_id`) in the copy it uploads.
REPO_PLACEHOLDER = "ORG/NAME"
_MODEL_ID_LINE = re.compile(r'^model_id = "ORG/NAME"[^\n]*$', re.MULTILINE)

# A Hub repo id: namespace/name, the characters the Hub allows, no "--" or ".." in it.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


# What the card shows of a hubquant results.json, for each kind of run (its `task`): the evaluation
# table's columns, and the metrics of the Hub metadata (`model-index`). The labels are kept here:
# this module does not import hubquant.evaluate.
@dataclass(frozen=True)
class _Column:
    key: str  # the row's field
    title: str  # "{k}" is the neighbours counted (an embedder's nn_k)
    kind: str  # "text", "float", "fraction", "rate" or "bytes"
    spread: str | None = None  # the field of its standard error (or deviation), shown as ±


@dataclass(frozen=True)
class _Metric:
    key: str  # the row's field
    type: str  # the Hub's metric type
    name: str
    against_base: bool = False  # it compares with the base: the base's own value (0, 1) says nothing
    spread: str | None = None  # the field of its standard error (or deviation), under `args`
    spread_name: str = "stderr"


_SIZE_COLUMNS = (
    _Column("disk_bytes", "on disk", "bytes"),
    _Column("weight_bytes", "weights in memory", "bytes"),
)
_COLUMNS: dict[str, tuple[_Column, ...]] = {
    "causal-lm": (
        _Column("variant", "variant", "text"),
        _Column("ppl", "perplexity", "float", "ppl_err"),
        _Column("kld_mean", "mean KL divergence to the base model", "float", "kld_err"),
        _Column("top1_agreement", "top-1 agreement with the base model", "fraction"),
        _Column("decode_tok_s", "decode, tok/s", "rate", "decode_sd"),
        *_SIZE_COLUMNS,
    ),
    "masked-lm": (
        _Column("variant", "variant", "text"),
        _Column("pppl", "pseudo-perplexity", "float", "pppl_err"),
        _Column("kld_mean", "mean KL divergence to the base model (masked tokens)", "float", "kld_err"),
        _Column("top1_agreement", "top-1 agreement with the base model (masked tokens)", "fraction"),
        _Column("encode_seq_s", "encode, sequences/s", "rate", "encode_sd"),
        *_SIZE_COLUMNS,
    ),
    "embedding": (
        _Column("variant", "variant", "text"),
        _Column("cos_mean", "mean cosine to the base's vectors", "float"),
        _Column("cos_min", "least cosine to the base's vectors", "float"),
        _Column("nn_agreement", "NN@{k} agreement with the base model", "fraction"),
        _Column("encode_seq_s", "encode, sequences/s", "rate", "encode_sd"),
        *_SIZE_COLUMNS,
    ),
}
_KLD = "Mean KL divergence to the base model{}, nats/token"
_ENCODE = _Metric(
    "encode_seq_s", "encode_sequences_per_second", "Encode speed, sequences/s", False, "encode_sd", "sd"
)
_DISK = _Metric("disk_bytes", "disk_bytes", "Checkpoint size on disk, bytes")
_METRICS: dict[str, tuple[_Metric, ...]] = {
    "causal-lm": (
        _Metric("ppl", "perplexity", "Perplexity", spread="ppl_err"),
        _Metric("kld_mean", "kl_divergence", _KLD.format(""), True, "kld_err"),
        _Metric("top1_agreement", "top1_agreement", "Top-1 agreement with the base model", True),
        _Metric(
            "decode_tok_s", "decode_tokens_per_second", "Decode speed, tokens/s", False, "decode_sd", "sd"
        ),
        _DISK,
    ),
    "masked-lm": (
        _Metric("pppl", "pseudo_perplexity", "Pseudo-perplexity", spread="pppl_err"),
        _Metric("kld_mean", "kl_divergence", _KLD.format(" on masked tokens"), True, "kld_err"),
        _Metric(
            "top1_agreement", "top1_agreement", "Top-1 agreement with the base model on masked tokens", True
        ),
        _ENCODE,
        _DISK,
    ),
    "embedding": (
        _Metric("cos_mean", "cosine_similarity", "Mean cosine to the base model's sentence vectors", True),
        _Metric(
            "cos_min", "cosine_similarity_min", "Least cosine to the base model's sentence vectors", True
        ),
        _Metric("nn_agreement", "nn_agreement", "NN@{k} agreement with the base model", True),
        _ENCODE,
        _DISK,
    ),
}
# The Hub's task for each kind of run; the method's settings that go with a (pseudo-)perplexity
# into its metric's `args`; the Hub dataset each named evaluation text comes from.
_HUB_TASKS = {"causal-lm": "text-generation", "masked-lm": "fill-mask", "embedding": "feature-extraction"}
_PPL_ARGS = (
    "ppl_method",
    "ctx",
    "stride",
    "windows",
    "tokens_scored",
    "mask_rate",
    "mask_seed",
    "tokens_masked",
)
_HUB_DATASETS = {
    "wikitext2": {"type": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"},
}

_LICENSE_KEYS = ("license", "license_name", "license_link")

# Encoder architectures: the Hub pipeline tag, and the Linears outside the layers that stay in the
# base dtype (the masked-LM decoder among them unless the head was quantized). A decoder is a
# text-generation model whose one such Linear is its output head.
_MLM_DECODER = "the masked-LM decoder"
_ENCODERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "BertModel": ("feature-extraction", ("the pooler",)),
    "BertForMaskedLM": ("fill-mask", ("the masked-LM transform", _MLM_DECODER)),
    "BertForPreTraining": (
        "fill-mask",
        ("the pooler", "the masked-LM transform", _MLM_DECODER, "the next-sentence head"),
    ),
}


def _task(base_config: Mapping[str, Any], head_quantized: bool) -> tuple[str, str, str]:
    """(the pipeline tag, what besides the projections stays in the base dtype, what became of the
    output head), from the base model's architecture and whether its output head was quantized."""
    archs = base_config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else ""
    tag, heads = _ENCODERS.get(arch, ("text-generation", ("the output head",)))
    head = "quantized" if head_quantized else "kept in the base dtype"
    if not any(h in ("the output head", _MLM_DECODER) for h in heads):
        head = "none (a bare encoder)"
    if head_quantized:
        heads = tuple(h for h in heads if h not in ("the output head", _MLM_DECODER))
    kept = ["embeddings", "norms", *heads]
    return tag, f"{', '.join(kept[:-1])} and {kept[-1]}", head


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def md_escape(value: Any) -> str:
    """Text that Markdown and HTML show literally: `<`, `>`, `&` become entities, Markdown
    punctuation (`*`, `_`, backticks, brackets, `|`, `#`, backslash) is backslash-escaped, and
    line breaks become spaces, so a value fits in one table cell.

    Args:
        value: anything; it is turned into text with `str`.
    """
    text = " ".join(str(value).split()) if value is not None else ""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def is_repo_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub model id (`namespace/name`).

    Args:
        name: the candidate.
    """
    return bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name


def human_bytes(count: int) -> str:
    """`count` bytes in B, kB, MB or GB (powers of 1000, as the Hub shows sizes).

    Args:
        count: a number of bytes.
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def report_dict(report: QuantReport | Mapping[str, Any]) -> dict[str, Any]:
    """A report as plain data: `QuantReport.to_dict()`, or a dict read from quantization_report.json.

    Args:
        report: a `QuantReport` or its dict.
    """
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    data.setdefault("settings", {})
    data.setdefault("layers", [])
    data.setdefault("library", "?")
    data.setdefault("library_version", "?")
    return data


def _runtime(layer: Mapping[str, Any]) -> int:
    # A skipped layer keeps its base-dtype weight: it holds at run time what it takes on disk.
    return int(layer.get("runtime_bytes") or layer.get("disk_bytes") or 0)


def _bf16_bytes(layer: Mapping[str, Any]) -> int:
    out_features, in_features = layer["shape"]
    return 2 * int(out_features) * int(in_features)


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items()) or "defaults"


def calibration_lines(record: Mapping[str, Any]) -> list[str]:
    """A calibrated method's record (`quantization_report.json` settings["calibration"]) in a few
    sentences for the card: what text, which tokens, how many sequences, and what it bought per layer."""
    if not record:
        return []
    lines = [
        f"Calibration text: {record.get('text', 'unknown')}"
        + (f" (sha256 {str(record['sha256'])[:12]}...)" if record.get("sha256") else "")
        + f"; {record.get('samples')} sequences of {record.get('length')} tokens, seed {record.get('seed')}."
    ]
    if record.get("token_range"):
        start, end = record["token_range"]
        lines.append(f"Tokens {start:,} to {end:,} of that text: {record.get('rule', '')}.")
    if record.get("layers_better_than_rtn"):
        lines.append(
            "Squared error of each layer's outputs on the calibration inputs, against round-to-nearest "
            f"on the same grid: median {record.get('output_error_vs_rtn_median')}x, worst "
            f"{record.get('output_error_vs_rtn_worst')}x; lower than round-to-nearest in "
            f"{record['layers_better_than_rtn']} layers."
        )
    if record.get("scaled_groups") is not None:  # what AWQ chose
        chose = f"AWQ scaled {record['scaled_groups']} input groups"
        if record.get("exponent_median") is not None:
            low, high = record.get("exponent_range") or ("?", "?")
            chose += f" (exponent median {record['exponent_median']}, from {low} to {high})"
        if record.get("clipped_weight_groups") is not None:
            chose += f"; its clipping search narrowed the grid of {record['clipped_weight_groups']:.1%} of the weight groups"
            if record.get("clip_share_mean"):
                chose += f", to {record['clip_share_mean']:.0%} of their range on average"
        lines.append(chose + ".")
    return lines


def _shape_text(shape: Any) -> str:
    return " x ".join(str(n) for n in shape)


def report_summary(report: QuantReport | Mapping[str, Any]) -> str:
    """What a quantization did, in a few lines for the terminal: the method and its settings, how
    many layers were quantized and skipped (each skipped one with its reason), and the bytes.

    Args:
        report: a `QuantReport` or its dict.
    """
    data = report_dict(report)
    layers = data["layers"]
    skipped = [layer for layer in layers if layer.get("skipped")]
    lines = [
        f"method: {data['method']} ({data['library']} {data['library_version']}); "
        f"settings: {_settings_text(data['settings'])}",
    ]
    per_layer = Counter(_settings_text(layer["settings"]) for layer in layers if not layer.get("skipped"))
    if len(per_layer) > 1:
        lines.append(
            "per layer: " + "; ".join(f"{text}: {n} layers" for text, n in sorted(per_layer.items()))
        )
    lines.append(f"quantized: {len(layers) - len(skipped)} layers; skipped: {len(skipped)}")
    for layer in skipped:
        lines.append(f"  skipped {layer['name']} ({_shape_text(layer['shape'])}): {layer['skipped']}")
    disk = sum(int(layer.get("disk_bytes", 0)) for layer in layers)
    runtime = sum(_runtime(layer) for layer in layers)
    bf16 = sum(_bf16_bytes(layer) for layer in layers)
    lines.append(
        f"projection weights: {human_bytes(disk)} on disk ({disk} bytes), {human_bytes(runtime)} at run "
        f"time ({runtime} bytes); {human_bytes(bf16)} in bf16"
    )
    return "\n".join(lines)


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card, or {} when there is none (or it is bad)."""
    import yaml

    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", text, re.DOTALL | re.MULTILINE)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_front_matter(card: Path) -> dict[str, Any]:
    """The YAML metadata of a model card file, or {} when it has none or cannot be read.

    Args:
        card: a README.md.
    """
    try:
        return _front_matter(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}


def _hub_license(repo_id: str) -> dict[str, Any]:
    """The license fields of a Hub model's card: from the HF cache's README.md, else one request
    for the model's info (10 s at most, skipped when HF_HUB_OFFLINE is set); never an error."""
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, CARD)
        if isinstance(cached, str):
            return read_front_matter(Path(cached))
        if constants.HF_HUB_OFFLINE:
            return {}
        card = HfApi().model_info(repo_id, timeout=10).card_data
        return {key: getattr(card, key, None) for key in _LICENSE_KEYS} if card is not None else {}
    except Exception:  # no card, no network, gated...: the license is then left out
        return {}


def _license(base_model: str, source_folder: Path | None) -> dict[str, Any]:
    """The base model's `license` (with `license_name` and `license_link` when it is "other"), from
    the source folder's README.md, else from the Hub's card of a Hub model; {} when unknown."""
    meta: dict[str, Any] = {}
    if source_folder is not None:
        meta = read_front_matter(Path(source_folder) / CARD)
    hub_id, _ = _base_identity(base_model)
    if not meta.get("license") and hub_id is not None:
        meta = _hub_license(hub_id)
    if not isinstance(meta.get("license"), str) or not meta["license"].strip():
        return {}
    return {key: meta[key] for key in _LICENSE_KEYS if isinstance(meta.get(key), str)}


def _base_identity(base_model: str) -> tuple[str | None, str]:
    """(the Hub id of the base model or None, the name to show). A local folder is named by its
    last component only: its full path (home folder, user name) is nobody's business on the Hub."""
    local = Path(base_model).expanduser()
    looks_local = base_model.startswith((".", "/", "~")) or "\\" in base_model or local.exists()
    if is_repo_id(base_model) and not looks_local:
        return base_model, base_model
    return None, local.absolute().name or "local checkpoint"


def _base_dtype(folder: Path | None, base_config: Mapping[str, Any]) -> str:
    config: Mapping[str, Any] = base_config
    if folder is not None and (Path(folder) / "config.json").is_file():
        try:
            config = json.loads((Path(folder) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
    value = config.get("dtype") or config.get("torch_dtype") or base_config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else "the base dtype"


def _number(value: Any) -> int | float | None:
    """`value` when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _format_result(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "text" or _number(value) is None:
        return str(value)
    if kind == "fraction" and 0 <= value <= 1:
        return f"{100 * value:.2f}%"
    if kind == "rate":
        return f"{value:.1f}"
    if kind == "bytes":
        return human_bytes(int(value))
    return f"{value:.4g}"


def _cell(row: Mapping[str, Any], column: _Column) -> str:
    text = _format_result(row.get(column.key), column.kind)
    spread = _number(row.get(column.spread)) if column.spread else None
    if spread is not None and _number(row.get(column.key)) is not None:
        text += " ± " + (f"{spread:.1f}" if column.kind == "rate" else f"{spread:.2g}")
    return text


def _task_of(results: Mapping[str, Any]) -> str:
    """The kind of run: "causal-lm" (also files without the marker), "masked-lm" or "embedding"."""
    task = results.get("task")
    return task if isinstance(task, str) and task in _COLUMNS else "causal-lm"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def result_rows(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The rows of a results.json that name their variant.

    Args:
        results: a hubquant results.json as a dict.
    """
    rows = results.get("rows")
    return [
        row
        for row in (rows if isinstance(rows, list) else [])
        if isinstance(row, Mapping) and isinstance(row.get("variant"), str)
    ]


def variant_row(results: Mapping[str, Any], names: list[str]) -> Mapping[str, Any] | None:
    """The row of the first of `names` that a results.json has a row for, or None.

    Args:
        results: a hubquant results.json as a dict.
        names: the variant's names to look for, in order (the base is a variant too).
    """
    rows = {row["variant"]: row for row in result_rows(results)}
    return next((rows[name] for name in names if name in rows), None)


def _base_label(row: Mapping[str, Any]) -> str:
    dtype = _mapping(row.get("method_settings")).get("dtype")
    return f"base model, {dtype}" if isinstance(dtype, str) else "base model"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


_PPL_METHODS = {
    "chunks": "llama.cpp's chunks (the second half of each window scored)",
    "sliding": "sliding windows (the transformers guide's)",
}


def _notes(results: Mapping[str, Any], task: str) -> list[str]:
    """How the figures were measured, in sentences: the run, the text and its hash, the method,
    the speed runs and the run's verdict. (An older, hand-made `method` string is said as is.)"""
    method = results.get("method")
    if isinstance(method, str):
        return [f"Measured by hubquant: {method}."]
    if not isinstance(method, Mapping):
        return []
    notes = []
    env = _mapping(results.get("environment"))
    model = _mapping(results.get("model")).get("id")
    run = "Measured by hubquant eval" + (f" (hubquant {env['hubquant']})" if env.get("hubquant") else "")
    if isinstance(model, str) and model:
        run += f" of {_base_identity(model)[1]}"  # a local path is named by its last part only
    if env.get("device"):
        where = [str(env[key]) for key in ("device_name",) if env.get(key)]
        where += [f"{env['threads']} threads"] if env.get("threads") else []
        where += [f"{lib} {env[lib]}" for lib in ("torch", "torchao", "bitsandbytes") if env.get(lib)]
        run += f" on {env['device']}" + (f" ({', '.join(where)})" if where else "")
    notes.append(run + (f", {results['created']}." if results.get("created") else "."))
    dataset = _mapping(results.get("dataset"))
    if dataset.get("name"):
        text = f"Text: {dataset['name']}"
        text += f", {_count(dataset['chars'])} characters" if dataset.get("chars") is not None else ""
        notes.append(text + (f", sha256 {dataset['sha256']}." if dataset.get("sha256") else "."))
    get = method.get
    if task == "causal-lm":
        how = f"Perplexity: {_PPL_METHODS.get(str(get('ppl_method')), get('ppl_method') or 'windows')}"
        if get("windows") is not None and get("ctx") is not None:
            how += f", {_count(get('windows'))} windows of {_count(get('ctx'))} tokens"
        how += f", stride {_count(get('stride'))}" if get("stride") is not None else ""
        how += f", {_count(get('tokens_scored'))} tokens scored" if get("tokens_scored") is not None else ""
        how += f"; BOS {get('bos')}" if get("bos") else ""
        how += f"; {get('dtype')} activations" if get("dtype") else ""
        how += f", log-softmax in {get('log_softmax')}" if get("log_softmax") else ""
        notes.append(how + "; ± is the standard error.")
        if get("kld"):
            notes.append(
                f"KL divergence: {get('kld')}, nats per token; top-1 agreement: the share of scored "
                "tokens whose most likely next token is the base model's."
            )
        if get("speed_runs"):
            notes.append(
                f"Decode: {_count(get('decode_tokens'))} tokens generated, mean ± sd of "
                f"{_count(get('speed_runs'))} runs" + (f" ({get('decode')})." if get("decode") else ".")
            )
    elif task == "masked-lm":
        how = f"Pseudo-perplexity: {get('pppl_method') or 'masked tokens scored'}"
        if get("windows") is not None and get("ctx") is not None:
            how += f"; {_count(get('windows'))} windows of {_count(get('ctx'))} tokens"
        if get("tokens_masked") is not None:
            how += f", {_count(get('tokens_masked'))} tokens masked"
            if _number(get("mask_rate")) is not None:
                how += f" ({get('mask_rate'):.0%} per window, seed {get('mask_seed')})"
        how += f"; {get('dtype')} activations" if get("dtype") else ""
        notes.append(how + "; ± is the standard error.")
        if get("kld"):
            notes.append(
                f"KL divergence: {get('kld')}, nats per token; top-1 agreement over the masked tokens."
            )
    else:
        how = f"Sentences: {_count(get('sentences'))}" if get("sentences") is not None else "Sentences"
        how += f" ({get('sentence_rule')})" if get("sentence_rule") else ""
        how += f"; pooling: {get('pooling')}" if get("pooling") else ""
        how += f"; cosine: {get('cosine')}" if get("cosine") else ""
        k = get("nn_k") or 10
        notes.append(
            how + f"; NN@{k}: the overlap of each sentence's {k} nearest neighbours under the variant "
            "and under the base model."
        )
    if task != "causal-lm" and get("speed_runs"):
        notes.append(
            f"Encode: sequences/s at batch {_count(get('encode_batch'))} x {_count(get('encode_length'))} "
            f"tokens, over {_count(get('speed_runs'))} runs, ± sd."
        )
    verdict = _mapping(results.get("verdict")).get("text")
    if verdict:
        names = [row["variant"] for row in result_rows(results)]
        over = f" over {', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else ""
        notes.append(f"Verdict of the run{over}: {verdict}")
    return notes


def _evaluation(results: Mapping[str, Any] | None, variant: str | None = None) -> dict[str, Any] | None:
    """The evaluation section's data from a hubquant results.json: how it was measured, and a table
    of the columns of its kind of run that a shown row has. The rows shown are `variant`'s and the
    base's when `variant` is given (None when results.json has no row for it), else all."""
    if not results:
        return None
    rows = result_rows(results)
    if variant is not None:
        row = variant_row(results, [variant])
        if row is None:
            return None
        rows = [r for r in (variant_row(results, ["base"]), row) if r is not None]
    if not rows:
        return None
    task = _task_of(results)
    columns = [column for column in _COLUMNS[task] if any(column.key in row for row in rows)]
    if len(columns) < 2:
        return None
    k = _mapping(results.get("method")).get("nn_k") or 10

    def label(row: Mapping[str, Any]) -> str:
        dtype = _mapping(row.get("method_settings")).get("dtype")
        if variant is not None and row["variant"] == variant:
            return f"{variant} (this model)"
        if row["variant"] == "base" and isinstance(dtype, str):
            return f"base ({dtype})"
        return row["variant"]

    return {
        "notes": _notes(results, task),
        "header": [column.title.format(k=k) for column in columns],
        "rows": [
            [label(row) if column.key == "variant" else _cell(row, column) for column in columns]
            for row in rows
        ],
    }


def _model_index(results: Mapping[str, Any], variant: str, name: str) -> list[dict[str, Any]] | None:
    """The Hub's `model-index` metadata of `variant`: one result (the task, the dataset) whose
    metrics are the variant's figures and the base's, each named with whose it is, values as in
    results.json. None when results.json has no row for `variant` or names no dataset."""
    row = variant_row(results, [variant])
    dataset = _mapping(results.get("dataset")).get("name")
    if row is None or not isinstance(dataset, str) or not dataset:
        return None
    task = _task_of(results)
    method = _mapping(results.get("method"))
    k = method.get("nn_k") or 10
    metrics = []
    for whose, current in ((variant, row), (None, variant_row(results, ["base"]))):
        if current is None:
            continue
        for metric in _METRICS[task]:
            value = _number(current.get(metric.key))
            if value is None or (whose is None and metric.against_base):
                continue
            entry: dict[str, Any] = {
                "type": metric.type,
                "value": value,
                "name": f"{metric.name.format(k=k)} ({whose or _base_label(current)})",
            }
            args: dict[str, Any] = {}
            spread = _number(current.get(metric.spread)) if metric.spread else None
            if spread is not None:
                args[metric.spread_name] = spread
            if metric.key in ("ppl", "pppl"):
                args.update(
                    (key, method[key])
                    for key in _PPL_ARGS
                    if isinstance(method.get(key), (str, int, float)) and not isinstance(method[key], bool)
                )
            if args:
                entry["args"] = args
            metrics.append(entry)
    if not metrics:
        return None
    hub_dataset: dict[str, Any] = {"name": dataset, "type": dataset, **_HUB_DATASETS.get(dataset, {})}
    sha256 = _mapping(results.get("dataset")).get("sha256")
    if isinstance(sha256, str) and sha256:
        hub_dataset["args"] = {"sha256": sha256}  # the exact text scored
    result: dict[str, Any] = {"task": {"type": _HUB_TASKS[task]}, "dataset": hub_dataset, "metrics": metrics}
    entry: dict[str, Any] = {"name": name, "results": [result]}
    verdict = _mapping(results.get("verdict")).get("text")
    if isinstance(verdict, str) and verdict:
        entry["verdict"] = verdict  # the run's recommendation (the Hub's parser reads past it)
    return [entry]


def _index_name(repo_id: str | None, base_name: str, variant: str) -> str:
    """The model's name in `model-index`: the repo's name, else the base's with the variant."""
    if repo_id and is_repo_id(repo_id):
        return repo_id.split("/")[-1]
    return f"{base_name}-{variant}"


def _checkpoint_bytes(folder: Path | None) -> int:
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def _environment() -> Any:
    import jinja2
    from markupsafe import Markup

    def finalize(value: Any) -> Any:
        return value if isinstance(value, Markup) else Markup(md_escape(value))

    def row(cells: list[Any]) -> Markup:
        return Markup("| " + " | ".join(md_escape(cell) for cell in cells) + " |")

    def separator(columns: int) -> Markup:
        return Markup("|" + "---|" * columns)

    env = jinja2.Environment(
        autoescape=False,  # `finalize` escapes every printed value for Markdown instead
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["row"] = row
    env.filters["separator"] = separator
    return env


def _template() -> Any:
    text = resources.files(__package__).joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    return _environment().from_string(text)


def render_card(
    *,
    base_model: str,
    base_config: Mapping[str, Any],
    report: QuantReport | Mapping[str, Any],
    source_folder: Path | None = None,
    results: Mapping[str, Any] | None = None,
    folder: Path | None = None,
    repo_id: str | None = None,
    variant: str | None = None,
) -> str:
    """The model card of a quantized variant, as text (what `write_card` writes to README.md).

    Args:
        base_model: the Hub id of the model that was quantized, or the local folder it came from
            (then only the folder's name is shown, and no `base_model` metadata is written).
        base_config: the base model's config.json.
        report: what the quantization did (`QuantReport` or its dict).
        source_folder: the base checkpoint's folder; its README.md gives the license.
        results: a hubquant results.json dict; its rows become the evaluation table.
        folder: the quantized folder, when written: its config.json gives the base dtype and its
            safetensors files the checkpoint size.
        repo_id: the repo the card goes to, for the loading snippets (default: a placeholder that
            `push` fills in).
        variant: this variant's row in `results`: then the table shows it beside the base, and
            its figures and the base's go into the `model-index` metadata (default: every row in
            the table, no `model-index`).
    """
    from markupsafe import Markup

    data = report_dict(report)
    method = methods().get(data["method"]) or MethodInfo(
        data["method"], "", data["library"], 0, data["method"], "", ""
    )
    hub_id, base_name = _base_identity(base_model)
    layers = data["layers"]
    skipped = [layer for layer in layers if layer.get("skipped")]
    head_quantized = any(layer["name"] == "lm_head" and not layer.get("skipped") for layer in layers)

    tags = ["hubquant", data["method"], data["library"]]
    if method.bits:
        tags.append(f"{method.bits}-bit")
    tags = list(dict.fromkeys(str(tag) for tag in tags if tag and tag != "?"))
    meta: dict[str, Any] = {}
    if hub_id is not None:
        meta.update(base_model=hub_id, base_model_relation="quantized")
    meta["library_name"] = "transformers"
    meta.update(_license(base_model, source_folder))
    meta["tags"] = tags
    pipeline_tag, kept, head = _task(base_config, head_quantized)
    if head_quantized and data["settings"].get("head"):  # `--head int8`: its own method
        head = f"quantized with {data['settings']['head']} (the projections with {data['method']})"
    meta["pipeline_tag"] = pipeline_tag
    model_id = repo_id if repo_id and is_repo_id(repo_id) else None
    index = (
        _model_index(results, variant, _index_name(model_id, base_name, variant))
        if results and variant
        else None
    )
    if index:
        meta["model-index"] = index

    settings_rows = [
        ["method", f"{data['method']}: {method.title}"],
        ["library", f"{data['library']} {data['library_version']}"],
        *(
            [key, "default" if value is None else value]
            for key, value in data["settings"].items()
            if key not in ("calibration", "head")  # the head's method is its own row
        ),
        ["quantized layers", f"{len(layers) - len(skipped)} of {len(layers)}"],
        ["output head", head],
    ]
    per_layer = Counter(_settings_text(layer["settings"]) for layer in layers if not layer.get("skipped"))
    disk = sum(int(layer.get("disk_bytes", 0)) for layer in layers)
    runtime = sum(_runtime(layer) for layer in layers)
    bf16 = sum(_bf16_bytes(layer) for layer in layers)
    files = _checkpoint_bytes(folder)
    size_rows = [
        ["projection weights on disk", human_bytes(disk), f"{disk:,}"],
        ["projection weights at run time (hubquant)", human_bytes(runtime), f"{runtime:,}"],
        ["the same weights in bf16", human_bytes(bf16), f"{bf16:,}"],
    ]
    if files:
        size_rows.append(
            ["checkpoint files (every tensor, embeddings included)", human_bytes(files), f"{files:,}"]
        )

    if hub_id is not None:
        base_link = Markup(f"[{md_escape(hub_id)}](https://huggingface.co/{hub_id})")
    else:
        base_link = Markup(f"the local checkpoint {md_escape(base_name)}")
    model_id_line = (
        f"model_id = {json.dumps(model_id)}"
        if model_id
        else f'model_id = "{REPO_PLACEHOLDER}"  # this repository once pushed, or the local folder'
    )
    reproduce = None
    if hub_id is not None:
        command = ["hubquant", "quantize", hub_id, "--method", str(data["method"])]
        settings = data["settings"]
        if settings.get("group_size") is not None:
            command += ["--group-size", str(settings["group_size"])]
        if settings.get("hqq") is True:
            command.append("--hqq")
        if settings.get("head"):
            command += ["--head", str(settings["head"])]
        elif head_quantized:
            command.append("--include-head")
        command += ["--out", (model_id or f"{hub_id}-{data['method']}").split("/")[-1]]
        # Only Hub ids and settings reach the shell line; backticks could still close the fence.
        reproduce = " ".join(shlex.quote(part) for part in command)
        if "`" in reproduce:
            reproduce = None

    return _template().render(
        front_matter=Markup(_yaml(meta)),
        title=f"{base_name} ({data['method']}, {data['library']})",
        method={
            "title": method.title,
            "about": Markup(method.about),  # constants of this module, written as Markdown
            "sizes": Markup(method.sizes),
            "repacks": method.repacks,
        },
        base_link=base_link,
        hubquant_version=__version__,
        report=data,
        skipped=[[layer["name"], _shape_text(layer["shape"]), layer["skipped"]] for layer in skipped],
        kept=kept,
        base_dtype=_base_dtype(folder, base_config),
        settings_rows=settings_rows,
        calibration=calibration_lines(_mapping(data["settings"].get("calibration"))),
        per_layer=[[text, count] for text, count in sorted(per_layer.items())],
        size_rows=size_rows,
        evaluation=_evaluation(results, variant),
        model_id_line=Markup(model_id_line),
        pipeline_tag=pipeline_tag,
        reproduce=Markup(reproduce) if reproduce else None,
    )


def write_card(
    folder: Path,
    *,
    base_model: str,
    base_config: dict,
    report: QuantReport,
    source_folder: Path | None = None,
    results: dict | None = None,
) -> None:
    """Write the model card (README.md) and quantization_report.json into a quantized folder.

    The report file holds `report.to_dict()` (settings, every layer with its shape, settings,
    bytes and skip reason) plus `base_model`, so that tools read the facts as data.

    Args:
        folder: the quantized folder (config.json and the shards already written).
        base_model: the Hub id of the model that was quantized, or its local folder.
        base_config: the base model's config.json.
        report: what the quantization did.
        source_folder: the base checkpoint's folder; its README.md gives the license.
        results: a hubquant results.json dict; its rows become the evaluation table.
    """
    folder = Path(folder)
    hub_id, base_name = _base_identity(base_model)
    data = {"base_model": hub_id or base_name, **report_dict(report)}
    (folder / REPORT).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    card = render_card(
        base_model=base_model,
        base_config=base_config,
        report=report,
        source_folder=source_folder,
        results=results,
        folder=folder,
    )
    (folder / CARD).write_text(card, encoding="utf-8")


def fill_repo_id(card: str, repo_id: str) -> str:
    """The card with its loading snippets pointing at `repo_id` instead of the placeholder.

    Args:
        card: README.md text written by `write_card`.
        repo_id: the Hub repo the card goes to.
    """
    return _MODEL_ID_LINE.sub(lambda _: f"model_id = {json.dumps(repo_id)}", card)


_FRONT_MATTER_BLOCK = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.DOTALL | re.MULTILINE)
_EVALUATION_SECTION = re.compile(r"^## Evaluation[ \t]*\r?\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
_USAGE_HEADING = re.compile(r"^## How to use[ \t]*$", re.MULTILINE)


def add_evaluation(card: str, results: Mapping[str, Any], variant: str, *, repo_id: str | None = None) -> str:
    """The card with the figures of `variant` and of the base from a results.json: its Evaluation
    section (replacing one already there, else put before "How to use") and its `model-index`
    metadata, as `render_card(results=..., variant=...)` writes them. The rest of the card, edits
    included, is kept.

    Args:
        card: README.md text (written by `write_card`, or edited since).
        results: a hubquant results.json as a dict.
        variant: the variant's row in `results`.
        repo_id: the repo the card goes to, which names the model in `model-index`.

    Raises:
        ValueError: `results` has no row for `variant`, or the card's YAML front matter is not a
            mapping.
    """
    import yaml

    evaluation = _evaluation(results, variant)
    if evaluation is None:
        raise ValueError(f"no figures of {variant} in the results")
    meta: dict[str, Any] = {}
    body = card
    match = _FRONT_MATTER_BLOCK.match(card)
    if match:
        try:
            meta = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"its YAML front matter cannot be read ({str(error).splitlines()[0]})") from None
        if not isinstance(meta, dict):
            raise ValueError("its YAML front matter is not a mapping of keys to values")
        body = card[match.end() :]
    meta.pop("model-index", None)
    base = meta.get("base_model")
    base_name = base.split("/")[-1] if isinstance(base, str) and base else "model"
    index = _model_index(results, variant, _index_name(repo_id, base_name, variant))
    if index:
        meta["model-index"] = index
    template = _template()
    section = "".join(template.blocks["evaluation"](template.new_context({"evaluation": evaluation})))
    body = _EVALUATION_SECTION.sub("", body, count=1)
    usage = _USAGE_HEADING.search(body)
    if usage:
        body = f"{body[: usage.start()]}{section}\n{body[usage.start() :]}"
    else:
        body = f"{body.rstrip()}\n\n{section}"
    return f"---\n{_yaml(meta)}---\n{body}" if meta else body
