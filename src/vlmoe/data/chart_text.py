"""The table and JSON views of a chart record (chart-to-table and chart-to-JSON targets)."""

from __future__ import annotations

import json

from vlmoe.data.chart_record import ChartRecord


def _number(record: ChartRecord, value: float) -> str:
    return f"{value:.{record.decimals}f}"


def chart_table(record: ChartRecord) -> str:
    """A markdown table of the plotted numbers (no units in cells: the header carries them).

    >>> from vlmoe.data.chart_record import sample_chart_record
    >>> print(chart_table(sample_chart_record(0, 0, "pie")).splitlines()[0])
    | Year | Share |
    """
    kind = record.chart_type
    if kind == "scatter":
        header = ["Series", record.x_label, record.y_label]
        rows = [
            [s.name, f"{x}", _number(record, y)]
            for s in record.series
            for x, y in zip(s.x or [], s.values, strict=True)
        ]
    elif kind == "histogram":
        header = [record.x_label, "Count"]
        rows = [[c, str(v)] for c, v in zip(record.categories, record.series[0].values, strict=True)]
    elif len(record.series) == 1 and kind in ("bar", "horizontal_bar", "line", "pie"):
        header = [record.x_label, record.y_label]
        rows = [
            [c, _number(record, v)] for c, v in zip(record.categories, record.series[0].values, strict=True)
        ]
    else:
        header = [record.x_label] + [s.name for s in record.series]
        rows = [
            [c] + [_number(record, s.values[i]) for s in record.series]
            for i, c in enumerate(record.categories)
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_table(table: str) -> list[list[str]]:
    """Cells of a table written by `chart_table`, header row first (used by tests and metrics).

    >>> parse_table("| Year | Sales |\\n| --- | --- |\\n| 2020 | 4.5 |")
    [['Year', 'Sales'], ['2020', '4.5']]
    """
    rows = []
    for line in table.splitlines():
        if line.startswith("|") and not line.startswith("| ---") and set(line) - set("|- "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def chart_json(record: ChartRecord) -> dict:
    """The chart as a JSON object following `CHART_JSON_SCHEMAS[record.chart_type]`.

    >>> from vlmoe.data.chart_record import sample_chart_record
    >>> chart_json(sample_chart_record(0, 0, "bar"))["chart_type"]
    'bar'
    """
    kind = record.chart_type
    style = record.style
    data: dict = {
        "chart_type": kind,
        "title": record.title,
        "style": {"font_family": style.font_family, "value_labels": style.annotate, "grid": style.grid},
    }
    if kind != "pie":
        data["x_axis"] = {"label": record.y_label if kind == "horizontal_bar" else record.x_label}
        data["y_axis"] = {"label": record.x_label if kind == "horizontal_bar" else record.y_label}
        data["unit"] = record.unit
    if kind in ("bar", "horizontal_bar", "line"):
        data["color"] = record.series[0].color
        data["data"] = [
            {"label": c, "value": v} for c, v in zip(record.categories, record.series[0].values, strict=True)
        ]
    elif kind == "pie":
        data["unit"] = record.unit
        data["slices"] = [
            {"label": c, "value": v, "color": color}
            for c, v, color in zip(
                record.categories, record.series[0].values, record.slice_colors or [], strict=True
            )
        ]
    elif kind == "scatter":
        data["series"] = [
            {
                "name": s.name,
                "color": s.color,
                "points": [{"x": x, "y": y} for x, y in zip(s.x or [], s.values, strict=True)],
            }
            for s in record.series
        ]
    elif kind == "histogram":
        edges = record.bin_edges or []
        data["color"] = record.series[0].color
        data["bins"] = [
            {"start": a, "end": b, "count": c}
            for a, b, c in zip(edges[:-1], edges[1:], record.series[0].values, strict=True)
        ]
    else:
        data["categories"] = record.categories
        data["series"] = [{"name": s.name, "color": s.color, "values": s.values} for s in record.series]
    return data


def chart_json_text(record: ChartRecord) -> str:
    """`chart_json` as compact, key-ordered text: the exact target string a model is trained on.

    >>> from vlmoe.data.chart_record import sample_chart_record
    >>> chart_json_text(sample_chart_record(0, 0, "pie"))[:22]
    '{"chart_type": "pie", '
    """
    return json.dumps(chart_json(record), ensure_ascii=False)


_STYLE = {
    "type": "object",
    "required": ["font_family", "value_labels", "grid"],
    "properties": {
        "font_family": {"type": "string"},
        "value_labels": {"type": "boolean"},
        "grid": {"type": "boolean"},
    },
}
_AXIS = {"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}
_COMMON = {"chart_type": {"type": "string"}, "title": {"type": "string"}, "style": _STYLE}
_AXES = {"x_axis": _AXIS, "y_axis": _AXIS, "unit": {"type": "string"}}
_COLOR = {"type": "string", "pattern": "^#[0-9a-f]{6}$"}


def _schema(kind: str, properties: dict, required: list[str]) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} chart",
        "type": "object",
        "properties": {**_COMMON, "chart_type": {"const": kind}, **properties},
        "required": ["chart_type", "title", "style", *required],
        "additionalProperties": False,
    }


def _label_value_schema(kind: str) -> dict:
    point = {
        "type": "object",
        "required": ["label", "value"],
        "properties": {"label": {"type": "string"}, "value": {"type": "number"}},
    }
    return _schema(
        kind,
        {**_AXES, "color": _COLOR, "data": {"type": "array", "items": point, "minItems": 1}},
        ["x_axis", "y_axis", "unit", "color", "data"],
    )


def _multi_series_schema(kind: str) -> dict:
    series = {
        "type": "object",
        "required": ["name", "color", "values"],
        "properties": {
            "name": {"type": "string"},
            "color": _COLOR,
            "values": {"type": "array", "items": {"type": "number"}},
        },
    }
    categories = {"type": "array", "items": {"type": "string"}, "minItems": 1}
    return _schema(
        kind,
        {**_AXES, "categories": categories, "series": {"type": "array", "items": series, "minItems": 1}},
        ["x_axis", "y_axis", "unit", "categories", "series"],
    )


_SLICE = {
    "type": "object",
    "required": ["label", "value", "color"],
    "properties": {"label": {"type": "string"}, "value": {"type": "number"}, "color": _COLOR},
}
_SCATTER_SERIES = {
    "type": "object",
    "required": ["name", "color", "points"],
    "properties": {
        "name": {"type": "string"},
        "color": _COLOR,
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["x", "y"],
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            },
        },
    },
}
_BIN = {
    "type": "object",
    "required": ["start", "end", "count"],
    "properties": {"start": {"type": "number"}, "end": {"type": "number"}, "count": {"type": "integer"}},
}

CHART_JSON_SCHEMAS: dict[str, dict] = {
    "bar": _label_value_schema("bar"),
    "horizontal_bar": _label_value_schema("horizontal_bar"),
    "line": _label_value_schema("line"),
    "grouped_bar": _multi_series_schema("grouped_bar"),
    "stacked_bar": _multi_series_schema("stacked_bar"),
    "multi_line": _multi_series_schema("multi_line"),
    "area": _multi_series_schema("area"),
    "pie": _schema(
        "pie",
        {"unit": {"type": "string"}, "slices": {"type": "array", "items": _SLICE, "minItems": 1}},
        ["unit", "slices"],
    ),
    "scatter": _schema(
        "scatter",
        {**_AXES, "series": {"type": "array", "items": _SCATTER_SERIES, "minItems": 1}},
        ["x_axis", "y_axis", "unit", "series"],
    ),
    "histogram": _schema(
        "histogram",
        {**_AXES, "color": _COLOR, "bins": {"type": "array", "items": _BIN, "minItems": 1}},
        ["x_axis", "y_axis", "unit", "color", "bins"],
    ),
}
