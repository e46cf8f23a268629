"""Does torch.compile trace the sparse layers without graph breaks, and does it help?

python benchmarks/compile_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import DTYPE, SwiGLU, _measure
from vlmoe.moe import MoEFeedForward


def main() -> None:
    tokens, hidden, intermediate, num_experts, top_k = 16384, 2048, 1408, 64, 6
    torch.manual_seed(0)
    moe = MoEFeedForward.from_dense(SwiGLU(hidden, intermediate).to("cuda", DTYPE), num_experts, top_k)
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    explanation = torch._dynamo.explain(moe)(x)
    print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
    for reason in explanation.break_reasons[:10]:
        print("  break:", str(reason.reason)[:200])
    eager = _measure("vlmoe grouped, eager", moe, x, 20)["ms"]
    compiled = _measure("vlmoe grouped, torch.compile", torch.compile(moe), x, 20)["ms"]
    print(f"compile gain: {eager / compiled:.3f}x")


if __name__ == "__main__":
    main()
