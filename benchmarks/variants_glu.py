"""Experiment: SwiGLU experts as one fused gate_up grouped matmul + chunk vs two matmuls.

python benchmarks/variants_glu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import DTYPE, FFN_SHAPES, SwiGLU, _measure
from vlmoe.moe import GLUExperts, MoEFeedForward
from vlmoe.moe.dispatch import grouped_linear


def split_forward(self, x_sorted, plan):
    size = self.intermediate_size
    gate = grouped_linear(x_sorted, self.gate_up_proj[:, :size], plan)
    up = grouped_linear(x_sorted, self.gate_up_proj[:, size:], plan)
    return grouped_linear(F.silu(gate) * up, self.down_proj, plan)


def main() -> None:
    fused_forward = GLUExperts.forward
    for tokens, hidden, intermediate, num_experts, top_k in FFN_SHAPES:
        print(f"shape {(tokens, hidden, intermediate, num_experts, top_k)}")
        torch.manual_seed(0)
        dense = SwiGLU(hidden, intermediate).to("cuda", DTYPE)
        x_dense = torch.randn(tokens * top_k, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
        base = _measure("dense eager", dense, x_dense, 20)["ms"]
        moe = MoEFeedForward.from_dense(dense, num_experts, top_k, backend="grouped")
        with torch.no_grad():
            moe.router.gate.weight.normal_(std=0.5)
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
        for name, forward in (("fused gate_up", fused_forward), ("split gate/up", split_forward)):
            GLUExperts.forward = forward
            ms = _measure(f"vlmoe {name}", moe, x, 20)["ms"]
            print(f"    ratio to dense {base / ms:.3f}")
        GLUExperts.forward = fused_forward


if __name__ == "__main__":
    main()
