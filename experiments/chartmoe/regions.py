"""Which patches of a chart are text, marks or background, from the chart's own drawing.

A held-out chart is re-drawn from its record (`sample_chart_record(seed, index)` gives the same
record, `ChartRenderer` the same pixels); every visible matplotlib text (title, axis labels,
tick labels, legend, value labels) gives its box. A patch is **text** when text boxes cover at
least `TEXT_SHARE` of it, **mark** when otherwise at least `INK_SHARE` of its pixels are not
near-white (bars, lines, points, wedges, axes), else **background**.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.text import Text

from vlmoe.data import ChartRenderer, sample_chart_record

TEXT_SHARE = 0.25
INK_SHARE = 0.03
REGIONS = ("text", "mark", "background")


def chart_index(sample_id: str) -> tuple[int, int]:
    """(seed, index) of a chart sample id "chart-<seed>-<index>-<task>".

    >>> chart_index("chart-0-00000012-chart_to_table")
    (0, 12)
    """
    _, seed, index = sample_id.split("-")[:3]
    return int(seed), int(index)


def patch_regions(sample_id: str, size_px: int, grid: tuple[int, int]) -> np.ndarray:
    """The region (0 text, 1 mark, 2 background) of each patch, raster order. # [rows * cols]"""
    seed, index = chart_index(sample_id)
    renderer = ChartRenderer(size_px)
    figure = renderer.draw(sample_chart_record(seed, index))
    width, height = figure.canvas.get_width_height()
    text = np.zeros((height, width), bool)
    canvas = figure.canvas.get_renderer()
    for artist in figure.findobj(Text):
        if not artist.get_visible() or not artist.get_text().strip():
            continue
        box = artist.get_window_extent(renderer=canvas)
        # Window coordinates start at the bottom left; image rows start at the top.
        x0, x1 = int(max(box.x0, 0)), int(min(np.ceil(box.x1), width))
        y0, y1 = int(max(height - box.y1, 0)), int(min(np.ceil(height - box.y0), height))
        if x1 > x0 and y1 > y0:
            text[y0:y1, x0:x1] = True
    rgba = np.asarray(figure.canvas.buffer_rgba())
    ink = (rgba[..., :3] < 235).any(axis=-1)
    rows, cols = grid
    regions = np.full(rows * cols, 2, np.int64)
    ph, pw = height // rows, width // cols
    for r in range(rows):
        for c in range(cols):
            window = (slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
            if text[window].mean() >= TEXT_SHARE:
                regions[r * cols + c] = 0
            elif ink[window].mean() >= INK_SHARE:
                regions[r * cols + c] = 1
    return regions


def region_expert_shares(
    maps: Sequence[tuple[np.ndarray, np.ndarray]], num_experts: int
) -> dict[str, list[float]]:
    """{region: share of its patches whose top-1 expert is i, for each i} over (regions, top1) pairs.

    >>> region_expert_shares([(np.array([0, 0, 1]), np.array([1, 1, 3]))], 4)["text"]
    [0.0, 1.0, 0.0, 0.0]
    """
    counts = np.zeros((len(REGIONS), num_experts))
    for regions, top1 in maps:
        np.add.at(counts, (regions, top1), 1)
    shares = {}
    for i, name in enumerate(REGIONS):
        total = counts[i].sum()
        shares[name] = [round(float(v / total), 4) if total else 0.0 for v in counts[i]]
    return shares
