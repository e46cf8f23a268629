from dataclasses import replace

import numpy as np
import pytest

import tests.analysis.routing_fixture as fx
from vlmoe.analysis import plots, router_series
from vlmoe.analysis.plots import _expert_labels, expert_load_figure, group_load_figure


def test_expert_axis_uses_names_only_when_every_layer_on_it_shares_them():
    stats = fx.collector().stats({"model": "m", "data": "d"})
    named = replace(stats, expert_names={fx.CONNECTOR.name: ["general", "table", "json", "code"]})
    assert _expert_labels(named, [fx.CONNECTOR.name], 4) == ["general", "table", "json", "code"]
    # L0 names no experts, so an axis shared with it shows numbers.
    assert _expert_labels(named, [fx.CONNECTOR.name, fx.L0.name], 4) == ["0", "1", "2", "3"]
    assert _expert_labels(named, [fx.CONNECTOR.name], 5) == ["0", "1", "2", "3", "4"]  # names do not fit


def _heatmaps(figure):
    """(row labels, expert labels, cell texts) of each heatmap; the colour bar is the last axes."""
    return [
        (
            [t.get_text() for t in axes.get_yticklabels()],
            [t.get_text() for t in axes.get_xticklabels()],
            [t.get_text() for t in axes.texts],
        )
        for axes in figure.axes[:-1]
    ]


def test_expert_load_cells_and_colour_bar_are_both_in_percent():
    stats = fx.collector().stats()
    figure = expert_load_figure(stats)
    colour_bar = figure.axes[-1]
    assert colour_bar.get_ylabel() == "% of slots" and colour_bar.get_ylim() == (0.0, 100.0)
    assert all(axes.images[0].get_clim() == (0.0, 100.0) for axes in figure.axes[:-1])
    # Connector: its top-2 choices [3, 0] and [1, 3] -> 25 / 25 / 0 / 50 % of its 4 slots.
    connector, lm = (texts for _, _, texts in _heatmaps(figure))
    assert connector == ["25", "25", "0", "50"]
    fractions = stats.load_fractions()[1:]
    assert lm == [f"{100 * v:.0f}" for v in fractions[np.isfinite(fractions)]]


def test_named_connector_experts_label_the_load_heatmaps():
    stats = fx.collector().stats()  # the connector's experts are named general, table, JSON, code
    assert _heatmaps(expert_load_figure(stats))[0][:2] == (["connector"], fx.EXPERT_NAMES)
    assert _heatmaps(expert_load_figure(stats))[1][:2] == (["layer 0", "layer 1"], ["0", "1", "2", "3"])
    by_domain = _heatmaps(group_load_figure(stats, "domain"))
    assert [labels for _, labels, _ in by_domain] == [fx.EXPERT_NAMES, ["0", "1", "2", "3"]] * 2
    assert [rows for rows, _, _ in by_domain] == [["connector"], ["layer 0", "layer 1"], [""], ["", ""]]
    unnamed = replace(stats, expert_names={})  # no names: one heatmap, numbered
    assert _heatmaps(expert_load_figure(unnamed))[0][:2] == (
        ["connector", "layer 0", "layer 1"],
        ["0", "1", "2", "3"],
    )


def test_router_training_panels_say_the_entropy_is_in_nats(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    series = router_series([{"step": 1, "aux/l.0/tokens_per_expert": [1, 1], "aux/l.0/z_loss": 0.5}])
    plots.plot_router_training(series, tmp_path / "router_training.png")
    (figure,) = figures
    panels = {axes.get_title(): axes.lines[0].get_ydata().tolist() for axes in figure.axes}
    assert panels == {"load_entropy (nats)": [pytest.approx(np.log(2))], "z_loss": [0.5]}
