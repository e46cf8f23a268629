"""What `vlmoe analyze` does, callable from Python: load, read data, collect, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmoe.analysis.report import write_report
from vlmoe.analysis.run import collect_routing, from_eval_samples, read_samples, routed_layers

TINY_PREFIX = "tiny:"


def load_model(model: str, device: torch.device | str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """A model and processor: `tiny:<family>` (upcycled FFNs + upcycled MoE connector) or a directory.

    A tiny model's weights and routers depend only on `seed`, so its analysis is reproducible.

    Example:
        >>> model, processor = load_model("tiny:llava")
        >>> type(model.model.multi_modal_projector).__name__
        'MoEConnector'
    """
    if model.startswith(TINY_PREFIX):
        import vlmoe

        # A private RNG stream: the routers' random init depends only on `seed`, and the caller's
        # stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built, processor = vlmoe.models.tiny(model[len(TINY_PREFIX) :], seed=seed)
            vlmoe.upcycle_ffn(built, num_experts=4, top_k=2)
            vlmoe.install_moe_connector(built, init="upcycle", num_experts=4, top_k=2)
        return built.to(device), processor
    from vlmoe.eval.runner import load_model_for_eval

    return load_model_for_eval(model, device)


def run_analyze(
    model: str,
    *,
    data: Path,
    out: Path,
    task: str | None = None,
    logs: Path | None = None,
    eval_dir: Path | None = None,
    max_samples: int | None = None,
    batch_size: int = 4,
    image_dir: Path | None = None,
    expert_names: str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Route `data` through `model`, then write the report into `out`; returns the HTML path.

    `seed` seeds a tiny:<family> model.

    Example:
        >>> html = run_analyze("tiny:llava", data=Path("charts.json"), out=Path("runs/a"))  # doctest: +SKIP
    """
    if task is not None:
        from vlmoe.eval.tasks import read_task

        samples = from_eval_samples(read_task(task, data, image_dir))
    else:
        samples = read_samples(data, image_dir)
    samples = samples[:max_samples]
    if not samples:
        raise ValueError(f"no samples to route in {data}")
    loaded, processor = load_model(model, device, seed)
    names = {}
    if expert_names:
        connectors = [info.name for info in routed_layers(loaded) if info.kind == "connector"]
        if not connectors:
            raise ValueError("--expert-names names connector experts, but the model has no MoE connector")
        names = {name: [part.strip() for part in expert_names.split(",")] for name in connectors}
    meta = {
        "model": model,
        "data": str(data),
        "task": task,
        "max_samples": max_samples,
        "device": str(device),
        **({"seed": seed} if model.startswith(TINY_PREFIX) else {}),
    }
    stats = collect_routing(
        loaded, processor, samples, batch_size=batch_size, expert_names=names, meta=meta, progress=progress
    )
    return write_report(stats, out, logs=logs, eval_dir=eval_dir, title=f"Routing analysis: {model}")
