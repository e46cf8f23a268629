"""Self-contained matplotlib code for a chart: the chart-to-code target and the renderer's source.

The renderer executes the very `body` that `plotting_code` prints, so the code a model learns
to write re-draws the same pixels (tests check it). The body only uses `fig` and `ax`; style that
must exist before the axes are made (fonts, tick sizes) goes in `rc_params`.
"""

from __future__ import annotations

from vlmoe.data.chart_record import ChartRecord


def rc_params(record: ChartRecord) -> dict[str, object]:
    """matplotlib rcParams the chart is drawn under (the script sets them with rcParams.update).

    Every chart sets the same keys, so drawing one chart after another leaves nothing behind.
    """
    style = record.style
    return {
        "axes.grid": style.grid,
        "axes.grid.axis": "x" if record.chart_type == "horizontal_bar" else "y",
        "grid.alpha": 0.3,
        "axes.axisbelow": True,  # grid lines under the bars
        "text.hinting": "no_hinting",  # ~7% faster than autohinting, and small text reads better
        "font.family": style.font_family,
        "font.size": style.label_size,
        "xtick.labelsize": style.tick_size,
        "ytick.labelsize": style.tick_size,
        "legend.fontsize": style.tick_size,
        "axes.titlesize": style.title_size,
        "axes.labelsize": style.label_size,
    }


def _char_inches(record: ChartRecord) -> float:
    return record.style.tick_size * 0.62 / 72  # average glyph width of the fonts we use, in inches


def _rotate_x_labels(record: ChartRecord, size_px: int) -> bool:
    """Whether category labels under the x axis would overlap if written horizontally."""
    if record.chart_type not in ("bar", "grouped_bar", "stacked_bar", "line", "multi_line", "area"):
        return False
    axis_inches = 0.8 * size_px / record.style.dpi
    return sum(len(c) + 2 for c in record.categories) * _char_inches(record) > axis_inches


def _margins(record: ChartRecord, size_px: int) -> tuple[float, float, float, float]:
    """Fixed subplot margins from text sizes (tight_layout would cost ~40% of render time)."""
    style = record.style
    inches = size_px / style.dpi
    char_in = _char_inches(record)
    if record.chart_type == "horizontal_bar":
        longest = max(len(c) for c in record.categories)
    else:
        stacked = record.chart_type in ("stacked_bar", "area")
        columns = zip(*(s.values for s in record.series), strict=True) if stacked else ()
        largest = max([sum(c) for c in columns] + [max(abs(v) for v in s.values) for s in record.series])
        longest = len(f"{largest:,.0f}") + (2 if style.money_ticks else 0) + min(record.decimals, 1) * 2
    left = (longest * char_in + style.label_size * 1.6 / 72 + 0.12) / inches
    bottom = (style.tick_size * 2.2 / 72 + style.label_size * 1.5 / 72 + 0.1) / inches
    if _rotate_x_labels(record, size_px):
        bottom += max(len(c) for c in record.categories) * char_in * 0.7 / inches
    top = 1 - (style.title_size * 1.8 / 72 + 0.05) / inches
    # Tiny images cannot fit the text: keep some plot area rather than fail.
    left, bottom, top = min(left, 0.4), min(bottom, 0.35), max(top, 0.6)
    return round(left, 3), 0.96, round(bottom, 3), round(top, 3)


def _value_labels(record: ChartRecord, values: list[float]) -> list[str]:
    return [record.format_value(v) for v in values]


def _category_axis(record: ChartRecord, axis: str, size_px: int) -> list[str]:
    if axis == "x" and _rotate_x_labels(record, size_px):
        return [f'ax.set_{axis}ticks(x, categories, rotation=35, ha="right")']
    return [f"ax.set_{axis}ticks(x, categories)"]


