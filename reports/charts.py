"""Chart geometry for the HTML report: coordinates computed here, markup written by the template.

A chart is a `Chart`: its size, a title and description (for screen readers and print), and an
ordered list of shapes (`line`, `rect`, `circle`, `text`), each a dict of the attributes the
template emits. No markup is built in Python, and every text goes through the template's
autoescaping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hubquant.evaluate.results import Row
from hubquant.evaluate.tasks import MB

CHAR_W = 6.6  # average glyph width of the 12px sans-serif labels, for layout


@dataclass
class Chart:
    """One inline SVG chart.

    Args:
        id: the element id (unique within the report).
        width: the drawing's width, px.
        height: the drawing's height, px.
        title: what the chart shows, in a few words.
        desc: the chart's content in one sentence, for readers that cannot see it.
        shapes: what to draw, in order (later shapes on top).
        left_out: variants not drawn, each with the reason.
    """

    id: str
    width: int
    height: int
    title: str
    desc: str
    shapes: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def line(self, x1: float, y1: float, x2: float, y2: float, cls: str) -> None:
        self.shapes.append(dict(kind="line", x1=_r(x1), y1=_r(y1), x2=_r(x2), y2=_r(y2), cls=cls))

    def rect(self, x: float, y: float, w: float, h: float, cls: str) -> None:
        self.shapes.append(dict(kind="rect", x=_r(x), y=_r(y), w=_r(max(w, 0.0)), h=_r(max(h, 0.0)), cls=cls))

    def circle(self, x: float, y: float, r: float, cls: str, tip: str) -> None:
        self.shapes.append(dict(kind="circle", x=_r(x), y=_r(y), r=_r(r), cls=cls, tip=tip))

    def text(self, x: float, y: float, text: str, cls: str = "", anchor: str = "start", rotate: bool = False):
        self.shapes.append(
            dict(kind="text", x=_r(x), y=_r(y), text=text, cls=cls, anchor=anchor, rotate=rotate)
        )


def _r(v: float) -> float:
    return round(v, 1)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Ticks from 0 to at least `high` in steps of 1, 2 or 5 times a power of ten.

    Args:
        high: the largest value to cover (> 0).
        count: about how many steps.
    """
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    n = math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def tick_text(value: float) -> str:
    """A tick value as short text: 0, 0.0001, 2.5, 1,000, 1e-07.

    Args:
        value: the tick.
    """
    if value == 0:
        return "0"
    if abs(value) < 1e-6 or abs(value) >= 1e9:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _label_width(text: str) -> float:
    return len(text) * CHAR_W + 4


def _spread(items: list[list[float]], height: float, top: float, bottom: float) -> None:
    """Move label baselines apart vertically (items: [x0, x1, y]) so no two boxes overlap."""
    placed: list[list[float]] = []
    for item in sorted(items, key=lambda it: it[2]):
        for _ in range(len(items) + 1):
            clash = [p for p in placed if p[0] < item[1] and item[0] < p[1] and abs(p[2] - item[2]) < height]
            if not clash:
                break
            item[2] = max(p[2] for p in clash) + height
        placed.append(item)
    overflow = max((it[2] - bottom for it in items), default=0)
    if overflow > 0:  # pushed past the bottom: shift the whole stack up, as far as the top allows
        for it in items:
            it[2] = max(top, it[2] - overflow)


@dataclass(frozen=True)
class _LossAxis:
    """What a quality-against-size chart plots on its y axis (a loss: 0 is the base itself)."""

    title: str
    desc: str
    name: str  # the figure's name in "not drawn" reasons
    axis: str  # the axis title
    unit: str  # the axis unit, shown in parentheses ("" for none)
    budget_label: str
    tip: Callable[[Row], str]  # the figure as a point's tooltip says it


