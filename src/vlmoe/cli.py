"""Command line: `vlmoe --help`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlmoe.cli_errors import reported
from vlmoe.data.cli import data_app

if TYPE_CHECKING:  # torch loads inside the commands, so `vlmoe --help` stays fast
    import torch

app = typer.Typer(
    name="vlmoe",
    help="Sparse Mixture-of-Experts vision-language models: build, train, evaluate, explain.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

app.add_typer(data_app, name="data")


@app.callback()
def main() -> None:
    """vlmoe: sparse MoE vision-language models."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Report folder (metrics, curves, predictions, run).")] = Path(
        "demo-report"
    ),
    recipe: Annotated[str, typer.Option(help="Recipe to run: a built-in name or a .yaml file.")] = "demo",
    scale: Annotated[
        str, typer.Option(help="Recipe scale; tiny runs on a CPU in minutes; none: the recipe's own sizes.")
    ] = "tiny",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted demo run in --out.")] = False,
) -> None:
    """Synthetic charts, a tiny VLM, ChartMoE (aligned experts, MoE connector, SFT), held-out scores."""
    from vlmoe.demo import run_demo

    with reported("demo"):
        run_demo(
            out=out, recipe=recipe, scale=None if scale == "none" else scale, device=device, resume=resume
        )


@app.command()
def train(
    recipe: Annotated[
        str,
        typer.Argument(
            help="Built-in recipe (moe-llava, chartmoe, ...), a .yaml file or a run's recipe.json."
        ),
    ],
    scale: Annotated[str | None, typer.Option(help="A scale the recipe defines, e.g. tiny.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory; default the recipe's.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in the output directory from its last checkpoint.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default cuda when available.")] = None,
) -> None:
    """Train a recipe stage by stage; --resume skips finished stages and continues the interrupted one."""
    from vlmoe.data.folders import output_folder
    from vlmoe.train import load_recipe, run_recipe
    from vlmoe.train.distributed import is_main_process

    with reported("train"):
        if out is not None:
            output_folder(out)
        loaded = load_recipe(recipe, scale=scale, output_dir=out)
        results = run_recipe(loaded, resume=resume, device=device)
    for result in results if is_main_process() else []:  # under torchrun, one list, not one per rank
        typer.echo(f"{result.name}: {result.model_dir}{' (done earlier)' if result.skipped else ''}")


