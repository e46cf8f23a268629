from dataclasses import replace

import tests.analysis.routing_fixture as fx
from vlmoe.analysis.plots import _expert_labels


def test_expert_axis_uses_names_only_when_every_layer_on_it_shares_them():
    stats = fx.collector().stats({"model": "m", "data": "d"})
    named = replace(stats, expert_names={fx.CONNECTOR.name: ["general", "table", "json", "code"]})
    assert _expert_labels(named, [fx.CONNECTOR.name], 4) == ["general", "table", "json", "code"]
    # L0 names no experts, so an axis shared with it shows numbers.
    assert _expert_labels(named, [fx.CONNECTOR.name, fx.L0.name], 4) == ["0", "1", "2", "3"]
    assert _expert_labels(named, [fx.CONNECTOR.name], 5) == ["0", "1", "2", "3", "4"]  # names do not fit
