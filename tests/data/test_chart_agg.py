"""The cached-text canvas draws exactly the pixels of matplotlib's own Agg canvas."""

from __future__ import annotations

import threading
from multiprocessing import get_context

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlmoe.data import chart_agg
from vlmoe.data.chart_agg import CachedTextCanvas
from vlmoe.data.chart_record import CHART_TYPES, sample_chart_record
from vlmoe.data.chart_render import ChartRenderer


def test_charts_of_every_type_match_plain_agg_pixel_for_pixel():
    # Random records: every dpi, font family, size, rotated labels, value labels and legend.
    records = [sample_chart_record(6, i) for i in range(40)]
    assert {r.chart_type for r in records} == set(CHART_TYPES)
    assert len({(r.style.dpi, r.style.font_family) for r in records}) >= 10
    cached = ChartRenderer(336)
    plain = ChartRenderer(336, canvas_class=FigureCanvasAgg)
    for record in records + records[:10]:  # again: now every layout comes from the cache
        expected = np.asarray(plain.render_rgb(record))
        assert np.array_equal(np.asarray(cached.render_rgb(record)), expected), record.chart_id
    assert {type(fig.canvas) for fig, _ in plain._figures.values()} == {FigureCanvasAgg}
    assert {type(fig.canvas) for fig, _ in cached._figures.values()} == {CachedTextCanvas}


def _text_figure(canvas_class, angle: float, antialiased: bool) -> np.ndarray:
    fig = Figure(figsize=(2, 2), dpi=90)
    canvas = canvas_class(fig)
    for i, family in enumerate(("DejaVu Sans", "DejaVu Serif", "STIXGeneral")):
        fig.text(0.1, 0.2 + 0.25 * i, f"Ag 1,2{i}", family=family, rotation=angle, antialiased=antialiased)
    fig.text(0.5, 0.5, r"$x^2$ and $\alpha$", rotation=angle)  # mathtext: matplotlib's own path
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def test_rotated_monochrome_and_math_text_match_plain_agg():
    for angle in (0, 35, 90, 211.5):
        for antialiased in (True, False):
            with matplotlib.rc_context({"text.hinting": "default"}):
                expected = _text_figure(FigureCanvasAgg, angle, antialiased)
                drawn = _text_figure(CachedTextCanvas, angle, antialiased)
            assert np.array_equal(drawn, expected), (angle, antialiased)


def _sans_serif_text(canvas_class) -> tuple[Figure, FigureCanvasAgg]:
    fig = Figure(figsize=(2, 1), dpi=60)
    canvas = canvas_class(fig)
    fig.text(0.1, 0.5, "Same words", family="sans-serif")  # resolved through font.sans-serif
    return fig, canvas


def test_changed_font_rcparams_are_not_served_from_the_cache():
    _, canvas = _sans_serif_text(CachedTextCanvas)  # one canvas, so one renderer and its caches
    drawn = []
    for font in ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans"):
        with matplotlib.rc_context({"font.sans-serif": [font]}):
            canvas.draw()
            _, plain = _sans_serif_text(FigureCanvasAgg)
            plain.draw()
        assert np.array_equal(np.asarray(canvas.buffer_rgba()), np.asarray(plain.buffer_rgba())), font
        drawn.append(np.asarray(canvas.buffer_rgba()).copy())
    assert not np.array_equal(drawn[0], drawn[1])


def test_a_full_layout_cache_is_emptied_and_still_draws_the_same(monkeypatch):
    monkeypatch.setattr(chart_agg, "_MAX_LAYOUTS", 3)
    images = {}
    for canvas_class in (FigureCanvasAgg, CachedTextCanvas):
        fig = Figure(figsize=(2, 2), dpi=60)
        canvas = canvas_class(fig)
        for i in range(8):
            fig.text(0.05, 0.1 * i + 0.05, f"label {i}")
        canvas.draw()
        images[canvas_class] = np.asarray(canvas.buffer_rgba())
    assert 1 <= len(canvas.get_renderer()._layouts) <= 3
    assert np.array_equal(images[FigureCanvasAgg], images[CachedTextCanvas])


def test_another_thread_gets_its_own_font_objects():
    _, canvas = _sans_serif_text(CachedTextCanvas)
    canvas.draw()
    first = np.asarray(canvas.buffer_rgba()).copy()
    thread = threading.Thread(target=canvas.draw)
    thread.start()
    thread.join()
    fonts = canvas.get_renderer()._fonts
    assert len({key[1][-1] for key in fonts}) == 2  # one FT2Font per thread, as matplotlib does
    assert len({id(font) for font in fonts.values()}) == 2
    assert np.array_equal(np.asarray(canvas.buffer_rgba()), first)


_FORKED_CANVAS: list[CachedTextCanvas] = []  # set in the parent, read by the forked child


def _cache_sizes_then_draw() -> tuple[int, int, bytes]:
    renderer = _FORKED_CANVAS[0].get_renderer()
    sizes = len(renderer._fonts), len(renderer._layouts)
    _FORKED_CANVAS[0].draw()
    return *sizes, bytes(_FORKED_CANVAS[0].buffer_rgba())


def test_a_forked_process_opens_its_own_fonts():
    # FT2Font objects must not cross fork() (workers would share a font file offset).
    _, canvas = _sans_serif_text(CachedTextCanvas)
    canvas.draw()
    assert canvas.get_renderer()._fonts and canvas.get_renderer()._layouts
    _FORKED_CANVAS[:] = [canvas]
    with get_context("fork").Pool(1) as pool:
        fonts, layouts, pixels = pool.apply(_cache_sizes_then_draw)
    assert (fonts, layouts) == (0, 0)
    assert pixels == bytes(canvas.buffer_rgba())
