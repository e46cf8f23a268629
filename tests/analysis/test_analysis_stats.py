"""The numbers behind every plot, on the hand-built routing record of `routing_fixture`."""

import numpy as np
import pytest
import torch

from tests.analysis import routing_fixture as fx
from vlmoe.analysis import BatchImages, RoutingCollector, RoutingStats, expert_load_entropy


@pytest.fixture
def stats() -> RoutingStats:
    return fx.collector().stats({"model": "hand-built"})


def test_expert_load_counts_real_kept_slots_only(stats):
    assert stats.load[fx.L0.name].tolist() == [4, 4, 2, 3]  # pad t4 and the dropped slot of t7 left out
    assert stats.load[fx.L1.name].tolist() == [3, 4]
    assert stats.load[fx.CONNECTOR.name].tolist() == [1, 1, 0, 2]
    assert stats.meta == {"model": "hand-built", "num_samples": 2, "num_tokens": 7}


def test_load_fractions_are_rows_of_the_heatmap(stats):
    fractions = stats.load_fractions()
    assert fractions.shape == (3, 4)
    np.testing.assert_allclose(fractions[0], [0.25, 0.25, 0.0, 0.5])
    np.testing.assert_allclose(fractions[1], np.array([4, 4, 2, 3]) / 13)
    np.testing.assert_allclose(fractions[2, :2], [3 / 7, 4 / 7])
    assert np.isnan(fractions[2, 2:]).all()  # layer 1 has two experts only


def test_load_per_domain_and_task(stats):
    domain = stats.group_load["domain"]
    assert domain["chart"][fx.L0.name].tolist() == [2, 3, 1, 2]
    assert domain["doc"][fx.L0.name].tolist() == [2, 1, 1, 1]
    assert domain["chart"][fx.L1.name].tolist() == [1, 3]
    assert domain["doc"][fx.L1.name].tolist() == [2, 1]
    assert domain["chart"][fx.CONNECTOR.name].tolist() == [1, 1, 0, 2]  # the image is sample 0's
    assert fx.CONNECTOR.name not in domain["doc"]
    assert stats.group_load["task"]["qa"][fx.L0.name].tolist() == [4, 4, 2, 3]
    np.testing.assert_allclose(stats.load_fractions(("domain", "doc"))[1], [0.4, 0.2, 0.2, 0.2])


def test_modality_split(stats):
    assert stats.modality_load[fx.L0.name].tolist() == [[2, 3, 1, 3], [2, 1, 1, 0]]  # rows: text, image
    assert stats.modality_load[fx.L1.name].tolist() == [[3, 2], [0, 2]]
    assert stats.modality_load[fx.CONNECTOR.name].tolist() == [[0, 0, 0, 0], [1, 1, 0, 2]]
    np.testing.assert_allclose(
        stats.modality_shares(fx.L0.name), [[0.5, 0.75, 0.5, 1.0], [0.5, 0.25, 0.5, 0.0]]
    )
    np.testing.assert_allclose(stats.modality_shares(fx.CONNECTOR.name)[:, 2], [0.0, 0.0])  # unused expert


def test_top1_paths_and_top_paths(stats):
    assert stats.path_layers == [fx.L0.name, fx.L1.name]
    assert stats.paths.tolist() == [[0, 1], [0, 1], [1, 0], [3, 1], [1, 0], [2, 0], [3, 1]]
    assert stats.path_is_image.tolist() == [True, True, False, False, False, False, False]
    # (path, count, text, image); ties in first-seen order
    assert stats.top_paths(3) == [((0, 1), 2, 0, 2), ((1, 0), 2, 2, 0), ((3, 1), 2, 2, 0)]
    assert stats.top_paths()[-1] == ((2, 0), 1, 1, 0)


def test_pca_input_is_one_hot_per_path_layer(stats):
    one_hot = stats.path_one_hot()
    assert one_hot.shape == (7, 2 * 4)  # blocks as wide as the widest path layer
    assert one_hot[0].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert one_hot[3].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert (one_hot.sum(axis=1) == 2).all()
    points = stats.path_pca()
    assert points.shape == (7, 2)
    np.testing.assert_allclose(points[0], points[1], atol=1e-12)  # same path, same point
    assert not np.allclose(points[0], points[2])
    assert points[:, 0].var() >= points[:, 1].var() > 0  # principal components, largest first
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-12)


def test_patch_map_grid(stats):
    (patch_map,) = stats.patch_maps
    assert (patch_map.sample_id, patch_map.grid, patch_map.top1) == ("s0", (1, 2), [3, 1])
    assert stats.names_of_experts(fx.CONNECTOR.name) == fx.EXPERT_NAMES
    assert stats.names_of_experts(fx.L1.name) == ["expert 0", "expert 1"]


