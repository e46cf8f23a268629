"""Expert containers: E experts' weights stacked so dispatch can run them as grouped matmuls.

Each container answers the `vlmoe.moe.dispatch.Experts` protocol: `forward(x_sorted, plan)` runs
all experts on expert-sorted rows, `expert_forward(e, x)` runs one expert (the reference path).
`gated_forward(x, gates)` runs every expert on every token weighted by a [T, E] gate matrix
(the dense backend). Weights use the nn.Linear layout per expert, [E, out, in], as
transformers' Mixtral does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vlmoe.moe.dispatch import DispatchPlan, combined_glu, gathered_linear, grouped_linear
from vlmoe.moe.kernels import swiglu as swiglu_kernels
from vlmoe.moe.kernels import use_triton
from vlmoe.moe.kernels.decode import glu_decode_reference, glu_decode_triton

Activation = Callable[[Tensor], Tensor]


class _LoopGatedForward:
    """gated_forward as a loop over experts: right for any container, fast for none."""

    num_experts: int

    def gated_forward(self, x: Tensor, gates: Tensor) -> Tensor:
        return sum(gates[:, e : e + 1] * self.expert_forward(e, x) for e in range(self.num_experts))


class GLUExperts(_LoopGatedForward, nn.Module):
    """E gated FFNs, down(act(gate(x)) * up(x)): the SwiGLU MLP of Llama/Mistral/Qwen."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: Activation):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = activation
        for weight in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(weight, std=0.02)

    # forward(x, plan, token_rows=True) takes the [T, I] token rows and gathers them inside the
    # first matmul, which then keeps x instead of the [S, I] gathered rows (`gathered_linear`).
    gathers_token_rows = True

    def forward(
        self,
        x_sorted: Tensor,
        plan: DispatchPlan,
        row_weights: Tensor | None = None,
        token_rows: bool = False,
    ) -> Tensor:
        """`row_weights` # [S]: each row's output times its weight, applied to the hidden
        activation inside the SwiGLU pass (down is linear, so this is the same product).
        `token_rows`: x_sorted holds the token rows # [T, I] (see `gathers_token_rows`)."""
        first_linear = gathered_linear if token_rows else grouped_linear
        gate_up = first_linear(x_sorted, self.gate_up_proj, plan)  # [S, 2F]
        if self._is_silu():
            # One fused pass each way on CUDA; gate_up is ours alone, so its memory takes the gradient.
            hidden = swiglu_kernels.swiglu(
                gate_up, overwrite_input=swiglu_kernels.OVERWRITE_IN_BACKWARD, row_scale=row_weights
            )
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up
            if row_weights is not None:
                hidden = hidden * row_weights.to(hidden.dtype).unsqueeze(-1)
        return grouped_linear(hidden, self.down_proj, plan)

    def combined_forward(self, x: Tensor, plan: DispatchPlan, combine_weights: Tensor) -> Tensor | None:
        """The combined output # [T, O] with the SwiGLU inside QuACK's first GEMM, where QuACK
        runs (`dispatch.combined_glu`); None elsewhere, for `forward` to take over."""
        if not self._is_silu():
            return None
        return combined_glu(x, self.gate_up_proj, self.down_proj, plan, combine_weights)

    def folds_row_weights(self) -> bool:
        """The SwiGLU kernel applies the combine weights for free (see `Experts.forward`)."""
        return self._is_silu()

    def _is_silu(self) -> bool:
        return isinstance(self.act_fn, nn.SiLU) or type(self.act_fn).__name__ == "SiLUActivation"

    def decode_forward(self, x: Tensor, expert_indices: Tensor, combine_weights: Tensor) -> Tensor:
        """The combined output of each token's chosen experts, without sorting (few tokens, no
        autograd): two Triton launches on CUDA, gathered-weight bmm elsewhere. x # [T, I] -> [T, I]."""
        args = (x, self.gate_up_proj, self.down_proj, expert_indices, combine_weights)
        # The kernels accumulate in float32: float64 (and other activations) take the torch path.
        same_dtype = x.dtype == self.gate_up_proj.dtype == self.down_proj.dtype
        if self._is_silu() and use_triton(x) and same_dtype and x.dtype != torch.float64:
            return glu_decode_triton(*args)
        return glu_decode_reference(*args, activation=self.act_fn)

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        gate, up = (x @ self.gate_up_proj[expert].t()).chunk(2, dim=-1)
        return (self.act_fn(gate) * up) @ self.down_proj[expert].t()


