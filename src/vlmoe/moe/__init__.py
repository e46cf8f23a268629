"""The sparse core: router, dispatch, experts, the three sparse layers, and routing records.

Independent of Hugging Face: everything here works on plain torch modules and tensors.
"""

from vlmoe.moe.config import RouterConfig
from vlmoe.moe.dispatch import DispatchPlan, dispatch, grouped_dispatch, plan_dispatch, reference_dispatch
from vlmoe.moe.expert_parallel import (
    ExpertParallelExperts,
    expert_parallel_ddp,
    shard_experts,
    unshard_experts,
)
from vlmoe.moe.experts import GLUExperts, LoRAExperts, MLPExperts, ModuleExperts, experts_from_dense
from vlmoe.moe.layers import MoEConnector, MoEFeedForward, MoLELinear, SparseLayer
from vlmoe.moe.records import (
    aux_loss,
    aux_losses_by_layer,
    record_routing,
    routes_by_cluster,
    routing_inputs,
    routing_records,
    set_load_balance_scope,
    sparse_layers,
)
from vlmoe.moe.router import Router, Routing, capacity_keep_mask, load_balancing_loss, router_z_loss

__all__ = [
    "DispatchPlan",
    "ExpertParallelExperts",
    "GLUExperts",
    "LoRAExperts",
    "MLPExperts",
    "MoEConnector",
    "MoEFeedForward",
    "MoLELinear",
    "ModuleExperts",
    "Router",
    "RouterConfig",
    "Routing",
    "SparseLayer",
    "aux_loss",
    "aux_losses_by_layer",
    "capacity_keep_mask",
    "dispatch",
    "expert_parallel_ddp",
    "experts_from_dense",
    "grouped_dispatch",
    "load_balancing_loss",
    "plan_dispatch",
    "record_routing",
    "reference_dispatch",
    "router_z_loss",
    "routes_by_cluster",
    "routing_inputs",
    "routing_records",
    "set_load_balance_scope",
    "shard_experts",
    "sparse_layers",
    "unshard_experts",
]
