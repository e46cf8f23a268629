"""Table and JSON views: schema-valid, and carrying the record's exact numbers."""

from __future__ import annotations

import json

import jsonschema
import pytest

from vlmoe.data.chart_record import CHART_TYPES, sample_chart_record
from vlmoe.data.chart_text import CHART_JSON_SCHEMAS, chart_json, chart_json_text, chart_table, parse_table


@pytest.mark.parametrize("chart_type", CHART_TYPES)
def test_json_follows_its_chart_type_schema(chart_type):
    schema = CHART_JSON_SCHEMAS[chart_type]
    jsonschema.Draft202012Validator.check_schema(schema)
    for index in range(5):
        data = json.loads(chart_json_text(sample_chart_record(2, index, chart_type)))
        jsonschema.validate(data, schema)
        assert data["chart_type"] == chart_type


def test_schema_rejects_another_chart_types_json():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(chart_json(sample_chart_record(0, 0, "pie")), CHART_JSON_SCHEMAS["bar"])


def test_table_has_one_row_per_category_and_the_values():
    record = sample_chart_record(4, 2, "grouped_bar")
    rows = parse_table(chart_table(record))
    assert rows[0] == [record.x_label] + [s.name for s in record.series]
    assert [r[0] for r in rows[1:]] == record.categories
    for j, series in enumerate(record.series):
        assert [float(r[1 + j]) for r in rows[1:]] == series.values


def test_histogram_table_lists_bins_and_counts():
    record = sample_chart_record(4, 3, "histogram")
    rows = parse_table(chart_table(record))
    edges = record.bin_edges
    assert rows[1][0] == f"{int(edges[0])}-{int(edges[1])}"
    assert [int(r[1]) for r in rows[1:]] == record.series[0].values
    assert len(edges) == len(rows) - 1 + 1


def test_format_value_writes_units_and_separators():
    record = sample_chart_record(0, 0, "bar")
    money = type(record)(**{**record.__dict__, "unit": "$", "decimals": 1})
    assert money.format_value(1250.5) == "$1,250.5"
    share = type(record)(**{**record.__dict__, "unit": "%", "decimals": 0})
    assert share.format_value(42) == "42%"


def test_unknown_chart_type_names_the_choices():
    with pytest.raises(ValueError, match="choose one of bar, grouped_bar"):
        sample_chart_record(0, 0, "radar")