def quality_vs_size(
    rows: list[Row],
    max_kld: float | None,
    chosen: str | None,
    chart_id: str = "quality-size",
    *,
    per: str = "token",
) -> Chart:
    """Mean KLD against disk size, one labelled point per variant, the KLD budget dashed.

    The y axis is logarithmic when the positive values (the budget included) span a factor of 10
    or more; zero (the base model against itself) then sits on its own line below the axis break.

    Args:
        rows: the run's rows.
        max_kld: the budget's largest mean KLD, drawn as a dashed line (None: not drawn).
        chosen: the verdict's variant, highlighted.
        chart_id: the element id.
        per: what the KLD is averaged over: "token" (decoders) or "masked token" (masked LM).
    """
    axis = _LossAxis(
        "Quality loss against size",
        f"Mean KL divergence from the base model (nats per {per}) against disk size (MB), one point per variant.",
        "mean KLD",
        "mean KLD vs base",
        f"nats/{per.split()[-1]}",
        f"budget: mean KLD ≤ {max_kld:g}" if max_kld is not None else "",
        lambda row: f"mean KLD {row.get('kld_mean'):.4g} nats",
    )
    return _loss_vs_size(rows, lambda row: row.get("kld_mean"), max_kld, chosen, chart_id, axis)


def _cosine_loss(row: Row) -> float | None:
    if row.get("cos_mean") is None:
        return None
    loss = 1.0 - row.get("cos_mean")
    return 0.0 if loss < 1e-12 else loss  # float noise of the base against itself is no loss


def cosine_vs_size(
    rows: list[Row], min_cosine: float | None, chosen: str | None, chart_id: str = "quality-size"
) -> Chart:
    """An embedder's quality loss, 1 − mean cosine to the base's sentence vectors, against disk
    size; the budget (1 − min_cosine) dashed. Drawn as `quality_vs_size` draws KLD.

    Args:
        rows: the run's rows.
        min_cosine: the budget's least mean cosine (None: not drawn).
        chosen: the verdict's variant, highlighted.
        chart_id: the element id.
    """
    axis = _LossAxis(
        "Quality loss against size",
        "One minus the mean cosine similarity of each sentence's vector to the base's, against disk "
        "size (MB), one point per variant.",
        "mean cosine",
        "1 − mean cosine vs base",
        "",
        f"budget: mean cosine ≥ {min_cosine:g}" if min_cosine is not None else "",
        lambda row: f"mean cosine {row.get('cos_mean'):.6f}",
    )
    budget = 1.0 - min_cosine if min_cosine is not None else None
    return _loss_vs_size(rows, _cosine_loss, budget, chosen, chart_id, axis)