def test_connector_images_split_by_their_grids():
    collector = RoutingCollector([fx.CONNECTOR], max_patch_maps=1)
    routing = fx.records()[fx.CONNECTOR.name]
    three = type(routing)(torch.tensor([[0, 1], [2, 1], [3, 1]]), *[torch.zeros(3, 4)] * 3)
    three.combine_weights = torch.ones(3, 2)
    images = BatchImages(sample_index=[0, 1], grids=[(1, 1), (1, 2)], paths=["a.png", "b.png"])
    collector.add({fx.CONNECTOR.name: three}, tags=[{"domain": "x"}, {"domain": "y"}], images=images)
    stats = collector.stats()
    assert stats.group_load["domain"]["x"][fx.CONNECTOR.name].tolist() == [1, 1, 0, 0]
    assert stats.group_load["domain"]["y"][fx.CONNECTOR.name].tolist() == [0, 2, 1, 1]
    assert [(m.image, m.top1) for m in stats.patch_maps] == [("a.png", [0])]  # capped at one map


def test_max_path_tokens_keeps_the_first_tokens():
    stats = fx.collector(max_path_tokens=3).stats()
    assert stats.paths.tolist() == [[0, 1], [0, 1], [1, 0]]
    assert stats.load[fx.L0.name].tolist() == [4, 4, 2, 3]  # counts are never capped


def test_routing_of_the_wrong_length_is_refused():
    collector = RoutingCollector([fx.L0])
    with pytest.raises(ValueError, match="covers 8 tokens but the batch has 1 x 4"):
        collector.add({fx.L0.name: fx.records()[fx.L0.name]}, input_ids=fx.INPUT_IDS[:1])


def test_save_and_load_round_trip(stats, tmp_path):
    stats.save(tmp_path)
    again = RoutingStats.load_from(tmp_path)
    assert again.layers == stats.layers
    assert again.patch_maps == stats.patch_maps
    assert again.meta == stats.meta and again.expert_names == stats.expert_names
    for name in stats.load:
        assert again.load[name].tolist() == stats.load[name].tolist()
        assert again.modality_load[name].tolist() == stats.modality_load[name].tolist()
    assert again.group_load["domain"]["doc"][fx.L0.name].tolist() == [2, 1, 1, 1]
    np.testing.assert_array_equal(again.paths, stats.paths)
    np.testing.assert_array_equal(again.path_is_image, stats.path_is_image)
    assert again.top_paths() == stats.top_paths()


def test_load_from_a_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="vlmoe analyze"):
        RoutingStats.load_from(tmp_path)


def test_expert_load_entropy():
    assert expert_load_entropy([1, 1, 1, 1]) == pytest.approx(np.log(4))
    assert expert_load_entropy([2, 0]) == 0.0
    assert expert_load_entropy([0, 0]) == 0.0
    assert expert_load_entropy([1, 3]) == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))


def test_connector_images_without_a_known_grid_count_overall_only():
    collector = RoutingCollector([fx.CONNECTOR])
    routing = fx.records()[fx.CONNECTOR.name]  # 2 rows, 2 images of unknown layout (tiles)
    images = BatchImages(sample_index=[0, 1], grids=[None, None])
    collector.add({fx.CONNECTOR.name: routing}, tags=[{"domain": "x"}, {"domain": "y"}], images=images)
    stats = collector.stats()
    assert stats.load[fx.CONNECTOR.name].tolist() == [1, 1, 0, 2]
    assert stats.group_load == {} and stats.patch_maps == []  # no guessing which patch is whose


def test_a_layer_no_token_reached_has_no_shares_rather_than_zero_percent():
    # A text-only batch never reaches the connector; its heatmap row read 0 % for every expert.
    collector = RoutingCollector([fx.CONNECTOR, fx.L1])
    records = {fx.L1.name: fx.records()[fx.L1.name]}
    collector.add(records, input_ids=fx.INPUT_IDS, attention_mask=fx.ATTENTION_MASK, tags=fx.TAGS)
    stats = collector.stats()
    fractions = stats.load_fractions()
    assert np.isnan(fractions[0]).all()
    np.testing.assert_allclose(fractions[1, :2], [3 / 7, 4 / 7])
    doc = stats.load_fractions(("domain", "doc"))  # t5, t6 -> 0, t7 -> 1 (t4 is padding)
    assert np.isnan(doc[0]).all() and doc[1, :2].tolist() == pytest.approx([2 / 3, 1 / 3])
    for row in (fractions, doc):
        assert np.nansum(row[1]) == pytest.approx(1.0)  # a reached layer's shares sum to 1
