"""What `vlmoe analyze` does, callable from Python: load, read data, collect, report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmoe.analysis.ablation import read_ablation
from vlmoe.analysis.logs import read_log_history
from vlmoe.analysis.report import write_report
from vlmoe.analysis.run import collect_routing, from_eval_samples, read_samples, routed_layers
from vlmoe.data.folders import output_folder
from vlmoe.device import resolve_device

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

    if not (Path(model) / "config.json").is_file():  # said here: load_model_for_eval speaks of vlmoe eval
        raise FileNotFoundError(
            f"{model} is not a local model directory (no config.json); vlmoe analyze loads local copies "
            "only (save one with vlmoe.save(model, path, processor=processor)), or tiny:<family> for a "
            "tiny random model"
        )
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

    Every option is checked before the model is loaded (`logs` and `eval_dir` are read), except the
    expert names' count, which is checked against the model's connector before any sample is
    routed. `seed` seeds a tiny model.

    Example:
        >>> html = run_analyze("tiny:llava", data=Path("charts.json"), out=Path("runs/a"))  # doctest: +SKIP
    """
    out = output_folder(out)
    device = resolve_device(device)
    if max_samples is not None and max_samples < 1:  # -1 would silently drop the last sample
        raise ValueError(f"--max-samples {max_samples}: give a number >= 1, or leave it out for all samples")
    if logs is not None:
        read_log_history(logs)  # a missing or unreadable --logs file fails now, not as a report line
    if eval_dir is not None and not Path(eval_dir).is_dir():
        raise FileNotFoundError(
            f"--eval-dir {eval_dir} is not a folder; pass the folder of vlmoe eval results"
        )
    if eval_dir is not None and not read_ablation(eval_dir).rows:  # two runs of one setting raise here
        raise ValueError(
            f"--eval-dir {eval_dir}: no summary.json with metrics under this folder; pass the folder "
            "holding one model's vlmoe eval --out folders (routed and --force-expert i)"
        )
    names_given = _expert_names(expert_names)
    if task is not None:
        from vlmoe.eval.tasks import read_task

        samples = from_eval_samples(read_task(task, data, image_dir))
    else:
        samples = read_samples(data, image_dir)
    samples = samples[:max_samples]
    if not samples:
        raise ValueError(f"no samples to route in {data}")
    loaded, processor = load_model(model, device, seed)
    if not routed_layers(loaded):  # said here: collect_routing cannot name the folder
        raise ValueError(
            f"{model} has no routed sparse layer (MoE FFN, MoLE or MoE connector): it is a dense model; "
            "pass a sparse model's folder (e.g. the final/ of a MoE stage), or apply vlmoe.upcycle_ffn / "
            "add_mole / install_moe_connector and vlmoe.save it"
        )
    names = {}
    if names_given:
        connectors = [info for info in routed_layers(loaded) if info.kind == "connector"]
        if not connectors:
            raise ValueError("--expert-names names connector experts, but the model has no MoE connector")
        for info in connectors:
            if len(names_given) != info.num_experts:
                raise ValueError(
                    f"--expert-names gives {len(names_given)} names ({', '.join(names_given)}) but the "
                    f"connector {info.name} has {info.num_experts} experts; give one name per expert"
                )
        names = {info.name: names_given for info in connectors}
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


def _expert_names(option: str | None) -> list[str]:
    """The names in `--expert-names a,b,c`; an empty one is refused."""
    if option is None:
        return []
    names = [part.strip() for part in option.split(",")]
    if not all(names):
        raise ValueError(
            f"--expert-names {option!r} has an empty name; give names like general,table,JSON,code"
        )
    return names
