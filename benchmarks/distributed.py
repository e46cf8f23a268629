"""1 vs N GPUs: tokens/s and peak memory per GPU of DDP, FSDP2 and expert parallelism, and the
first steps' losses against one GPU with the same global batch.

    torchrun --nproc-per-node 2 benchmarks/distributed.py [--layers 12] [--batch 8] [--seq 2048]
    torchrun --nproc-per-node 2 benchmarks/distributed.py --tiny     # CPU + gloo, a tiny shape

Model: train_step.py's upcycled LLaVA (Llama LM d=2048, FFN 5632 -> 4 experts top-2, bf16, SDPA),
text-only batches. The global batch is `--batch` sequences: one GPU takes all of them (rank 0
alone, the others wait), N GPUs take batch/N each. Every run starts from the same weights and
data; the balance loss uses the global batch's expert counts (load_balance_scope="global"), so
the N-GPU losses are the 1-GPU ones up to reduction order (bf16 on GPU).
- ddp: DistributedDataParallel over the whole model;
- fsdp2: torch.distributed.fsdp.fully_shard on each decoder layer and the root;
- ep: experts sharded over the ranks (vlmoe.moe.shard_experts, all-to-all), the rest DDP.
Step = forward with labels + aux loss, backward, AdamW. Writes distributed.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlmoe
from common import print_table, write_json
from train_step import FFN, HIDDEN, VOCAB, llava
from vlmoe.moe import expert_parallel_ddp, set_load_balance_scope, shard_experts

COMPARED_STEPS = 3  # loss equality is checked on these first steps (bf16 rounding drifts later)
TINY = {"hidden": 64, "ffn": 128, "vocab": 512, "heads": 4}
# The tower takes no part in text-only batches; the smallest one keeps the CPU check quick.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def build(args, device: torch.device, dtype: torch.dtype):
    """The upcycled LLaVA, the same on every rank (seeded), with global balance statistics."""
    shape = TINY if args.tiny else {"hidden": HIDDEN, "ffn": FFN, "vocab": VOCAB, "heads": 16}
    torch.manual_seed(0)
    model = llava(
        args.layers,
        shape["ffn"],
        hidden=shape["hidden"],
        heads=shape["heads"],
        vocab=shape["vocab"],
        vision=TINY_VISION,
        device="cpu",  # then moved: the same initial weights on every rank and device type
        dtype=torch.float32,
    )
    vlmoe.upcycle_ffn(model, num_experts=4, top_k=2)
    model.model.vision_tower.requires_grad_(False)  # text-only batches: the tower takes no part
    model.model.multi_modal_projector.requires_grad_(False)
    return set_load_balance_scope(model.to(device, dtype).train(), "global"), shape["vocab"]


def wrap(mode: str, model, device: torch.device):
    """The model as `mode` trains it; returns (module to call, module whose aux loss to read)."""
    if mode == "single":
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), model
    if mode == "ep":
        expert_parallel_ddp(shard_experts(model))
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


def run(mode, args, template, input_ids, device) -> dict:
    """Train `args.steps` steps; losses (global means), median step seconds, peak memory."""
    model = copy.deepcopy(template)
    if mode == "single":  # alone on rank 0: its batch is the global one, and no all-reduce may wait
        set_load_balance_scope(model, "device")
    forward, owner = wrap(mode, model, device)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if mode != "single":
        per_rank = input_ids.shape[0] // dist.get_world_size()
        input_ids = input_ids[dist.get_rank() * per_rank : (dist.get_rank() + 1) * per_rank]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = forward(input_ids=input_ids, labels=input_ids).loss + vlmoe.aux_loss(owner)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if mode != "single":
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(float(loss))  # a host sync: the step is finished when it returns
        seconds.append(time.perf_counter() - start)
    timed = sorted(seconds[args.warmup :])
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's peak resident memory (kilobytes on Linux)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del forward, owner, model, optimiser
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"losses": losses, "step_s": timed[len(timed) // 2], "peak_gib": peak_gib}


def gathered_peaks(value: float) -> list[float]:
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, value)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--modes", default="ddp,fsdp2,ep")
    parser.add_argument("--tiny", action="store_true", help="CPU + gloo, a tiny shape (a smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.seq, args.steps, args.warmup, args.lr = 2, 32, 3, 1, 1e-3
    on_gpu = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must divide over {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    template, vocab = build(args, device, dtype)
    generator = torch.Generator().manual_seed(1)  # the same global batch on every rank
    input_ids = torch.randint(0, vocab - 2, (args.batch, args.seq), generator=generator).to(device)
    tokens = args.batch * args.seq

    results = {}
    if rank == 0:  # one GPU, the whole global batch; the others wait
        results["single"] = run("single", args, template, input_ids, device)
    dist.barrier()
    reference = [None]
    if rank == 0:
        reference = [results["single"]]
    dist.broadcast_object_list(reference)
    rows = [
        {
            "mode": "1 process",
            "processes": 1,
            "tokens_per_s": tokens / reference[0]["step_s"],
            "peak_gib_per_process": [reference[0]["peak_gib"]],
            "losses": reference[0]["losses"],
            "max_rel_loss_diff": 0.0,
        }
    ]
    for mode in args.modes.split(","):
        result = run(mode, args, template, input_ids, device)
        diffs = [abs(a - b) / abs(b) for a, b in zip(result["losses"], reference[0]["losses"], strict=True)]
        rows.append(
            {
                "mode": mode,
                "processes": world,
                "tokens_per_s": tokens / result["step_s"],
                "peak_gib_per_process": gathered_peaks(result["peak_gib"]),
                "losses": result["losses"],
                "max_rel_loss_diff": max(diffs[:COMPARED_STEPS]),  # the first steps, before drift
            }
        )
    if rank == 0:
        report(rows, args, world, torch.cuda.get_device_name(device) if on_gpu else "CPU (gloo)")
    dist.destroy_process_group()


def report(rows: list[dict], args, world: int, device_name: str) -> None:
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    write_json("distributed_tiny" if args.tiny else "distributed", rows)
    print_table(
        f"{device_name}, {world} processes, {args.layers} layers, global batch {args.batch}x{args.seq}, "
        f"{'fp32' if args.tiny else 'bf16'}; speedup = tokens/s / 1-process tokens/s (same global batch)",
        [
            "mode",
            "procs",
            "tokens/s",
            "speedup",
            "peak GiB / proc",
            f"max rel loss diff, steps 1-{COMPARED_STEPS}",
        ],
        [
            [
                r["mode"],
                str(r["processes"]),
                f"{r['tokens_per_s']:.0f}",
                f"{r['speedup']:.2f}",
                " / ".join(f"{p:.2f}" for p in r["peak_gib_per_process"]),
                f"{r['max_rel_loss_diff']:.1e}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
