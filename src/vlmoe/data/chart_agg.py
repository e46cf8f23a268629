"""An Agg canvas that draws text with cached font look-ups and glyph layouts, pixel for pixel.

matplotlib's Agg renderer repeats work for every piece of text: it searches the font files for
the text's properties (`findfont` reads a dozen rcParams and the environment each time), reads
the font's height tables, shapes the string into glyphs, and for every glyph rebuilds the same
rotation matrix with numpy. A chart has ~40 pieces of text, so this is about a third of its
drawing time. `CachedTextCanvas` remembers what depends only on (string, font, size, dpi) and
makes the same FreeType and Agg calls with the same arguments as `RendererAgg`, so the pixels
are identical to a plain Agg run (tests compare them over charts of every type).

Only figures given this canvas are affected: matplotlib's classes are not patched.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg, get_hinting_flag
from matplotlib.font_manager import fontManager, get_font
from matplotlib.ft2font import RenderMode

# findfont's result depends on these rcParams and on MPL_IGNORE_SYSTEM_FONTS besides the
# properties; they are read once per figure draw and made part of the cache key.
_FONT_RC_KEYS = (
    *(f"font.{key}" for key in ("family", "style", "variant", "weight", "stretch", "size")),
    *(f"font.{key}" for key in ("serif", "sans-serif", "cursive", "fantasy", "monospace")),
    "text.kerning_factor",
    "font.enable_last_resort",
)
# Strings kept shaped per renderer (~2 kB each; matplotlib keeps as many metrics); full: emptied.
_MAX_LAYOUTS = 4096


def _font_settings() -> tuple:
    values = [mpl.rcParams[key] for key in _FONT_RC_KEYS]
    return (
        *(tuple(v) if isinstance(v, list) else v for v in values),
        os.getenv("MPL_IGNORE_SYSTEM_FONTS"),
        threading.get_ident(),  # FT2Font objects are not thread-safe: matplotlib keeps one per thread
    )


def _prop_key(prop) -> tuple:
    # The state FontProperties.__hash__ is made of, frozen now (the object itself is mutable).
    return tuple(tuple(v) if isinstance(v, list) else v for v in prop.__dict__.values())


_RENDERERS: weakref.WeakSet[CachedTextRenderer] = weakref.WeakSet()


def _forget_fonts_after_fork() -> None:
    # An FT2Font must not be used across fork(): it reads glyphs through a file offset the forked
    # processes share, so two workers drawing at once corrupt each other's glyphs ("failed to load
    # glyph", "invalid outline"). matplotlib empties its own font cache in the child; so do we.
    for renderer in list(_RENDERERS):
        renderer._fonts.clear()
        renderer._layouts.clear()  # glyph layouts refer to their FT2Font objects


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_fonts_after_fork)


class CachedTextRenderer(RendererAgg):
    """`RendererAgg` with text caches; one per canvas size and dpi, like matplotlib's own."""

    def __init__(self, width: int, height: int, dpi: float) -> None:
        super().__init__(width, height, dpi)
        self.font_settings = _font_settings()
        self._fonts: dict[tuple, object] = {}
        self._heights: dict[tuple, tuple] = {}  # plain numbers: still right after a fork
        self._layouts: dict[tuple, list[tuple]] = {}
        _RENDERERS.add(self)

    def _font(self, prop):
        key = (_prop_key(prop), self.font_settings)
        font = self._fonts.get(key)
        if font is None:
            font = self._fonts[key] = get_font(fontManager._find_fonts_by_props(prop))
        # get_font always resets the transform; shaping below depends on it.
        font._set_transform([[0x10000, 0], [0, 0x10000]], [0, 0])
        return font

    def _prepare_font(self, font_prop):
        font = self._font(font_prop)
        font.clear()
        font.set_size(font_prop.get_size_in_points(), self.dpi)
        return font

    def _get_font_height_metrics(self, prop):
        """Text._get_layout's own computation from the font's OS/2 or hhea table, cached."""
        key = (_prop_key(prop), self.font_settings)
        if key not in self._heights:
            font = self._font(prop)
            metrics = (None, None, None)
            for table_name, gap_key, ascent_key, descent_key in (
                ("OS/2", "sTypoLineGap", "sTypoAscender", "sTypoDescender"),
                ("hhea", "lineGap", "ascent", "descent"),
            ):
                table = font.get_sfnt_table(table_name)
                if table is None:
                    continue
                scale = (
                    1 / font.get_sfnt_table("head")["unitsPerEm"] * prop.get_size_in_points() * self.dpi / 72
                )
                metrics = (table[ascent_key] * scale, -table[descent_key] * scale, table[gap_key] * scale)
                break
            self._heights[key] = metrics
        return self._heights[key]

    def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if ismath:
            return super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)
        features = mtext.get_fontfeatures() if mtext is not None else None
        language = mtext.get_language() if mtext is not None else None
        if isinstance(language, list):  # per-range languages: rare, left to matplotlib
            return super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)
        flags = get_hinting_flag()
        size = prop.get_size_in_points()
        key = (s, _prop_key(prop), self.font_settings, flags, features, language)
        glyphs = self._layouts.get(key)
        if glyphs is None:
            font = self._prepare_font(prop)
            items = font._layout(s, flags=flags, features=features, language=language)
            glyphs = [(item.ft_object, item.glyph_index, item.x, item.y) for item in items]
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            self._layouts[key] = glyphs
        self._draw_glyphs(gc, x, y, angle, size, flags, glyphs)

    def _draw_glyphs(self, gc, x, y, angle, size, flags, glyphs) -> None:
        """RendererAgg._draw_text_glyphs_and_boxes for plain text (no slant, no boxes)."""
        cos = math.cos(math.radians(angle))
        sin = math.sin(math.radians(angle))
        # numpy's rounding (half to even) of 0x10000 * the rotation, as matplotlib computes it
        matrix = [[round(0x10000 * cos), round(-0x10000 * sin)], [round(0x10000 * sin), round(0x10000 * cos)]]
        mode = RenderMode.NORMAL if gc.get_antialiased() else RenderMode.MONO
        height = self.height
        sized = None
        for font, glyph_index, dx, dy in glyphs:
            if font is not sized:
                font.set_size(size, self.dpi)
                sized = font
            font._set_transform(
                matrix,
                [round(0x40 * (x + dx * cos - dy * sin)), round(0x40 * (height - y + dx * sin + dy * cos))],
            )
            bitmap = font._render_glyph(glyph_index, flags, mode)
            buffer = bitmap.buffer
            if mode is RenderMode.MONO:
                buffer *= 0xFF
            self._renderer.draw_text_image(
                buffer, bitmap.left, int(height) - bitmap.top + buffer.shape[0], 0, gc
            )


class CachedTextCanvas(FigureCanvasAgg):
    """A `FigureCanvasAgg` whose renderer is a `CachedTextRenderer`.

    >>> from matplotlib.figure import Figure
    >>> fig = Figure(figsize=(2, 2), dpi=50)
    >>> canvas = CachedTextCanvas(fig)
    >>> _ = fig.text(0.5, 0.5, "hi"); canvas.draw(); canvas.get_width_height()
    (100, 100)
    """

    def get_renderer(self):
        w, h = self.get_width_height(physical=True)
        key = w, h, self.figure.dpi
        if self._lastKey != key:
            self.renderer = CachedTextRenderer(w, h, self.figure.dpi)
            self._lastKey = key
        self.renderer.font_settings = _font_settings()
        return self.renderer
