"""Where the MoE FFN's time goes: top CUDA kernels of one fwd+bwd step, dense vs vlmoe.

python benchmarks/profile_moe.py [T d ff E k]   # dense, compiled dense, grouped, segments
python benchmarks/profile_moe.py mole     # MoLE (4 experts r=64 top-1) vs PEFT bf16 LoRA r=64
python benchmarks/profile_moe.py T d ff E k --probe dgated --probe more   # and the layer probed
    (moe_layer.py's PROBES: a code path switched around each step), no segments
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import time_cuda
from moe_layer import DTYPE, SwiGLU, _train_step
from vlmoe.moe import MoEFeedForward


def host_ms_per_step(step, reps: int = 5) -> float:
    """Host time to queue one step; if it exceeds the GPU time, the layer is launch-bound."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    host = (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    return host


def profile_step(name: str, step) -> None:
    for _ in range(3):
        step()
    print(f"{name}: host {host_ms_per_step(step):.3f} ms per step to queue")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernel_ms = (
        sum(a.self_device_time_total for a in averages if a.device_type == torch.autograd.DeviceType.CUDA)
        / 1e3
    )
    # Wall time above the kernel sum is time the GPU waits (launch gaps, host syncs).
    print(f"\n=== {name}: {time_cuda(step):.3f} ms per step, kernels {kernel_ms:.3f} ms")
    print(averages.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    # Every kernel, not only the top rows: the small router, plan and combine kernels add up.
    kernels = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
    print(f"every kernel of {name}, self ms (calls):")
    for a in sorted(kernels, key=lambda a: -a.self_device_time_total):
        print(f"  {a.self_device_time_total / 1e3:8.3f}  ({a.count:3d})  {a.key[:110]}")


def profile_mole(tokens: int = 16384, fan_in: int = 4096, fan_out: int = 11008) -> None:
    from torch import nn

    from moe_layer import _PeftLoRA
    from vlmoe.moe import MoLELinear

    torch.manual_seed(0)
    x = torch.randn(tokens, fan_in, device="cuda", dtype=DTYPE, requires_grad=True)
    grad = torch.randn(tokens, fan_out, device="cuda", dtype=DTYPE)

    def base():
        return nn.Linear(fan_in, fan_out, bias=False).to("cuda", DTYPE).requires_grad_(False)

    profile_step("PEFT LoRA r=64 bf16", _train_step(_PeftLoRA(base(), 64), x, grad))
    mole = MoLELinear(base(), num_experts=4, rank=64, alpha=128, top_k=1, backend="dense")
    with torch.no_grad():
        mole.experts.lora_B.normal_(std=0.02)
        mole.router.gate.weight.normal_(std=0.5)
    profile_step("vlmoe MoLE dense", _train_step(mole, x, grad))


def main() -> None:
    if sys.argv[1:] == ["mole"]:
        return profile_mole()
    from moe_layer import PROBES, prepare_probe

    parser = argparse.ArgumentParser()
    parser.add_argument("shape", type=int, nargs="*", default=[16384, 2048, 5632, 4, 2], help="T d ff E k")
    parser.add_argument("--probe", action="append", default=[], choices=sorted(PROBES))
    args = parser.parse_args()
    tokens, hidden, intermediate, num_experts, top_k = args.shape
    torch.manual_seed(0)
    dense = SwiGLU(hidden, intermediate).to("cuda", DTYPE)
    x_dense = torch.randn(tokens * top_k, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    grad_dense = torch.randn_like(x_dense)
    profile_step("dense", _train_step(dense, x_dense, grad_dense))
    profile_step("dense, torch.compile", _train_step(torch.compile(dense), x_dense, grad_dense))
    moe = MoEFeedForward.from_dense(dense, num_experts, top_k, backend="grouped")
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.5)
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    profile_step("vlmoe grouped", _train_step(moe, x, torch.randn_like(x)))
    for probe in (PROBES[p] for p in args.probe):
        prepare_probe(probe, moe, x)  # its first step (and in-step ranking) before the profiled ones
        profile_step(probe.label, _train_step(moe, x, torch.randn_like(x), probe.around))
    if not args.probe:
        moe.backend = "segments"
        profile_step("vlmoe segments", _train_step(moe, x, torch.randn_like(x)))


if __name__ == "__main__":
    main()