def _body_lines(record: ChartRecord, size_px: int) -> list[str]:
    style = record.style
    kind = record.chart_type
    names = [s.name for s in record.series]
    colors = [s.color for s in record.series]
    lines: list[str] = []
    value_size = round(style.tick_size * 0.85, 1)  # value labels: a little smaller than tick labels
    if kind not in ("scatter", "histogram"):
        lines += [f"categories = {record.categories!r}", "x = list(range(len(categories)))"]
    if kind in ("bar", "horizontal_bar"):
        lines.append(f"values = {record.series[0].values!r}")
        bar = "ax.barh" if kind == "horizontal_bar" else "ax.bar"
        lines.append(f"bars = {bar}(x, values, color={colors[0]!r})")
        if style.annotate:
            lines.append(
                f"ax.bar_label(bars, labels={_value_labels(record, record.series[0].values)!r}, padding=2)"
            )
        lines += _category_axis(record, "y" if kind == "horizontal_bar" else "x", size_px)
        if kind == "horizontal_bar":
            lines.append("ax.invert_yaxis()  # first category on top, as in the table")
    elif kind in ("grouped_bar", "stacked_bar"):
        lines.append(f"series = {dict(zip(names, (s.values for s in record.series), strict=True))!r}")
        lines.append(f"colors = {colors!r}")
        if kind == "grouped_bar":
            width = round(0.8 / len(names), 4)
            lines.append(f"width = {width}")
            lines.append("for i, (name, values) in enumerate(series.items()):")
            lines.append(f"    offset = (i - {(len(names) - 1) / 2}) * width")
            lines.append(
                "    bars = ax.bar([p + offset for p in x], values, width, label=name, color=colors[i])"
            )
        else:
            lines.append("bottom = [0] * len(categories)")
            lines.append("for i, (name, values) in enumerate(series.items()):")
            lines.append("    bars = ax.bar(x, values, 0.6, bottom=bottom, label=name, color=colors[i])")
            lines.append("    bottom = [b + v for b, v in zip(bottom, values)]")
        if style.annotate:
            place = ', label_type="center"' if kind == "stacked_bar" else ", padding=1"
            fmt = _fmt_expression(record)
            lines.append(
                f"    ax.bar_label(bars, labels=[{fmt} for v in values]{place}, fontsize={value_size})"
            )
        lines += _category_axis(record, "x", size_px)
        lines.append(f"ax.legend(loc={style.legend_loc!r})")
    elif kind in ("line", "multi_line"):
        lines.append(f"series = {dict(zip(names, (s.values for s in record.series), strict=True))!r}")
        lines.append(f"colors = {colors!r}")
        lines.append("for i, (name, values) in enumerate(series.items()):")
        lines.append('    ax.plot(x, values, marker="o", markersize=4, label=name, color=colors[i])')
        if style.annotate:
            fmt = _fmt_expression(record)
            lines.append("    for xi, v in zip(x, values):")
            lines.append(
                f'        ax.annotate({fmt}, (xi, v), textcoords="offset points", xytext=(0, 4), '
                f'ha="center", fontsize={value_size})'
            )
        lines += _category_axis(record, "x", size_px)
        if kind == "multi_line":
            lines.append(f"ax.legend(loc={style.legend_loc!r})")
    elif kind == "area":
        lines.append(f"series = {dict(zip(names, (s.values for s in record.series), strict=True))!r}")
        lines.append(f"ax.stackplot(x, *series.values(), labels=list(series), colors={colors!r}, alpha=0.85)")
        if style.annotate:
            fmt = _fmt_expression(record)
            lines.append("bottom = [0] * len(categories)")
            lines.append("for values in series.values():")
            lines.append("    for xi, b, v in zip(x, bottom, values):")
            lines.append(
                f'        ax.text(xi, b + v / 2, {fmt}, ha="center", va="center", fontsize={value_size})'
            )
            lines.append("    bottom = [b + v for b, v in zip(bottom, values)]")
        lines += _category_axis(record, "x", size_px)
        lines.append("ax.set_xlim(x[0], x[-1])")
        lines.append(f"ax.legend(loc={style.legend_loc!r})")
    elif kind == "pie":
        lines.append(f"values = {record.series[0].values!r}")
        labels = record.categories
        if style.annotate:
            labels = [
                f"{c} ({record.format_value(v)})"
                for c, v in zip(labels, record.series[0].values, strict=True)
            ]
        lines.append(f"labels = {labels!r}")
        colors = record.slice_colors
        lines.append(f"ax.pie(values, labels=labels, colors={colors!r}, startangle=90, counterclock=False)")
        lines.append('ax.set_aspect("equal")')
    elif kind == "scatter":
        lines.append(f"colors = {colors!r}")
        for i, s in enumerate(record.series):
            lines.append(f"ax.scatter({s.x!r}, {s.values!r}, s=18, color=colors[{i}], label={s.name!r})")
        if len(record.series) > 1:
            lines.append(f"ax.legend(loc={style.legend_loc!r})")
    elif kind == "histogram":
        lines.append(f"bin_edges = {record.bin_edges!r}")
        lines.append(f"counts = {record.series[0].values!r}")
        lines.append("centers = [(a + b) / 2 for a, b in zip(bin_edges, bin_edges[1:])]")
        lines.append(
            f"_, _, bars = ax.hist(centers, bins=bin_edges, weights=counts, color={colors[0]!r}, "
            'edgecolor="white")'
        )
        if style.annotate:
            lines.append(f"ax.bar_label(bars, padding=2, fontsize={value_size})")
    if style.annotate and kind in ("bar", "grouped_bar", "line", "multi_line", "histogram"):
        lines.append("ax.margins(y=0.12)  # room for the value labels above the highest mark")
    if style.annotate and kind == "horizontal_bar":
        lines.append("ax.margins(x=0.2)  # room for the value labels right of the longest bar")
    if kind != "pie":
        numeric_axes = {"scatter": "both", "histogram": "both", "horizontal_bar": "x"}.get(kind, "y")
        lines.append(f'ax.locator_params(axis="{numeric_axes}", nbins=5)  # few ticks: readable, fast')
        lines.append(f"ax.set_xlabel({(record.y_label if kind == 'horizontal_bar' else record.x_label)!r})")
        lines.append(f"ax.set_ylabel({(record.x_label if kind == 'horizontal_bar' else record.y_label)!r})")
        if style.money_ticks:
            axis = "xaxis" if kind == "horizontal_bar" else "yaxis"
            lines.append(f'ax.{axis}.set_major_formatter("${{x:,.0f}}")')
    # An explicit y skips matplotlib's title placement pass, ~15% of the drawing time.
    lines.append(f"ax.set_title({record.title!r}, y=1.02)")
    return lines


