"""What every evaluation task is: a small object the driver runs and the reports read.

A task (`Task`) says which checkpoints it applies to, checks the settings that concern it, prepares
its inputs from the text once, measures a variant against the base (`measure(model, base)` ->
figures by name), judges a row against its budget, and prints a row as one line. Its figures
(`Figure`: name, column, label, unit, what it means) and the labels of its method settings
(`Label`) are what the CSV and HTML reports show: the numbers and their words live in one file.

Nothing here loads torch: the reports (and `hubquant --help`) read the declarations; the tasks'
measuring code loads torch when it runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from hubquant.evaluate.settings import DEFAULT_MAX_KLD, DEFAULT_MIN_TOP1

if TYPE_CHECKING:
    from hubquant.evaluate.data import Text
    from hubquant.evaluate.results import Row
    from hubquant.evaluate.settings import EvalSettings
    from hubquant.models.checkpoint import Checkpoint

MB = 1e6  # a megabyte here is 10^6 bytes


@dataclass(frozen=True)
class Figure:
    """One measured figure of a row, with its unit.

    Args:
        key: its name in a row (and in results.json's rows).
        column: the CSV column name, its unit in parentheses.
        label: the HTML table's header.
        unit: the unit as shown after a value ("" when the figure has none).
        scale: multiplies the stored value (bytes -> MB, fraction -> %).
        err_key: the name of its standard error or standard deviation, if any.
        err_column: the CSV column name of that error.
        meaning: what the figure is, for the HTML report's glossary ("" when the label says it).
        digits: significant digits shown when the figure has no error (cosines need more than 4).
    """

    key: str
    column: str
    label: str
    unit: str = ""
    scale: float = 1.0
    err_key: str | None = None
    err_column: str | None = None
    meaning: str = ""
    digits: int = 4


@dataclass(frozen=True)
class Label:
    """How the report names one setting of a run's `method` or `budget`.

    Args:
        label: the words shown for the key.
        unit: shown after the value; a unit starting with "%" shows a fraction as a percentage.
        values: words shown in place of the unit for particular values (what a method name means).
    """

    label: str
    unit: str = ""
    values: Mapping[str, str] = field(default_factory=dict)

    @property
    def percent(self) -> bool:
        return self.unit.startswith("%")


def setting_text(value: Any, percent: bool = False) -> str:
    """A setting's value as the report shows it ("—" for none; a fraction as % when asked)."""
    if value is None:
        return "—"
    if percent and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100 * value:g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def fmt(value: float | None, spec: str) -> str:
    """A figure in a printed line ("n/a" when it was not measured)."""
    return "n/a" if value is None else format(value, spec)


# -- figures every task shows: size, load time and memory, measured by the driver ---------------

DISK = Figure("disk_bytes", "disk (MB)", "disk", "MB", scale=1 / MB, meaning="size of the saved variant")
WEIGHTS = Figure(
    "weight_bytes",
    "weights (MB)",
    "weights",
    "MB",
    scale=1 / MB,
    meaning="bytes of the weights in memory once loaded",
)
SIZE: tuple[Figure, ...] = (DISK, WEIGHTS)
MEMORY: tuple[Figure, ...] = (
    Figure("load_s", "load (s)", "load", "s", meaning="time to load the variant"),
    Figure(
        "peak_rss_bytes",
        "peak_rss (MB)",
        "peak RSS",
        "MB",
        scale=1 / MB,
        meaning="largest resident memory of the process while the variant was measured",
    ),
    Figure(
        "cuda_peak_allocated_bytes",
        "cuda_peak_allocated (MB)",
        "CUDA alloc.",
        "MB",
        scale=1 / MB,
        meaning="peak CUDA memory allocated by tensors",
    ),
    Figure(
        "cuda_peak_reserved_bytes",
        "cuda_peak_reserved (MB)",
        "CUDA reserved",
        "MB",
        scale=1 / MB,
        meaning="peak CUDA memory reserved by the caching allocator",
    ),
    Figure(
        "skipped_layers", "skipped_layers", "skipped", "layers", meaning="layers the method left unquantized"
    ),
)

# Labels of method settings more than one task writes.
SHARED_LABELS: dict[str, Label] = {
    "ctx": Label("window (ctx)", "tokens"),
    "windows": Label("windows"),
    "max_chunks": Label("max chunks"),
    "max_tokens": Label("max text tokens", "tokens"),
    "dtype": Label("dtype"),
    "log_softmax": Label("log-softmax in"),
    "speed_runs": Label("timed speed runs"),
    "kld": Label("KLD"),
    "encode_batch": Label("encode batch", "sequences"),
    "encode_length": Label("encode length", "tokens"),
}


def shared(*keys: str) -> dict[str, Label]:
    """The shared labels of `keys`, in that order."""
    return {key: SHARED_LABELS[key] for key in keys}


# Run-wide settings repeated on every CSV row: (section of results.json, key, column).
MethodColumn = tuple[str, str, str]
DATASET_COLUMNS: tuple[MethodColumn, ...] = (
    ("dataset", "name", "dataset"),
    ("dataset", "sha256", "text_sha256"),
)
DEVICE_COLUMNS: tuple[MethodColumn, ...] = (
    ("environment", "device", "device"),
    ("environment", "device_name", "device_name"),
    ("environment", "threads", "threads"),
)


class Task:
    """One kind of evaluation. Subclass it in a file of `evaluate/tasks/` and register it
    (`register_task`); the driver, results.json and both reports then take it as they take the
    built-in ones.

    Class attributes (read by the reports, with no model at hand):
        name: the task's name, written as results.json's `task`.
        figures: the columns of its rows, in table order (quality first, then size, speed, memory).
        method_labels: how the report names the keys `prepare` writes into the method.
        budget_labels: how the report names the keys of `budget()`.
        method_columns: method settings repeated on every CSV row.

    An instance lives for one run: `check`, `prepare` (once), then `adopt` and `measure` per variant.
    """

    name: ClassVar[str]
    figures: ClassVar[tuple[Figure, ...]] = ()
    method_labels: ClassVar[Mapping[str, Label]] = {}
    budget_labels: ClassVar[Mapping[str, Label]] = {}
    method_columns: ClassVar[tuple[MethodColumn, ...]] = ()

    def __init__(self, settings: EvalSettings, checkpoint: Checkpoint, device: Any = "cpu") -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.device = device  # the run's torch.device: where inputs go and speed is timed

    # -- what it applies to, and its settings -------------------------------------------------------

    @classmethod
    def applies(cls, checkpoint: Checkpoint) -> bool:
        """Whether the task can measure this checkpoint (its kind, its head)."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse, before the model loads, the settings that mean nothing for this task (one line
        each, naming the flag and the fix)."""

    def budget(self) -> dict[str, float]:
        """The verdict's budget, from the settings (written to results.json)."""
        return {}

    # -- one run ------------------------------------------------------------------------------------

    def prepare(self, base: Any, tokenizer: Any, text: Text) -> dict[str, Any]:
        """Build the inputs every variant is measured on (once) and return the run's method: the
        settings and counts that make its figures reproducible (written to results.json)."""
        raise NotImplementedError

    def headline(self) -> str:
        """What was prepared, in a few words (printed once, after `prepare`)."""
        return self.name

    def adopt(self, model: Any, base: Any, variant: str) -> list[str]:
        """Give a loaded variant what it shares with the base (its tokenizer...) before it is
        measured; returns notes for its row. The base itself is never passed."""
        return []

    def measure(self, model: Any, base: Any, variant: str = "variant") -> dict[str, Any]:
        """The task's figures of `model` (the base, or a variant measured against it), by name;
        a `notes` list among them goes to the row's notes."""
        raise NotImplementedError

    # -- judging and telling, from rows alone (results.json may come from another process) ---------

    @classmethod
    def passes(cls, row: Row, budget: Mapping[str, Any]) -> bool:
        """Whether a variant's row is within the budget."""
        return False

    @classmethod
    def budget_text(cls, budget: Mapping[str, Any]) -> str:
        """The budget in words, for the verdict."""
        return ", ".join(f"{key} {value}" for key, value in budget.items()) or "no budget"

    @classmethod
    def verdict_figures(cls, row: Row) -> str:
        """The figures the verdict quotes for the chosen variant."""
        return ", ".join(f"{f.label} {fmt(row.get(f.key), '.4g')}" for f in cls.figures[:2])

    @classmethod
    def line(cls, row: Row) -> str:
        """One printed line per measured variant."""
        quality = "  ".join(f"{f.label} {fmt(row.get(f.key), '.4g')}" for f in cls.figures[:3])
        return f"{row.variant:10} {quality}  disk {fmt(row.disk_bytes and row.disk_bytes / MB, '.1f')} MB"

    @classmethod
    def caption(cls, results: Mapping[str, Any]) -> str | None:
        """The method line under the report's table (None: the report's own decoder caption)."""
        method = results.get("method") or {}
        labels = cls.method_labels
        parts = [
            f"{labels[k].label if k in labels else k}: {setting_text(v, k in labels and labels[k].percent)}"
            for k, v in method.items()
        ]
        return "; ".join(parts) + ". MB = 10^6 bytes; — = not measured."


def agreement_figures(distributions: str, per: str, token: str) -> tuple[Figure, ...]:
    """The figures of a variant's agreement with the base's token distributions, in table order:
    mean KLD (± its error), top-1 agreement, KLD median, p99 and max, RMS change of p(token).

    Args:
        distributions: whose distributions ("next-token", "masked-token").
        per: the positions they are averaged over ("scored token", "masked token").
        token: the token whose probability change is measured ("correct token").
    """
    return (
        Figure(
            "kld_mean",
            "kld_mean (nats)",
            "KLD mean",
            "nats",
            err_key="kld_err",
            err_column="kld_err (nats)",
            meaning=f"KL(base ‖ variant) of the {distributions} distributions, per {per}",
        ),
        Figure(
            "top1_agreement",
            "top1_agreement (%)",
            "top-1 agree",
            "%",
            scale=100,
            meaning=f"share of {per}s where the variant's most likely token is the base's",
        ),
        Figure("kld_median", "kld_median (nats)", "KLD median", "nats"),
        Figure(
            "kld_p99", "kld_p99 (nats)", "KLD p99", "nats", meaning="99th percentile of the per-token KLD"
        ),
        Figure("kld_max", "kld_max (nats)", "KLD max", "nats"),
        Figure(
            "dp_rms",
            "dp_rms (%)",
            "RMS Δp",
            "%",
            scale=100,
            meaning=f"root mean square change in the probability of the {token}, percentage points",
        ),
    )


class AgreementBudget:
    """The verdict rule of tasks that compare next-token (or masked-token) distributions: a variant
    passes when its mean KLD and its top-1 agreement with the base are within the budget."""

    budget_labels: ClassVar[Mapping[str, Label]] = {
        "max_kld": Label("max mean KLD", "nats"),
        "min_top1": Label("min top-1 agreement", "%"),
    }
    settings: EvalSettings

    def budget(self) -> dict[str, float]:
        return {"max_kld": self.settings.max_kld, "min_top1": self.settings.min_top1}

    @classmethod
    def passes(cls, row: Row, budget: Mapping[str, Any]) -> bool:
        kld, top1 = row.get("kld_mean"), row.get("top1_agreement")
        max_kld, min_top1 = budget.get("max_kld", DEFAULT_MAX_KLD), budget.get("min_top1", DEFAULT_MIN_TOP1)
        return kld is not None and top1 is not None and kld <= max_kld and top1 >= min_top1

    @classmethod
    def budget_text(cls, budget: Mapping[str, Any]) -> str:
        max_kld, min_top1 = budget.get("max_kld", DEFAULT_MAX_KLD), budget.get("min_top1", DEFAULT_MIN_TOP1)
        return f"mean KLD <= {max_kld:g} nats and top-1 agreement >= {min_top1:.0%}"

    @classmethod
    def verdict_figures(cls, row: Row) -> str:
        return f"mean KLD {row.get('kld_mean'):.4f}, top-1 agreement {row.get('top1_agreement'):.1%}"
