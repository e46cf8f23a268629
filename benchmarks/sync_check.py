"""Report every host synchronisation in one MoE fwd+bwd step (torch's sync debug mode)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import DTYPE, SwiGLU
from vlmoe.moe import MoEFeedForward


def main() -> None:
    # grouped: none expected; segments: one (the expert counts read to the host per forward).
    for backend in ("grouped", "segments"):
        moe = MoEFeedForward.from_dense(SwiGLU(256, 512).to("cuda", DTYPE), 8, 2, backend=backend)
        x = torch.randn(4096, 256, device="cuda", dtype=DTYPE, requires_grad=True)
        moe(x).sum().backward()  # warm-up (first-call syncs are not the steady state)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moe(x).sum().backward()
        torch.cuda.set_sync_debug_mode(0)
        print(f"backend={backend}: host syncs in one step: {len(caught)}")
        for warning in caught:
            print(" ", str(warning.message).splitlines()[0][:200], warning.filename, warning.lineno)


if __name__ == "__main__":
    main()
