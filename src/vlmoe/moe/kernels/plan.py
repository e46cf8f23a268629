"""The dispatch plan's stable sort of token-slots by expert, as a counting sort in two kernels.

torch.sort of S int32 keys is a radix sort of four passes with its histogram and scans; the plan
then inverts the permutation (arange and an index_put), counts the slots per expert, takes their
cumulative sum and divides out the tokens: about a dozen launches per layer, forward. The keys
are expert ids below 257, so a counting sort does it all in two kernels and one small cumsum:

1. every block of slots counts its keys: hist # [bins, blocks];
2. torch.cumsum over the blocks gives each block's running count per bin;
3. every block places its slots: row = start of the bin (the bins' exclusive cumsum) + the bin's
   count in earlier blocks + the slot's rank among its block's slots of that bin (a cumsum of
   the one-hot keys). It writes sorted_slots, slot_rows, row_experts and sorted_tokens, and block 0
   the per-expert counts and the segment bounds.

Slot order breaks ties inside a block and blocks follow in order, so the result is torch's stable
sort exactly; everything is integer arithmetic, so it is deterministic. `sort_slots_reference`
is the same in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON

# Keys are expert ids plus the sentinel for dropped slots: 256 experts at most.
MAX_BINS = 257

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_histogram_kernel(keys, hist, S, NB, num_blocks, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
        # hist # [bins, blocks]: bin-major, so the cumsum over the blocks runs along the inner
        # dimension, which torch scans in parallel (along the outer one each column is a serial
        # loop: 0.2 ms at 1536 blocks).
        block = tl.program_id(0)
        slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
        key = tl.load(keys + slots, mask=slots < S, other=-1).to(tl.int32)  # -1: in no bin
        bins = tl.arange(0, BLOCK_B)
        counts = tl.sum((key[:, None] == bins[None, :]).to(tl.int32), axis=0)
        tl.store(hist + bins * num_blocks + block, counts, mask=bins < NB)

    @triton.jit
    def _place_slots_kernel(
        keys,
        hist,
        running,
        sorted_slots,
        slot_rows,
        row_experts,
        sorted_tokens,
        tokens_per_expert,
        segment_bounds,
        S,
        NB,
        E,
        num_blocks,
        K: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        block = tl.program_id(0)
        bins = tl.arange(0, BLOCK_B)
        bin_ok = bins < NB
        totals = tl.load(running + bins * num_blocks + num_blocks - 1, mask=bin_ok, other=0)  # [BLOCK_B]
        bin_start = tl.cumsum(totals, axis=0) - totals
        earlier = tl.load(running + bins * num_blocks + block, mask=bin_ok, other=0) - tl.load(
            hist + bins * num_blocks + block, mask=bin_ok, other=0
        )
        base = bin_start + earlier  # [BLOCK_B] first row of this block's slots of each bin
        slots = block * BLOCK_S + tl.arange(0, BLOCK_S)
        slot_ok = slots < S
        key = tl.load(keys + slots, mask=slot_ok, other=-1).to(tl.int32)
        one_hot = (key[:, None] == bins[None, :]).to(tl.int32)  # [BLOCK_S, BLOCK_B]
        rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # earlier same-bin slots
        row = tl.sum(one_hot * base[None, :], axis=1) + rank
        row64 = row.to(tl.int64)
        slot64 = slots.to(tl.int64)
        tl.store(sorted_slots + row64, slot64, mask=slot_ok)
        tl.store(slot_rows + slot64, row64, mask=slot_ok)
        tl.store(row_experts + row64, key, mask=slot_ok)
        tl.store(sorted_tokens + row64, slot64 // K, mask=slot_ok)
        if block == 0:
            expert_ok = bins < E
            tl.store(tokens_per_expert + bins, totals.to(tl.int64), mask=expert_ok)
            tl.store(segment_bounds + bins, bin_start, mask=expert_ok)
            tl.store(segment_bounds + E, tl.sum(tl.where(expert_ok, totals, 0), axis=0))


def _blocks(num_bins: int) -> tuple[int, int]:
    # A one-hot tile of 4096 int32s: 64 slots a block at E = 64, 1536 blocks at 98304 slots.
    block_b = triton.next_power_of_2(num_bins)
    return max(16, 4096 // block_b), block_b


def sort_slots_triton(
    slot_experts: Tensor, num_experts: int, top_k: int, dropped: bool = False
) -> dict[str, Tensor]:
    """The plan's tensors from the slots' expert ids (num_experts for a dropped slot, where
    `dropped`): sorted_slots, slot_rows, sorted_tokens (int64 [S]), row_experts (int32 [S]),
    tokens_per_expert (int64 [E], dropped slots not counted) and segment_bounds (int32 [E + 1])."""
    keys = slot_experts.reshape(-1).contiguous()
    # The sentinel bin only where slots are dropped: at E = 64 it would double the one-hot tile.
    num_slots, num_bins = keys.numel(), num_experts + int(dropped)
    if num_bins > MAX_BINS:
        raise ValueError(f"sort_slots_triton sorts at most {MAX_BINS - 1} experts, got {num_experts}")
    device = keys.device
    block_s, block_b = _blocks(num_bins)
    num_blocks = max(1, triton.cdiv(num_slots, block_s))
    hist = torch.empty(num_bins, num_blocks, device=device, dtype=torch.int32)
    _block_histogram_kernel[(num_blocks,)](
        keys, hist, num_slots, num_bins, num_blocks, BLOCK_S=block_s, BLOCK_B=block_b
    )
    running = hist.cumsum(1, dtype=torch.int32)
    out = dict(
        sorted_slots=torch.empty(num_slots, device=device, dtype=torch.int64),
        slot_rows=torch.empty(num_slots, device=device, dtype=torch.int64),
        row_experts=torch.empty(num_slots, device=device, dtype=torch.int32),
        sorted_tokens=torch.empty(num_slots, device=device, dtype=torch.int64),
        tokens_per_expert=torch.empty(num_experts, device=device, dtype=torch.int64),
        segment_bounds=torch.empty(num_experts + 1, device=device, dtype=torch.int32),
    )
    _place_slots_kernel[(num_blocks,)](
        keys, hist, running, *out.values(), num_slots, num_bins, num_experts, num_blocks,
        K=top_k, BLOCK_S=block_s, BLOCK_B=block_b,
    )  # fmt: skip
    return out


def sort_slots_reference(
    slot_experts: Tensor, num_experts: int, top_k: int, dropped: bool = False
) -> dict[str, Tensor]:
    """The same tensors from torch's stable sort (the path off CUDA, and above 256 experts)."""
    keys = slot_experts.reshape(-1)
    # int32 keys: half the radix-sort passes of int64.
    row_experts, sorted_slots = torch.sort(keys.to(torch.int32), stable=True)
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(sorted_slots.numel(), device=sorted_slots.device)
    # scatter_add, not bincount: CUDA's bincount reads the maximum back to size its output.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=keys.device)
    counts = counts.scatter_add_(0, keys, torch.ones_like(keys))[:num_experts]
    return dict(
        sorted_slots=sorted_slots,
        slot_rows=slot_rows,
        row_experts=row_experts,
        sorted_tokens=sorted_slots // top_k,
        tokens_per_expert=counts,
        segment_bounds=torch.nn.functional.pad(counts, (1, 0)).cumsum(0, dtype=torch.int32),
    )