def _loss_vs_size(
    rows: list[Row],
    value: Callable[[Row], float | None],
    budget: float | None,
    chosen: str | None,
    chart_id: str,
    spec: _LossAxis,
) -> Chart:
    width, height = 640, 360
    left, right, top, bottom = 78, 24, 20, 292  # plot area; labels need the right margin inside it
    chart = Chart(chart_id, width, height, spec.title, spec.desc)
    points = []
    for row in rows:
        loss = value(row)
        if row.disk_bytes is None or loss is None:
            missing = " and ".join(
                name for name, v in (("disk size", row.disk_bytes), (spec.name, loss)) if v is None
            )
            chart.left_out.append(f"{row.variant} (no {missing})")
        else:
            points.append((row, row.disk_bytes / MB, loss))
    if not points:
        return chart
    max_kld = budget  # the dashed line: the largest loss within the budget

    # x: disk MB from 0, so sizes read as proportions of each other.
    xmax = max(x for _, x, _ in points)
    xticks = nice_ticks(xmax * 1.05 if xmax > 0 else 1)
    label_room = max(_label_width(r.variant) for r, _, _ in points) + 12
    x_right = width - right - label_room

    def sx(x: float) -> float:
        return left + (x_right - left) * x / xticks[-1]

    # y: linear from 0, or log10 with zero on a line of its own.
    positive = [y for _, _, y in points if y > 0] + ([max_kld] if max_kld and max_kld > 0 else [])
    log = len(positive) >= 2 and max(positive) / min(positive) >= 10
    zero_band = 36 if log and any(y <= 0 for _, _, y in points) else 0
    y_axis_bottom = bottom - zero_band
    if log:
        lo, hi = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
        hi = max(hi, lo + 1)
        yticks = [10.0**e for e in range(lo, hi + 1)]

        def sy(y: float) -> float:
            if y <= 0:
                return bottom - zero_band / 2
            return y_axis_bottom - (y_axis_bottom - top) * (math.log10(y) - lo) / (hi - lo)
    else:
        ymax = max(positive + [y for _, _, y in points])
        yticks = nice_ticks(ymax * 1.1) if ymax > 0 else [0.0, 1.0]

        def sy(y: float) -> float:
            return y_axis_bottom - (y_axis_bottom - top) * y / yticks[-1]

    # Over the budget: a light band, then the grid, the axes, the budget line and the points.
    if max_kld is not None and max_kld > 0:
        chart.rect(left, top, x_right - left, sy(max_kld) - top, "over-budget")
    for t in yticks:
        chart.line(left, sy(t), x_right, sy(t), "grid")
        chart.text(left - 6, sy(t) + 4, tick_text(t), "tick", "end")
    if zero_band:
        chart.line(left, sy(0), x_right, sy(0), "grid")
        chart.text(left - 6, sy(0) + 4, "0", "tick", "end")
        # the axis break between the zero line and the log axis
        mid = y_axis_bottom + 9
        chart.rect(left - 5, mid - 3, 10, 6, "axis-break")
        chart.line(left - 5, mid, left + 5, mid - 5, "axis")
        chart.line(left - 5, mid + 5, left + 5, mid, "axis")
    for t in xticks:
        chart.line(sx(t), top, sx(t), bottom, "grid")
        chart.line(sx(t), bottom, sx(t), bottom + 4, "axis")
        chart.text(sx(t), bottom + 18, tick_text(t), "tick", "middle")
    chart.line(left, bottom, x_right, bottom, "axis")
    chart.line(left, top, left, bottom, "axis")
    chart.text((left + x_right) / 2, height - 14, "disk size (MB)", "axis-title", "middle")
    notes = ", ".join(note for note in (spec.unit, "log scale" if log else "") if note)
    chart.text(
        18,
        (top + bottom) / 2,
        spec.axis + (f" ({notes})" if notes else ""),
        "axis-title",
        "middle",
        rotate=True,
    )
    if max_kld is not None and max_kld > 0:
        chart.line(left, sy(max_kld), x_right, sy(max_kld), "budget")
        chart.text(x_right - 4, sy(max_kld) - 6, spec.budget_label, "budget-label", "end")

    labels = []
    for row, x, y in points:
        cls = (
            "point"
            + (" base" if row.variant == "base" else "")
            + (" chosen" if row.variant == chosen else "")
        )
        tip = f"{row.variant}: {x:,.1f} MB, {spec.tip(row)}"
        chart.circle(sx(x), sy(y), 6 if row.variant == chosen else 4.5, cls, tip)
        lx = sx(x) + 9
        labels.append([lx, lx + _label_width(row.variant), sy(y) + 4, row.variant, cls])
    _spread(labels, 14, top + 10, bottom - 2)
    for x0, _, y, name, cls in labels:
        chart.text(x0, y, name, "point-label" + (" chosen" if "chosen" in cls else ""))
    return chart


def decode_speed(rows: list[Row], chosen: str | None, chart_id: str = "decode-speed") -> Chart:
    """Decode speed per variant as horizontal bars with value labels (± sd); base highlighted.

    Args:
        rows: the run's rows, drawn in their order.
        chosen: the verdict's variant, marked in its label.
        chart_id: the element id.
    """
    return _speed_bars(
        rows,
        chosen,
        chart_id,
        [(r.get("decode_tok_s"), r.get("decode_sd")) for r in rows],
        "tok/s",
        "Decode speed per variant",
        "Decode tokens per second, batch 1, mean over the timed runs, one bar per variant.",
        "decode speed (tokens/s, batch 1; whiskers: ± sd)",
    )