class MLPExperts(_LoopGatedForward, nn.Module):
    """E two-layer MLPs with biases, fc2(act(fc1(x))): Phi/CLIP FFNs and LLaVA projectors."""

    def __init__(
        self,
        num_experts: int,
        input_size: int,
        intermediate_size: int,
        output_size: int,
        activation: Activation,
        bias: bool = True,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, intermediate_size, input_size))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, output_size, intermediate_size))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, output_size)) if bias else None
        self.act_fn = activation
        for weight in (self.fc1_weight, self.fc2_weight):
            for expert_weight in weight.data:
                nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))

    gathers_token_rows = True  # as GLUExperts

    def forward(self, x_sorted: Tensor, plan: DispatchPlan, token_rows: bool = False) -> Tensor:
        first_linear = gathered_linear if token_rows else grouped_linear
        hidden = self.act_fn(first_linear(x_sorted, self.fc1_weight, plan, self.fc1_bias))
        return grouped_linear(hidden, self.fc2_weight, plan, self.fc2_bias)

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        hidden = x @ self.fc1_weight[expert].t()
        if self.fc1_bias is not None:
            hidden = hidden + self.fc1_bias[expert]
        out = self.act_fn(hidden) @ self.fc2_weight[expert].t()
        return out if self.fc2_bias is None else out + self.fc2_bias[expert]


