"""Block sizes of the expert-major decode kernels (`vlmoe.moe.kernels.decode`): GPU time per call.

    python benchmarks/decode_blocks.py

Each block choice of one kernel is timed with the other kernel at its default, over the
generation model's layer (d 2048, 4 experts of 5632, top-2) and a fine-grained one (64 of 1408,
top-6) at 1, 8 and 64 tokens: the kernels' own time from the profiler, since three launches
from Python take as long as the GPU does here (s11-run6 timed whole calls with CUDA events and
read the host). Calls cycle through four routings, so the chosen experts' weights (100-280 MB)
come from memory as in decoding, not from L2. Every choice's output is checked against the
default's before it is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import kernel_time, print_table, write_json
from vlmoe.moe.kernels import decode

GATE_UP_CHOICES = [(16, 128), (32, 128), (64, 128), (16, 256), (32, 256), (64, 64)]
DOWN_CHOICES = [(16, 128), (32, 128), (64, 128), (16, 256), (32, 256)]
LAYERS = [(2048, 5632, 4, 2), (2048, 1408, 64, 6)]
TOKENS = [1, 8, 64]


def _cases(hidden: int, intermediate: int, num_experts: int, top_k: int, tokens: int):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, device="cuda", generator=generator) * 0.02
    down = torch.randn(num_experts, hidden, intermediate, device="cuda", generator=generator) * 0.02
    calls = []
    for _ in range(4):
        x = torch.randn(tokens, hidden, device="cuda", generator=generator)
        scores = torch.rand(tokens, num_experts, device="cuda", generator=generator)
        experts = scores.topk(top_k, dim=-1).indices
        weights = torch.softmax(torch.rand(tokens, top_k, device="cuda", generator=generator), dim=-1)
        calls.append((x.bfloat16(), gate_up.bfloat16(), down.bfloat16(), experts, weights))
    return calls


def _cycling(calls):
    """A step that runs the next call of `calls` each time."""
    turn = iter(range(10**9))
    return lambda: decode.glu_decode_triton(*calls[next(turn) % len(calls)])


def main() -> None:
    default_gate_up, default_down = decode._GATE_UP_BLOCKS, decode._DOWN_BLOCKS
    rows = []
    for hidden, intermediate, num_experts, top_k in LAYERS:
        layer = f"d={hidden}, {num_experts} x {intermediate}, top-{top_k}"
        for tokens in TOKENS:
            calls = _cases(hidden, intermediate, num_experts, top_k, tokens)
            expected = [decode.glu_decode_triton(*call).float() for call in calls]
            for kernel, choices in (("gate_up", GATE_UP_CHOICES), ("down", DOWN_CHOICES)):
                for blocks in choices:
                    decode._GATE_UP_BLOCKS = blocks if kernel == "gate_up" else default_gate_up
                    decode._DOWN_BLOCKS = blocks if kernel == "down" else default_down
                    for call, reference in zip(calls, expected, strict=True):
                        out = decode.glu_decode_triton(*call).float()
                        error = ((out - reference).norm() / reference.norm()).item()
                        assert error < 1e-2, (layer, tokens, kernel, blocks, error)
                    us = kernel_time(_cycling(calls), reps=40, warmup=8)[0] * 1e3
                    rows.append(
                        {"layer": layer, "tokens": tokens, "kernel": kernel, "blocks": list(blocks), "us": us}
                    )
            decode._GATE_UP_BLOCKS, decode._DOWN_BLOCKS = default_gate_up, default_down
    write_json("decode_blocks", rows)
    defaults = {"gate_up": list(default_gate_up), "down": list(default_down)}
    base = {
        (r["layer"], r["tokens"], r["kernel"]): r["us"] for r in rows if r["blocks"] == defaults[r["kernel"]]
    }
    print_table(
        f"expert-major decode kernels, us per call (defaults: gate_up {default_gate_up}, "
        f"down {default_down})",
        ["layer", "tokens", "kernel", "blocks", "us", "default / this"],
        [
            [
                r["layer"],
                r["tokens"],
                r["kernel"],
                "x".join(map(str, r["blocks"])),
                f"{r['us']:.1f}",
                f"{base[(r['layer'], r['tokens'], r['kernel'])] / r['us']:.2f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