def encode_speed(
    rows: list[Row], chosen: str | None, chart_id: str = "encode-speed", batch: Any = 32, length: Any = 128
) -> Chart:
    """An encoder's throughput per variant (sequences/s) as horizontal bars (± sd); base highlighted.

    Args:
        rows: the run's rows, drawn in their order.
        chosen: the verdict's variant, marked in its label.
        chart_id: the element id.
        batch, length: the timed batch's shape, as the run's method states it.
    """
    return _speed_bars(
        rows,
        chosen,
        chart_id,
        [(r.get("encode_seq_s"), r.get("encode_sd")) for r in rows],
        "seq/s",
        "Encode throughput per variant",
        f"Sequences encoded per second, one forward over {batch} sequences of {length} tokens, median of "
        "the timed runs, one bar per variant.",
        f"encode throughput (sequences/s, batch {batch} × {length} tokens; whiskers: ± sd)",
    )


def _speed_bars(
    rows: list[Row],
    chosen: str | None,
    chart_id: str,
    values: list[tuple[float | None, float | None]],
    unit: str,
    title: str,
    desc: str,
    axis_title: str,
) -> Chart:
    bar, gap, top = 22, 10, 12
    name_w = min(240, max(_label_width(_bar_name(r, chosen)) for r in rows) + 8) if rows else 80
    value_texts = {r.variant: _speed_text(v, sd, unit) for r, (v, sd) in zip(rows, values, strict=True)}
    value_w = max((_label_width(t) for t in value_texts.values()), default=60) + 8
    width = 640
    left, right = name_w + 8, width - value_w - 12
    bottom = top + len(rows) * (bar + gap) - gap + 8
    height = bottom + 48
    chart = Chart(chart_id, width, int(height), title, desc)
    speeds = [v for v, _ in values if v is not None]
    if not speeds:
        chart.left_out = [f"{r.variant} (not measured)" for r in rows]
        return chart
    high = max((v or 0) + (sd or 0) for v, sd in values)
    ticks = nice_ticks(high * 1.02 if high > 0 else 1)

    def sx(v: float) -> float:
        return left + (right - left) * v / ticks[-1]

    for t in ticks:
        chart.line(sx(t), top - 4, sx(t), bottom, "grid")
        chart.text(sx(t), bottom + 16, tick_text(t), "tick", "middle")
    for i, (row, (value, sd)) in enumerate(zip(rows, values, strict=True)):
        y = top + i * (bar + gap)
        base = row.variant == "base"
        chart.text(
            left - 8, y + bar / 2 + 4, _bar_name(row, chosen), "bar-name" + (" base" if base else ""), "end"
        )
        if value is None:
            chart.text(left + 6, y + bar / 2 + 4, "not measured", "missing")
            chart.left_out.append(f"{row.variant} (not measured)")
            continue
        end = sx(value)
        chart.rect(left, y, end - left, bar, "bar" + (" base" if base else ""))
        tip_end = end
        if sd:
            lo, hi = sx(max(value - sd, 0)), sx(value + sd)
            chart.line(lo, y + bar / 2, hi, y + bar / 2, "whisker")
            chart.line(lo, y + 6, lo, y + bar - 6, "whisker")
            chart.line(hi, y + 6, hi, y + bar - 6, "whisker")
            tip_end = hi
        chart.text(tip_end + 6, y + bar / 2 + 4, value_texts[row.variant], "bar-value")
    chart.line(left, bottom, right, bottom, "axis")
    chart.line(left, top - 4, left, bottom, "axis")
    chart.text((left + right) / 2, height - 10, axis_title, "axis-title", "middle")
    return chart


def _bar_name(row: Row, chosen: str | None) -> str:
    if row.variant == "base":
        return "base (reference)"
    return f"{row.variant} (verdict)" if row.variant == chosen else row.variant


def _speed_text(value: float | None, sd: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if sd is None:
        return f"{value:,.1f} {unit}"
    return f"{value:,.1f} ± {sd:,.1f} {unit}"
