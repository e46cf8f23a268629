"""A hand-built routing record of one batch, with every number behind the plots worked out by hand.

Batch of 2 samples x 4 positions; token 99 is the image token; sample 1 has one left pad.

    token  t0   t1   t2   t3  | t4   t5   t6   t7
    kind   img  img  txt  txt | pad  txt  txt  txt
    L0     0,1  0,2  1,3  3,1 | 2,3  1,0  2,0  3,(2 dropped by capacity)     4 experts, top-2
    L1     1    1    0    1   | 0    0    0    1                            2 experts, top-1

The connector saw sample 0's image as a 1 x 2 patch grid, top-2 choices [3, 0] and [1, 3].
"""

import torch

from vlmoe.analysis import BatchImages, LayerInfo, RoutingCollector
from vlmoe.moe import Routing

IMAGE_TOKEN = 99
CONNECTOR = LayerInfo("model.multi_modal_projector", "connector", num_experts=4, top_k=2)
L0 = LayerInfo("model.language_model.layers.0.mlp", "lm", num_experts=4, top_k=2)
L1 = LayerInfo("model.language_model.layers.1.mlp", "lm", num_experts=2, top_k=1)
EXPERT_NAMES = ["general", "table", "JSON", "code"]

INPUT_IDS = torch.tensor([[IMAGE_TOKEN, IMAGE_TOKEN, 5, 6], [0, 7, 8, 9]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
TAGS = [{"domain": "chart", "task": "qa"}, {"domain": "doc", "task": "qa"}]


def _routing(indices: list[list[int]], num_experts: int, kept: torch.Tensor | None = None) -> Routing:
    expert_indices = torch.tensor(indices)
    tokens, top_k = expert_indices.shape
    return Routing(
        expert_indices=expert_indices,
        combine_weights=torch.full((tokens, top_k), 1.0 / top_k),
        router_probs=torch.full((tokens, num_experts), 1.0 / num_experts),
        router_logits=torch.zeros(tokens, num_experts),
        kept=kept,
    )


def records() -> dict[str, Routing]:
    l0_kept = torch.ones(8, 2, dtype=torch.bool)
    l0_kept[7, 1] = False
    return {
        CONNECTOR.name: _routing([[3, 0], [1, 3]], 4),
        L0.name: _routing([[0, 1], [0, 2], [1, 3], [3, 1], [2, 3], [1, 0], [2, 0], [3, 2]], 4, l0_kept),
        L1.name: _routing([[1], [1], [0], [1], [0], [0], [0], [1]], 2),
    }


def collector(**options) -> RoutingCollector:
    """A collector that has seen the batch above once."""
    collector = RoutingCollector([CONNECTOR, L0, L1], expert_names={CONNECTOR.name: EXPERT_NAMES}, **options)
    collector.add(
        records(),
        input_ids=INPUT_IDS,
        attention_mask=ATTENTION_MASK,
        image_token_id=IMAGE_TOKEN,
        tags=TAGS,
        images=BatchImages(sample_index=[0], grids=[(1, 2)], paths=[""]),
        sample_ids=["s0", "s1"],
    )
    return collector