def _fmt_expression(record: ChartRecord) -> str:
    """A Python f-string expression over `v` that writes a value like `ChartRecord.format_value`."""
    spec = f"{{v:,.{record.decimals}f}}"
    if record.unit == "$":
        return f'f"${spec}"'
    return f'f"{spec}{record.unit}"'


def plot_body(record: ChartRecord, size_px: int) -> str:
    """The drawing statements, using only `fig` and `ax` (and builtins)."""
    left, right, bottom, top = _margins(record, size_px)
    if record.chart_type == "pie":
        left, right, bottom = 0.05, 0.95, 0.05
    lines = _body_lines(record, size_px)
    lines.append(f"fig.subplots_adjust(left={left}, right={right}, bottom={bottom}, top={top})")
    return "\n".join(lines) + "\n"


def plotting_code(record: ChartRecord, size_px: int) -> str:
    """A standalone script that draws the chart and saves it as chart.png (size_px x size_px).

    >>> from vlmoe.data.chart_record import sample_chart_record
    >>> code = plotting_code(sample_chart_record(0, 0, "bar"), 336)
    >>> code.splitlines()[0], "fig.savefig" in code
    ('import matplotlib', True)
    """
    inches = size_px / record.style.dpi
    header = [
        "import matplotlib",
        "",
        'matplotlib.use("Agg")',
        "import matplotlib.pyplot as plt",
        "",
        f"plt.rcParams.update({rc_params(record)!r})",
        f"fig = plt.figure(figsize=({inches!r}, {inches!r}), dpi={record.style.dpi})",
        "ax = fig.add_subplot()",
    ]
    return "\n".join(header) + "\n" + plot_body(record, size_px) + 'fig.savefig("chart.png")\n'