class LoRAExperts(nn.Module):
    """E low-rank adapters, scaling * B_e(A_e(dropout(x))). B starts at zero (output 0)."""

    def __init__(
        self,
        num_experts: int,
        input_size: int,
        output_size: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, input_size))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, output_size, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for expert_weight in self.lora_A.data:
            # PEFT's init for A, so one expert matches `peft.LoraConfig(init_lora_weights=True)`.
            nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))

    def forward(self, x_sorted: Tensor, plan: DispatchPlan) -> Tensor:
        low_rank = grouped_linear(self.dropout(x_sorted), self.lora_A, plan)  # [S, r]
        return grouped_linear(low_rank, self.lora_B, plan) * self.scaling

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        return (self.dropout(x) @ self.lora_A[expert].t()) @ self.lora_B[expert].t() * self.scaling

    def gated_forward(self, x: Tensor, gates: Tensor, always_on: LoRAExperts | None = None) -> Tensor:
        """sum_e gates[:, e] * expert_e(x), plus `always_on`'s single expert (MoCLE's universal
        LoRA, same rank and scaling) folded into the same two matmuls."""
        low_rank = self.dropout(x) @ self.stacked_A(always_on).t()  # all experts' A at once, [T, E*r]
        return self.scale_blocks(low_rank, gates, always_on) @ self.stacked_B(always_on).t()

    def stacked_A(self, always_on: LoRAExperts | None = None) -> Tensor:
        """Every expert's A (then `always_on`'s) as one matrix. # [E*r, I]"""
        lora_A = self.lora_A if always_on is None else torch.cat([self.lora_A, always_on.lora_A])
        return lora_A.reshape(-1, lora_A.shape[-1])

    def stacked_B(self, always_on: LoRAExperts | None = None) -> Tensor:
        """Every expert's B (then `always_on`'s) side by side. # [O, E*r]"""
        lora_B = self.lora_B if always_on is None else torch.cat([self.lora_B, always_on.lora_B])
        return lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], -1)

    def scale_blocks(self, low_rank: Tensor, gates: Tensor, always_on: LoRAExperts | None = None) -> Tensor:
        """Each expert's r columns of low_rank # [T, E*r] times its gate # [T, E] and `scaling`
        (`always_on`'s block gets gate 1): [T, E] multiplies instead of a pass over [T, O]."""
        return self.apply_block_gates(low_rank, self.block_gates(gates, always_on))

    def block_gates(self, gates: Tensor, always_on: LoRAExperts | None = None) -> Tensor:
        """Each block's multiplier # [T, blocks]: its gate # [T, E] times `scaling`, then 1 times
        `scaling` for `always_on`'s block (same rank and scaling)."""
        if always_on is not None:
            gates = torch.cat([gates, gates.new_ones(gates.shape[0], 1)], dim=1)
        return gates * self.scaling

    def apply_block_gates(self, low_rank: Tensor, block_gates: Tensor) -> Tensor:
        """low_rank # [T, blocks*r] with each block's r columns times its multiplier # [T, blocks]."""
        blocks = low_rank.unflatten(1, (block_gates.shape[1], self.rank))  # [T, blocks, r]
        return (blocks * block_gates.unsqueeze(-1)).flatten(1)

    def delta_weight(self, expert: int, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight update of one expert, computed in `dtype` (default the factors'). # [O, I]"""
        lora_B, lora_A = self.lora_B[expert], self.lora_A[expert]
        if dtype is not None:
            lora_B, lora_A = lora_B.to(dtype), lora_A.to(dtype)
        return lora_B @ lora_A * self.scaling


class ModuleExperts(_LoopGatedForward, nn.Module):
    """E arbitrary row-wise modules (e.g. a family's own projector): a loop, for any structure."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        if not modules:
            raise ValueError("ModuleExperts needs at least one module")
        self.experts = nn.ModuleList(modules)
        self.num_experts = len(modules)

    def forward(self, x_sorted: Tensor, plan: DispatchPlan) -> Tensor:
        counts = plan.host_counts()
        num_computed = sum(counts)
        segments = torch.split(x_sorted[:num_computed], counts)
        pieces = [self.experts[e](segment) for e, segment in enumerate(segments)]
        tail = x_sorted[num_computed:]
        if tail.shape[0]:
            pieces.append(pieces[0].new_zeros(tail.shape[0], pieces[0].shape[-1]))
        return torch.cat(pieces)

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        return self.experts[expert](x)


def _linear_pair(module: nn.Module) -> tuple[nn.Linear, nn.Linear, Activation] | None:
    """(first linear, second linear, activation) of a two-layer MLP, by the names HF uses."""
    if isinstance(module, nn.Sequential) and len(module) == 3:
        # Sequential(Linear, activation, Linear): Qwen2-VL's patch-merger MLP.
        fc1, act, fc2 = module
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and not isinstance(act, nn.Linear):
            return fc1, fc2, act
    for first, second, activations in (
        ("fc1", "fc2", ("activation_fn", "act", "act_fn")),  # Phi, CLIP/SigLIP MLP
        ("linear_1", "linear_2", ("act", "act_fn")),  # LLaVA projector
    ):
        fc1, fc2 = getattr(module, first, None), getattr(module, second, None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            for name in activations:
                if callable(getattr(module, name, None)):
                    return fc1, fc2, getattr(module, name)
    return None


def experts_from_dense(module: nn.Module, num_experts: int) -> GLUExperts | MLPExperts:
    """E copies of a dense MLP as stacked experts, so each expert computes exactly `module`.

    Recognises the gated MLP (gate_proj/up_proj/down_proj + act_fn) and two-layer MLPs
    (fc1/fc2 or linear_1/linear_2 with an activation attribute).

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaMLP, LlamaConfig
        >>> mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2))
        >>> experts_from_dense(mlp, 4).gate_up_proj.shape
        torch.Size([4, 32, 8])
    """
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if all(isinstance(m, nn.Linear) for m in (gate, up, down)) and callable(getattr(module, "act_fn", None)):
        if any(m.bias is not None for m in (gate, up, down)):
            raise ValueError(f"{type(module).__name__}: gated MLPs with biases are not supported yet")
        experts = GLUExperts(num_experts, gate.in_features, gate.out_features, copy.deepcopy(module.act_fn))
        experts = experts.to(device=gate.weight.device, dtype=gate.weight.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.cat([gate.weight, up.weight]).expand_as(experts.gate_up_proj))
            experts.down_proj.copy_(down.weight.expand_as(experts.down_proj))
        return experts
    pair = _linear_pair(module)
    if pair is not None:
        fc1, fc2, act = pair
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError(f"{type(module).__name__}: one linear has a bias and the other not; unsupported")
        experts = MLPExperts(
            num_experts,
            fc1.in_features,
            fc1.out_features,
            fc2.out_features,
            copy.deepcopy(act),
            bias=fc1.bias is not None,
        )
        experts = experts.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            experts.fc1_weight.copy_(fc1.weight.expand_as(experts.fc1_weight))
            experts.fc2_weight.copy_(fc2.weight.expand_as(experts.fc2_weight))
            if experts.fc1_bias is not None:
                experts.fc1_bias.copy_(fc1.bias.expand_as(experts.fc1_bias))
                experts.fc2_bias.copy_(fc2.bias.expand_as(experts.fc2_bias))
        return experts
    raise ValueError(
        f"cannot upcycle {type(module).__name__}: expected a gated MLP (gate_proj, up_proj, down_proj, "
        "act_fn) or a two-layer MLP (fc1/fc2 or linear_1/linear_2 with an activation); "
        "wrap other modules with vlmoe.moe.ModuleExperts"
    )
