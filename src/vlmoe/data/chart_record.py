"""The one data record behind a synthetic chart: values, labels and style.

Every artefact of a chart (PNG, table, JSON, plotting code, QA) is derived from a `ChartRecord`,
so they agree by construction; `sample_chart_record` draws one from a seed and an index, so any
chart can be regenerated alone (resume, workers) and a seed always gives the same data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from vlmoe.data.chart_topics import PALETTES, TOPICS, Topic

CHART_TYPES = (
    "bar",
    "grouped_bar",
    "stacked_bar",
    "horizontal_bar",
    "line",
    "multi_line",
    "area",
    "pie",
    "scatter",
    "histogram",
)
MULTI_SERIES_TYPES = ("grouped_bar", "stacked_bar", "multi_line", "area")
FONT_FAMILIES = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral")


@dataclass(frozen=True)
class Series:
    """One named list of values. `x` is set only for scatter points."""

    name: str
    values: list[float]
    color: str
    x: list[float] | None = None


@dataclass(frozen=True)
class ChartStyle:
    """How the chart looks; none of it changes the data."""

    dpi: int  # the image is always size x size pixels; a lower dpi makes text relatively larger
    font_family: str
    title_size: float
    label_size: float
    tick_size: float
    annotate: bool  # write each value on its mark
    legend_loc: str
    grid: bool
    money_ticks: bool  # y ticks like "$1,200" instead of "1200"


@dataclass(frozen=True)
class ChartRecord:
    """Everything needed to draw a chart and to ask questions about it.

    `categories` are the x labels (bar/line/area), slice labels (pie) or bin labels (histogram);
    scatter charts have none. `bin_edges` is set only for histograms (len(categories) + 1).
    """

    chart_id: str
    chart_type: str
    title: str
    x_label: str
    y_label: str
    unit: str  # "", "%", "$", "k" or "M"; shown in labels and value annotations
    decimals: int
    categories: list[str]
    series: list[Series]
    style: ChartStyle
    bin_edges: list[float] | None = field(default=None)
    slice_colors: list[str] | None = field(default=None)  # pie only: one colour per category

    def format_value(self, value: float) -> str:
        """The value as written on the chart, e.g. "$1,250.5" or "42%"."""
        text = f"{value:,.{self.decimals}f}"
        if self.unit == "$":
            return "$" + text
        return text + self.unit


def _round_list(values: np.ndarray, decimals: int) -> list[float]:
    if decimals == 0:
        return [int(v) for v in np.round(values)]
    return [round(float(v), decimals) for v in values]


def _series_values(rng: np.random.Generator, n: int, topic: Topic, trend: str) -> np.ndarray:
    low, high = topic.value_range
    if trend == "random":
        return rng.uniform(low, high, n)
    steps = np.sort(rng.uniform(low, high, n))
    return steps if trend == "increasing" else steps[::-1]


def _categories(rng: np.random.Generator, topic: Topic, n: int) -> list[str]:
    if topic.categories == "years":
        start = int(rng.integers(1990, 2030 - n))
        return [str(start + i) for i in range(n)]
    picks = rng.choice(len(topic.categories), size=n, replace=False)
    return [topic.categories[i] for i in sorted(picks)]


def sample_chart_record(seed: int, index: int, chart_type: str | None = None) -> ChartRecord:
    """Draw the chart number `index` of the data set with seed `seed`.

    >>> record = sample_chart_record(seed=0, index=3, chart_type="bar")
    >>> record.chart_type, len(record.series)
    ('bar', 1)
    """
    rng = np.random.default_rng([seed, index])
    if chart_type is None:
        chart_type = CHART_TYPES[int(rng.integers(len(CHART_TYPES)))]
    if chart_type not in CHART_TYPES:
        raise ValueError(f"unknown chart type {chart_type!r}; choose one of {', '.join(CHART_TYPES)}")
    topic = TOPICS[int(rng.integers(len(TOPICS)))]
    if chart_type == "pie":
        topic = topic.as_shares()
    decimals = int(rng.choice([0, 0, 1, 1, 2]))
    palette = PALETTES[int(rng.integers(len(PALETTES)))]
    dpi = int(rng.choice([60, 70, 80, 100]))

    def points(size: float, min_pixels: float) -> float:
        """A font size in points that is at least `min_pixels` tall at this dpi (legible at 336 px)."""
        return float(max(size, round(min_pixels * 72 / dpi)))

    style = ChartStyle(
        dpi=dpi,
        font_family=FONT_FAMILIES[int(rng.integers(len(FONT_FAMILIES)))],
        title_size=points(float(rng.choice([9, 10, 11, 12])), 12),
        label_size=points(float(rng.choice([8, 9, 10])), 10),
        tick_size=points(float(rng.choice([7, 8])), 9),
        annotate=chart_type != "scatter" and bool(rng.random() < 0.5),  # scatter labels would pile up
        # no "best": it searches for the emptiest corner, which costs as much as drawing a bar chart
        legend_loc=str(rng.choice(["upper left", "upper right", "lower right", "upper center"])),
        grid=bool(rng.random() < 0.4),
        money_ticks=topic.unit == "$" and chart_type not in ("pie", "histogram") and bool(rng.random() < 0.5),
    )
    title = topic.titles[int(rng.integers(len(topic.titles)))]
    bin_edges = None
    if chart_type == "scatter":
        n_series = int(rng.integers(1, 3))
        names = list(rng.choice(topic.series_names, size=n_series, replace=False))
        series = []
        for k, name in enumerate(names):
            n = int(rng.integers(6, 16))
            x = _round_list(rng.uniform(0, 100, n), 1)
            y = _round_list(rng.uniform(*topic.value_range, n), decimals)
            series.append(Series(str(name), y, palette[k % len(palette)], x=x))
        categories: list[str] = []
        x_label = "Index score"
    elif chart_type == "histogram":
        n_bins = int(rng.integers(5, 11))
        width = int(rng.choice([5, 10, 20, 25]))
        start = int(rng.integers(0, 5)) * width
        bin_edges = [float(start + i * width) for i in range(n_bins + 1)]
        categories = [f"{start + i * width}-{start + (i + 1) * width}" for i in range(n_bins)]
        counts = [int(c) for c in rng.integers(1, 60, n_bins)]
        series = [Series("Count", counts, palette[0])]
        decimals = 0
        x_label, title = (
            topic.x_label_histogram,
            f"Distribution of {topic.y_label[0].lower()}{topic.y_label[1:]}",
        )
    else:
        n_cat = int(rng.integers(3, 7 if chart_type == "pie" else 9))
        categories = _categories(rng, topic, n_cat)
        n_series = (
            min(int(rng.integers(2, 5)), len(topic.series_names)) if chart_type in MULTI_SERIES_TYPES else 1
        )
        names = list(rng.choice(topic.series_names, size=n_series, replace=False))
        trend = "random"
        if chart_type in ("line", "multi_line", "area"):
            trend = str(rng.choice(["increasing", "decreasing", "random"]))
        series = []
        for k, name in enumerate(names):
            values = _series_values(rng, n_cat, topic, trend)
            if chart_type == "pie":
                values = values / values.sum() * 100
            series.append(Series(str(name), _round_list(values, decimals), palette[k % len(palette)]))
        x_label = topic.x_label
    y_label = topic.y_label if chart_type != "histogram" else "Count"
    unit = "" if chart_type == "histogram" else topic.unit
    if sum(len(s.values) for s in series) > 12:
        style = replace(style, annotate=False)  # dozens of value labels: clutter, and slow to draw
    return ChartRecord(
        chart_id=f"chart-{seed}-{index:08d}",
        chart_type=chart_type,
        title=title,
        x_label=x_label,
        y_label=y_label,
        unit=unit,
        decimals=decimals,
        categories=categories,
        series=series,
        style=style,
        bin_edges=bin_edges,
        slice_colors=[palette[i % len(palette)] for i in range(len(categories))]
        if chart_type == "pie"
        else None,
    )
