"""Where the GPU idles inside one MoE step: gaps between consecutive kernels, largest first.

python benchmarks/gaps.py [T d ff E k]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import DTYPE, SwiGLU, _train_step
from vlmoe.moe import MoEFeedForward


def main() -> None:
    tokens, hidden, intermediate, num_experts, top_k = (
        int(v) for v in (sys.argv[1:] or [16384, 2048, 1408, 64, 6])
    )
    torch.manual_seed(0)
    moe = MoEFeedForward.from_dense(SwiGLU(hidden, intermediate).to("cuda", DTYPE), num_experts, top_k)
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.5)
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    step = _train_step(moe, x, torch.randn_like(x))
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 3
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 3
    print(f"kernels per step {len(kernels) // 3}, busy {busy / 1e3:.3f} ms, span {span / 1e3:.3f} ms")
    gaps = []
    for before, after in itertools.pairwise(kernels):
        gap = after.time_range.start - before.time_range.end
        if gap > 0:
            gaps.append((gap, before.name[:60], after.name[:60]))
    gaps.sort(reverse=True)
    print(f"total gap per step {sum(g for g, *_ in gaps) / 3 / 1e3:.3f} ms; largest:")
    for gap, before, after in gaps[:15]:
        print(f"  {gap:8.1f} us  after {before}  ->  {after}")


if __name__ == "__main__":
    main()