@app.command(name="eval")
def evaluate(
    model: Annotated[
        Path, typer.Argument(help="Local model directory (vlmoe.save or save_pretrained + processor).")
    ],
    task: Annotated[str, typer.Option(help="Benchmark: chartqa, pope, scienceqa, textvqa, vqav2 or llava.")],
    data: Annotated[
        Path, typer.Option(help="Local copy of the benchmark in its published layout, or a LLaVA JSON.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Results folder; default eval/<model>/<task>, where a recipe stage's final/ or "
            "checkpoint-N/ model is named with its run and stage (eval/<run>-<stage>-final/<task>)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    pot: Annotated[
        bool, typer.Option(help="Run Python answers in the sandbox and score what they print.")
    ] = False,
    pot_interpreter: Annotated[
        str | None,
        typer.Option(
            help="Python that runs --pot programs; under root pick one other users can run "
            "(e.g. /usr/bin/python3) so the sandbox also drops to a throwaway user id."
        ),
    ] = None,
    force_expert: Annotated[
        int | None, typer.Option(help="Send every token to this expert (ablation).")
    ] = None,
    force_where: Annotated[
        str | None, typer.Option(help="Where --force-expert applies: connector (default) or all.")
    ] = None,
    image_dir: Annotated[
        Path | None, typer.Option(help="Folder holding the images, if not the layout's.")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Split to read (default test; val2014 for VQAv2).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples (a smoke run).")] = None,
    clusters: Annotated[
        Path | None,
        typer.Option(help="MoCLE: the centroids folder the model was trained with; default MODEL/clusters."),
    ] = None,
    embedding_model: Annotated[
        Path | None,
        typer.Option(
            help="MoCLE: a local sentence-transformers model instead of the one clusters.json names."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, if any).")] = 0,
    device: Annotated[str, typer.Option(help="Torch device; auto = cuda if available, else cpu.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="float32, bfloat16 or float16; auto = bfloat16 on GPU, float32 on CPU.")
    ] = "auto",
    merge_lora: Annotated[
        bool,
        typer.Option(
            help="Merge the model's plain and universal LoRA into its base weights first (vlmoe.merge_lora): "
            "faster decoding; the logits move by the merged weights' rounding."
        ),
    ] = False,
) -> None:
    """Answer a benchmark with a model; predictions are appended as they come, so a rerun resumes."""
    from rich.console import Console

    from vlmoe.eval.clusters import default_clusters_dir
    from vlmoe.eval.generate import GenerationSettings
    from vlmoe.eval.report import summary_table
    from vlmoe.eval.runner import EvalConfig, load_model_for_eval, run_eval
    from vlmoe.eval.tasks import read_task
    from vlmoe.moe import routes_by_cluster

    with reported("eval"):
        torch_device, torch_dtype = _device_and_dtype(device, dtype)
        if force_where is not None and force_expert is None:
            raise ValueError("--force-where says where --force-expert applies; give --force-expert I too")
        if limit is not None and limit < 1:
            raise ValueError(f"--limit {limit}: give a number of samples >= 1, or leave it out for all")
        for option, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
            if value < 1:  # else named by GenerationSettings' field, not by the option given
                raise ValueError(f"{option} {value}: give a number >= 1")
        config = EvalConfig(
            task=task,
            data=data,
            model_name=str(model.resolve()),
            model_dtype=str(torch_dtype).removeprefix("torch."),
            out_dir=out if out is not None else Path("eval") / _eval_name(model) / task,
            image_dir=image_dir,
            split=split,
            limit=limit,
            pot=pot,
            pot_interpreter=pot_interpreter,
            force_expert=force_expert,
            force_where=force_where or "connector",
            clusters=clusters if clusters is not None else default_clusters_dir(model),
            embedding_model=embedding_model,
            generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed),
            merge_lora=merge_lora,
        )
        samples = read_task(task, data, image_dir, split)  # before the (slow) model load
        loaded_model, processor = load_model_for_eval(model, torch_device, torch_dtype, merge_lora)
        if (clusters is not None or embedding_model is not None) and not routes_by_cluster(loaded_model):
            raise ValueError(
                f"--clusters and --embedding-model are for a model routed by instruction cluster (MoCLE); "
                f"{model} routes by token or has no router: leave them out"
            )
        summary = run_eval(loaded_model, processor, config, samples=samples)
    console = Console()
    console.print(summary_table(summary))
    console.print(f"predictions: {summary['predictions']}\nsummary: {config.out_dir / 'summary.json'}")


def _eval_name(model: Path) -> str:
    """The folder name of `vlmoe eval`'s default --out for a model directory: its own name, or for
    a recipe stage's `final/` or `checkpoint-N/` (every stage has one) the run's and stage's too."""
    model = model.resolve()  # `.` or `..` name no folder ("eval/../chartqa" is outside eval/)
    if model.name == "final" or model.name.startswith("checkpoint-"):
        return "-".join(model.parts[-3:])
    return model.name


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype named by the --device / --dtype options."""
    import torch

    from vlmoe.device import resolve_device

    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return torch_device, getattr(torch, dtype)


@app.command()
def analyze(
    model: Annotated[
        str,
        typer.Argument(
            help="A vlmoe.save directory (with its processor), or tiny:<family> for a quick run on a tiny "
            "random model with upcycled FFNs and an upcycled MoE connector."
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(help="LLaVA-format JSON/JSONL (optional domain/task/cluster_id tags), or a benchmark."),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs, report.html and the statistics.")],
    task: Annotated[
        str | None,
        typer.Option(help="Read --data as this benchmark (as vlmoe eval does): chartqa, pope, ..."),
    ] = None,
    logs: Annotated[
        Path | None, typer.Option(help="Trainer logs (trainer_state.json or JSONL) with aux/<layer>/<stat>.")
    ] = None,
    eval_dir: Annotated[
        Path | None,
        typer.Option(help="vlmoe eval results (routed and --force-expert i) for the ablation table."),
    ] = None,
    max_samples: Annotated[int | None, typer.Option(help="Route only the first N samples.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 4,
    image_dir: Annotated[
        Path | None, typer.Option(help="Folder holding the images, if not the data's.")
    ] = None,
    expert_names: Annotated[
        str | None,
        typer.Option(help="Comma-separated names of the connector's experts, e.g. general,table,JSON,code."),
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device; auto = cuda if available, else cpu.")] = "auto",
    seed: Annotated[
        int,
        typer.Option(help="Seed of a tiny:<family> model's weights and routers (same seed, same report)."),
    ] = 0,
) -> None:
    """Route a dataset through a sparse model and write routing pictures plus one HTML report."""
    from vlmoe.analysis.cli import run_analyze

    with reported("analyze"):
        report = run_analyze(
            model,
            data=data,
            out=out,
            task=task,
            logs=logs,
            eval_dir=eval_dir,
            max_samples=max_samples,
            batch_size=batch_size,
            image_dir=image_dir,
            expert_names=expert_names,
            device=device,  # checked by run_analyze with its other options
            seed=seed,
        )
    typer.echo(f"report: {report}")


@app.command()
def export(
    src: str = typer.Argument(..., help="A model directory written by vlmoe.save."),
    dst: str = typer.Argument(..., help="Where to write the standard HF checkpoint."),
) -> None:
    """Export a vlmoe.save model to a standard HF checkpoint: Mixtral or Qwen2-MoE (plain LoRA merged)."""
    from vlmoe.models import export_hf, load

    with reported("export"):
        target = _model_destination(dst, src)  # before the load
        _check_upcycled(Path(src))
        processor = _saved_processor(Path(src))
        path = export_hf(load(src), target, processor=processor)
    typer.echo(f"exported {src} -> {path}" + ("" if processor is None else " (with its processor)"))


# The files `processor.save_pretrained` writes, one of which marks a folder that holds a processor.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def _saved_processor(src: Path):
    """The processor saved beside SRC's weights (vlmoe.save(..., processor=...)), or None if none is:
    the export carries it, so AutoProcessor.from_pretrained(DST) works as on SRC."""
    if not any((src / name).is_file() for name in _PROCESSOR_FILES):
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"SRC {src} holds processor files that do not load ({error}); save the processor again "
            "with processor.save_pretrained(SRC), or remove its files to export the model alone"
        ) from None


def _check_upcycled(src: Path) -> None:
    """SRC of `vlmoe export` holds the surgery record that vlmoe.save writes in config.json; a stock
    checkpoint (a download, or what `vlmoe export` wrote) has none, and vlmoe.load would fail on its
    weight names with a list of tensors instead of the reason."""
    from vlmoe.models.checkpoint import read_config
    from vlmoe.models.record import CONFIG_KEY

    if (src / "config.json").is_file() and CONFIG_KEY not in read_config(src):
        raise ValueError(
            f"SRC {src}/config.json has no '{CONFIG_KEY}' record: it is a stock checkpoint (a download, "
            "or one `vlmoe export` wrote, which is already the HF form), not a model upcycled and saved "
            "with vlmoe.save; export takes the vlmoe.save folder"
        )


def _model_destination(dst: str | Path, src: str | Path) -> Path:
    """DST of `vlmoe export` / `vlmoe import`, checked before any work: a folder path (no file on
    the way) holding nothing, or a model saved before (which is replaced), not a folder of the
    user's own files, which writing the model would delete, nor SRC or a folder holding it (SRC
    has a config.json, so it passes as "a model saved before", and the write would delete it)."""
    from vlmoe.atomic import check_replaceable, deletes_source
    from vlmoe.data.folders import output_folder

    target = output_folder(dst, "DST")
    how = deletes_source(target, src)
    if how is not None:
        raise ValueError(
            f"DST {target} {how} SRC {src}: writing the model there would delete the model it is made "
            "from; pass another folder for DST"
        )
    return check_replaceable(target, option="DST")


# --- vlmoe import: published sparse VLM checkpoints -> vlmoe models (vlmoe.interop) -------------
import_app = typer.Typer(
    help="Convert a published sparse VLM checkpoint (MoE-LLaVA, LLaVA-MoLE) into a vlmoe model directory.",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@import_app.command("moe-llava")
def import_moe_llava_command(
    src: Annotated[Path, typer.Argument(help="Local MoE-LLaVA checkpoint directory (config.json + shards).")],
    dst: Annotated[Path, typer.Argument(help="Where to write the vlmoe model (vlmoe.save).")],
    vision_tower: Annotated[
        Path | None, typer.Option(help="Local CLIP/SigLIP directory of the tower their config names.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Directory of the tokenizer files, if not in SRC.")
    ] = None,
    image_token_id: Annotated[
        int | None,
        typer.Option(help="Id of an unused special token for image positions; default: <image> added."),
    ] = None,
    conversation: Annotated[
        str | None,
        typer.Option(help="Chat format (phi, qwen, stablelm, v1, mistral, openchat); default: the family's."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="auto (the checkpoint's), float32, bfloat16 or float16.")
    ] = "auto",
) -> None:
    """MoE-LLaVA (DeepSpeed-MoE layers) -> a vlmoe LLaVA on stock transformers, with its processor."""
    from vlmoe.interop import import_moe_llava
    from vlmoe.models import save

    with reported("import moe-llava"):
        _model_destination(dst, src)  # before the conversion
        model, processor = import_moe_llava(
            src,
            vision_tower,
            tokenizer=tokenizer,
            image_token_id=image_token_id,
            conversation=conversation,
            dtype=_import_dtype(dtype),
        )
        typer.echo(f"imported {src} -> {save(model, dst, processor=processor)}")


@import_app.command("llava-mole")
def import_llava_mole_command(
    src: Annotated[
        Path, typer.Argument(help="LLaVA-MoLE checkpoint (.pt with a state_dict, or a directory).")
    ],
    dst: Annotated[Path, typer.Argument(help="Where to write the vlmoe model (vlmoe.save).")],
    base_llm: Annotated[Path, typer.Option(help="Local Vicuna directory the checkpoint was trained on.")],
    vision_tower: Annotated[Path, typer.Option(help="Local CLIP vision tower directory.")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="Directory of the tokenizer files, if not in --base-llm.")
    ] = None,
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha (not stored by them); default 2*rank.")
    ] = None,
    routing: Annotated[
        str,
        typer.Option(help="dense (their released inference: all experts by probability) or sparse (top-1)."),
    ] = "dense",
    dtype: Annotated[
        str, typer.Option(help="auto (the checkpoint's), float32, bfloat16 or float16.")
    ] = "auto",
) -> None:
    """LLaVA-MoLE (LoRA experts on FFN, LoRA on attention) -> a vlmoe LLaVA with MoLE, and its processor."""
    from vlmoe.interop import import_llava_mole
    from vlmoe.models import save

    with reported("import llava-mole"):
        _model_destination(dst, src)  # before the conversion
        model, processor = import_llava_mole(
            src,
            base_llm,
            vision_tower,
            tokenizer=tokenizer,
            lora_alpha=lora_alpha,
            routing=routing,
            dtype=_import_dtype(dtype),
        )
        typer.echo(f"imported {src} -> {save(model, dst, processor=processor)}")


def _import_dtype(name: str) -> torch.dtype | None:
    import torch

    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return None if name == "auto" else getattr(torch, name)


if __name__ == "__main__":
    app()
