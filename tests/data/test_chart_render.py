"""The plotting code re-draws the same pixels, and the drawn marks carry the table's numbers."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
from PIL import Image

from vlmoe.data.chart_code import plotting_code
from vlmoe.data.chart_record import CHART_TYPES, sample_chart_record
from vlmoe.data.chart_render import ChartRenderer
from vlmoe.data.chart_text import chart_json, chart_table, parse_table

SIZE = 224


def _run_script(code: str, workdir) -> np.ndarray:
    """Run the standalone script the way a user would (pyplot, fresh figure) and read chart.png."""
    import matplotlib.pyplot as plt

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with matplotlib.rc_context():  # the script sets rcParams; keep them out of other tests
            exec(compile(code, "chart.py", "exec"), {"__name__": "__main__"})
        plt.close("all")
    finally:
        os.chdir(cwd)
    return np.asarray(Image.open(workdir / "chart.png").convert("RGB"))


# One renderer for the whole module: each chart is drawn on a figure that held others before.
RENDERER = ChartRenderer(SIZE)


@pytest.mark.parametrize("chart_type", CHART_TYPES + CHART_TYPES[::-1])
def test_plotting_code_redraws_the_png_pixel_for_pixel(chart_type, tmp_path):
    renderer = RENDERER
    record = sample_chart_record(7, CHART_TYPES.index(chart_type), chart_type)
    record = replace(record, style=replace(record.style, dpi=80))  # all share one reused figure
    rendered = np.asarray(Image.open(io.BytesIO(renderer.render_png(record))))
    assert rendered.shape == (SIZE, SIZE, 3)
    redrawn = _run_script(plotting_code(record, SIZE), tmp_path)
    assert redrawn.shape == (SIZE, SIZE, 3)
    assert np.array_equal(rendered, redrawn)
    assert len(np.unique(rendered.reshape(-1, 3), axis=0)) > 10  # a chart, not a blank canvas


def _drawn_values(renderer: ChartRenderer, record) -> list[list[float]]:
    """Numbers read back from the matplotlib artists, one list per series."""
    ax = renderer.draw(record).axes[0]
    kind = record.chart_type
    n_cat = len(record.categories)
    if kind in ("bar", "grouped_bar", "histogram"):
        heights = [p.get_height() for p in ax.patches]
        return [heights[i : i + n_cat] for i in range(0, len(heights), n_cat)]
    if kind == "horizontal_bar":
        return [[p.get_width() for p in ax.patches]]
    if kind == "stacked_bar":
        heights = [p.get_height() for p in ax.patches]
        return [heights[i : i + n_cat] for i in range(0, len(heights), n_cat)]
    if kind in ("line", "multi_line"):
        return [list(line.get_ydata()) for line in ax.lines]
    if kind == "area":
        tops = [np.asarray(c.get_paths()[0].vertices) for c in ax.collections]
        cumulative = [
            [max(v[:, 1][np.isclose(v[:, 0], xi)]) for xi in range(n_cat)] for v in tops
        ]  # stacked tops per x
        return [list(np.diff([[0.0] * n_cat, *cumulative], axis=0)[i]) for i in range(len(tops))]
    if kind == "pie":
        total = sum(record.series[0].values)
        return [[(w.theta2 - w.theta1) / 360 * total for w in ax.patches]]
    if kind == "scatter":
        return [list(c.get_offsets()[:, 1]) for c in ax.collections]
    raise AssertionError(kind)


@pytest.mark.parametrize("chart_type", CHART_TYPES)
def test_table_json_and_drawn_marks_agree(chart_type):
    renderer = ChartRenderer(SIZE)
    for index in range(3):
        record = sample_chart_record(11, index, chart_type)
        rows = parse_table(chart_table(record))
        data = chart_json(record)
        drawn = _drawn_values(renderer, record)
        table_numbers = [
            float(cell) for row in rows[1:] for cell in row[-1 if chart_type == "scatter" else 1 :]
        ]
        if chart_type == "scatter":
            json_series = [[p["y"] for p in s["points"]] for s in data["series"]]
            assert table_numbers == [y for s in json_series for y in s]
        elif chart_type == "histogram":
            json_series = [[b["count"] for b in data["bins"]]]
        elif chart_type == "pie":
            json_series = [[s["value"] for s in data["slices"]]]
        elif "data" in data:
            json_series = [[d["value"] for d in data["data"]]]
        else:
            json_series = [s["values"] for s in data["series"]]
            table_numbers = [
                float(cell) for s in range(len(json_series)) for cell in [r[1 + s] for r in rows[1:]]
            ]
        assert table_numbers == [v for s in json_series for v in s]
        assert len(drawn) == len(json_series)
        for drawn_series, json_values in zip(drawn, json_series, strict=True):
            np.testing.assert_allclose(drawn_series, json_values, rtol=1e-6, atol=1e-6)


def test_same_record_same_png_bytes():
    record = sample_chart_record(0, 5)
    assert ChartRenderer(SIZE).render_png(record) == ChartRenderer(SIZE).render_png(record)


def test_too_small_size_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--size 64 or more"):
        ChartRenderer(32)


@pytest.mark.parametrize("chart_type", CHART_TYPES)
def test_drawn_title_axes_labels_and_legend_are_the_jsons(chart_type):
    renderer = ChartRenderer(SIZE)
    for seed in range(3):
        record = sample_chart_record(seed, 0, chart_type)
        data = chart_json(record)
        ax = renderer.draw(record).axes[0]
        assert ax.get_title() == data["title"]
        legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
        names = [s["name"] for s in data.get("series", [])]
        assert legend == (names if len(names) > 1 else [])  # one series: named by the axis label
        if chart_type == "pie":
            labels = [s["label"] for s in data["slices"]]
            drawn = [t.get_text() for t in ax.texts if t.get_text()]
            assert [text.split(" (")[0] for text in drawn] == labels
            continue
        assert (ax.get_xlabel(), ax.get_ylabel()) == (data["x_axis"]["label"], data["y_axis"]["label"])
        if chart_type in ("scatter", "histogram"):
            continue
        ticks = ax.get_yticklabels() if chart_type == "horizontal_bar" else ax.get_xticklabels()
        categories = data.get("categories") or [d["label"] for d in data["data"]]
        assert [t.get_text() for t in ticks] == categories
