"""`save` / `load`: a standard HF directory (config.json + model.safetensors) whose config carries
the surgery record, so loading rebuilds the base architecture, replays the surgery and loads the
weights strictly: any missing, unexpected or mis-shaped tensor is an error, never random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, ProcessorMixin
from transformers.initialization import no_init_weights

from vlmoe.atomic import atomic_directory, deletes_source, first_names
from vlmoe.models.card import CARD_NAME, CardInfo, model_card
from vlmoe.models.record import CONFIG_KEY, SurgeryRecord, read_record

WEIGHTS_NAME = "model.safetensors"


def save(
    model: nn.Module,
    path: str | os.PathLike,
    processor: ProcessorMixin | None = None,
    card: CardInfo | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` to the directory `path` atomically (temp dir, then rename); returns the path.

    `state_dict` replaces the model's own weights: the full weights gathered from a model that
    FSDP shards (`vlmoe.train.distributed.full_state_dict`), under the module's own names.

    With `processor`, its files go in the same directory, so `AutoProcessor.from_pretrained(path)`
    finds it next to the model. A model card (README.md) describes the model; `card` adds the
    recipe, data and evaluation results when the caller knows them.

    Saving in place, `save(load(path), path)`, is safe: `load` copies every tensor into memory, and
    the new folder replaces the old one only once it is complete. As the whole folder is replaced,
    an in-place save that would not write again everything the folder holds (the processor's files
    when `processor` is not given, a MoCLE model's clusters/) is refused with a ValueError naming them,
    and so is a save into a folder holding the one the model was loaded from, which would delete it.

    Example:
        >>> import tempfile, vlmoe
        >>> model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0])
        >>> path = vlmoe.save(model, tempfile.mkdtemp() + "/moe-llava")
        >>> sorted(p.name for p in path.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
    """
    from vlmoe.models.surgery import check_record_agrees

    # A model whose record its modules do not show (from_pretrained on a vlmoe.save folder: dense
    # MLPs, random where the experts were) would be written as weights vlmoe.load cannot read, and
    # saved in place it would replace the good model.
    check_record_agrees(model)
    path = Path(path)
    model.config.architectures = [_model_class_name(model)]
    # A model cast with .to(dtype) keeps its config's old dtype; load builds the model in the one
    # recorded here, so a bf16 7B model never passes through an fp32 copy (transformers' own
    # save_pretrained records it the same way).
    model.config.dtype = model.dtype
    source = loaded_from(model)
    how = None if source is None else deletes_source(path, source)
    if how == "holds":
        _refuse_deleting_the_source(path, source)
    in_place = how == "is"
    state = unique_state(model) if state_dict is None else without_tied(model, state_dict)
    with atomic_directory(path) as temp:
        model.config.save_pretrained(temp)
        _record_attention(temp / "config.json", model.config._attn_implementation)
        if processor is not None:
            processor.save_pretrained(temp)
        (temp / CARD_NAME).write_text(model_card(model, card))
        save_file(
            {name: tensor.detach().contiguous() for name, tensor in state.items()},
            temp / WEIGHTS_NAME,
            metadata={"format": "pt"},
        )
        if in_place:  # raising here leaves the folder as it was
            _check_nothing_lost(path, temp)
    return path


def _refuse_deleting_the_source(path: Path, source: Path) -> None:
    entries = sorted(entry.name for entry in path.iterdir())
    raise ValueError(
        f"{path} holds {source}, the folder the model was loaded from: saving there replaces the whole "
        f"folder {path}, deleting {first_names(entries)} (the model's source among them); pass another "
        f"folder, one that does not hold {source}"
    )


def _check_nothing_lost(path: Path, written: Path) -> None:
    lost = sorted({entry.name for entry in path.iterdir()} - {entry.name for entry in written.iterdir()})
    if lost:
        raise ValueError(
            f"{path} is the folder the model was loaded from, and saving it there replaces the whole "
            f"folder, deleting {first_names(lost)}, which this save does not write again; pass "
            "processor=AutoProcessor.from_pretrained(path) if they are the processor's files, or save to "
            "another folder"
        )


def loaded_from(model: nn.Module) -> Path | None:
    """The local folder `model` was loaded from (`load`, or a local `from_pretrained`), resolved;
    None for a model built in memory or named by a Hub id. `load` records it resolved, so a later
    change of the working directory does not move it.

    Example:
        >>> import vlmoe
        >>> loaded_from(vlmoe.models.tiny("llava")[0]) is None
        True
    """
    name = getattr(model.config, "_name_or_path", "")
    folder = Path(name).resolve() if name else None
    return folder if folder is not None and folder.is_dir() else None


def _model_class_name(model: nn.Module) -> str:
    # FSDP2's fully_shard swaps the class for a subclass "FSDP<name>"; the file names the HF class.
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved by `vlmoe.save` at `path`: base architecture, surgery, weights.

    Example:
        >>> import tempfile, torch, vlmoe
        >>> model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0])
        >>> again = vlmoe.load(vlmoe.save(model, tempfile.mkdtemp() + "/m"))
        >>> all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        True
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not (path / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path} is not a vlmoe model directory: it needs config.json and {WEIGHTS_NAME} "
            "(write one with vlmoe.save)"
        )
    config = _auto_config(path)
    saved = getattr(config, CONFIG_KEY, None)
    record = (
        None if saved is None else SurgeryRecord.from_dict(saved, where=f"{path}/config.json '{CONFIG_KEY}'")
    )
    if saved is not None:
        delattr(config, CONFIG_KEY)
    config.name_or_path = str(path.resolve())  # see `loaded_from`; the card's "base" shows it too
    model = _base_model(config, path)
    if record is not None:
        try:
            _replay(model, record)
        except (TypeError, ValueError) as error:  # an edited value, e.g. "num_experts": 0
            raise ValueError(
                f"{path}/config.json '{CONFIG_KEY}': the recorded surgery does not replay ({error}); the "
                "record was edited: restore it, or save the model again with vlmoe.save"
            ) from None
        if read_record(model) != record:
            raise ValueError(
                f"{path}: replaying the recorded surgery gave a different record; the file was edited"
            )
    _load_weights(model, weights)
    return model.eval()


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of the model directory `path`; a damaged file is a ValueError naming it.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text('{"model_type": "llava"')
        >>> read_config(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../config.json is not valid JSON (line 1, column 23: ...); copy or save the model again
    """
    return read_json_object(Path(path) / "config.json", "copy or save the model again")


def read_json_object(file: Path, fix: str) -> dict:
    """The JSON object in `file`; damaged, not UTF-8 or not an object is a ValueError naming the file
    and ending in `fix` (how to get a good copy), so a caller's reader never sees a list or a str.

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "tokenizer_config.json"
        >>> _ = file.write_text("[]")
        >>> read_json_object(file, "copy it again")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../tokenizer_config.json must hold a JSON object; copy it again
    """
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{file} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); {fix}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object; {fix}")
    return value


def _auto_config(path: Path):
    """AutoConfig of a local directory, with the errors naming config.json and its model_type."""
    model_type = read_config(path).get("model_type")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except ValueError:  # no or an unknown model_type; transformers' own text is a page of advice
        known = "has no model_type" if model_type is None else f"model_type {model_type!r} is not one"
        raise ValueError(
            f"{path / 'config.json'}: {known} transformers {transformers.__version__} knows; fix "
            "model_type, or install the transformers version the model was saved with"
        ) from None


def load_pretrained_vlm(path: str | os.PathLike) -> nn.Module:
    """A plain HF vision-language model (no vlmoe record) from a local directory, never the Hub.

    Example:
        >>> model = load_pretrained_vlm("checkpoints/llava-v1.5-7b")  # doctest: +SKIP
    """
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(path)
    model_type = _auto_config(path).model_type
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{path / 'config.json'}: model_type {model_type!r} is not a vision-language model "
            "(AutoModelForImageTextToText has no class for it); give the directory of a VLM such as LLaVA "
            "or Qwen2-VL, saved with save_pretrained or vlmoe.save"
        )
    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)


def load_local(path: str | os.PathLike) -> nn.Module:
    """A local model directory: a vlmoe model (its config.json carries the surgery record) rebuilt by
    `load`, any other HF vision-language model by `load_pretrained_vlm`.

    Example:
        >>> model = load_local("runs/chartmoe/chart_qa_pot/final")  # doctest: +SKIP
    """
    return load(path) if CONFIG_KEY in read_config(path) else load_pretrained_vlm(path)


def _base_model(config, path: Path) -> nn.Module:
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"{path}/config.json: 'architectures' is {names!r}; expected one transformers model class"
        )
    if not isinstance(config, model_class.config_class):
        raise ValueError(
            f"{path}/config.json: 'architectures' names {names[0]}, a model of "
            f"{model_class.config_class.__name__}, but model_type {config.model_type!r} is a "
            f"{type(config).__name__}: the file mixes two models. Restore 'architectures' and model_type "
            "as vlmoe.save wrote them, or save the model again"
        )
    # `config.json` names the attention kernel the model was saved with (see `_record_attention`),
    # which AutoConfig reads back into `config._attn_implementation`. Random init is skipped (every
    # weight comes from the file) and the model is built in the saved dtype: a 7B model loads in
    # seconds and without an fp32 copy.
    with no_init_weights():
        model = model_class._from_config(config)
    model.tie_weights()  # skipped with the init; the file stores a tied tensor once
    return model


def _record_attention(config_file: Path, attn_implementation: str | None) -> None:
    """Name the attention kernel in config.json: kernels round differently, and a reload must
    compute the saved model's logits bit for bit. HF configs read this key on load."""
    if attn_implementation is None:
        return
    config = json.loads(config_file.read_text())
    config["attn_implementation"] = attn_implementation
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _replay(model: nn.Module, record: SurgeryRecord) -> None:
    from vlmoe.models.surgery import add_mole, install_moe_connector, merge_lora, upcycle_ffn

    for step in record.steps:
        if step.kind == "upcycle_ffn":
            upcycle_ffn(
                model,
                step.num_experts,
                step.top_k,
                step.layers,
                load_balance_coef=step.load_balance_coef,
                z_loss_coef=step.z_loss_coef,
                capacity_factor=step.capacity_factor,
                min_capacity=step.min_capacity,
                load_balance_first_choice=step.load_balance_first_choice,
            )
        elif step.kind == "add_mole":
            add_mole(
                model,
                step.num_experts,
                step.rank,
                step.alpha,
                step.top_k,
                router=step.router,
                num_clusters=step.num_clusters,
                universal=step.universal,
                layers=step.layers,
                dropout=step.dropout,
                temperature=step.temperature,
                load_balance_coef=step.load_balance_coef,
                straight_through=step.straight_through,
                attention_lora=step.attention_lora,
                router_bias=step.router_bias,
            )
        elif step.kind == "merge_lora":
            merge_lora(model)  # the adapters are still zero here: only the layout changes
        elif step.kind == "import":
            from vlmoe.models.families import adapter_for
            from vlmoe.models.record import append_step

            if step.lm_head_bias:
                add_lm_head_bias(model)
            append_step(model, adapter_for(model).name, step)
        else:
            # The experts' shapes do not depend on the init; their weights come from the file.
            install_moe_connector(
                model,
                "random",
                step.num_experts,
                step.top_k,
                load_balance_coef=step.load_balance_coef,
                z_loss_coef=step.z_loss_coef,
            )
            _set_last_init(model, step.init)


def add_lm_head_bias(model: nn.Module) -> None:
    """Give the LM head a (zero) bias: Phi's head has one, LLaVA's class builds it without."""
    head = model.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device)
    biased = biased.to(head.weight.dtype)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
    model.set_output_embeddings(biased)


def _set_last_init(model: nn.Module, init: str) -> None:
    record = read_record(model)
    record.steps[-1].init = init
    setattr(model.config, CONFIG_KEY, record.to_dict())


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) under its first name only."""
    seen: set[tuple[int, int]] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        state[name] = tensor
    return state


def tied_names(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (tied embeddings)."""
    first_names = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names


def without_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (e.g. gathered from a sharded model) with each tied weight under its first name
    only, as `unique_state` keeps the model's own (and as safetensors can write it)."""
    tied = tied_names(model)
    return {name: tensor for name, tensor in state.items() if name not in tied}


def _load_weights(model: nn.Module, weights: Path) -> None:
    expected = unique_state(model)
    try:
        handle = safe_open(str(weights), framework="pt")
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({error}); it is damaged or was cut short: "
            "copy or save the model again"
        ) from None
    with handle:
        names = set(handle.keys())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match the model rebuilt from its config.json: "
                f"missing tensors {_some(missing)}, unexpected tensors {_some(unexpected)}. The weights and "
                "the 'vlmoe' section of config.json must come from the same vlmoe.save; save the model "
                "again rather than editing either"
            )
        state = {}
        for name in sorted(names):
            tensor = handle.get_tensor(name)
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)} but the layout in "
                    f"config.json needs {tuple(expected[name].shape)}; the weights and the config come "
                    "from different models. Save the model again with vlmoe.save"
                )
            # A fresh, aligned copy: tensors read from the file may sit at any offset of a mapping,
            # and CPU kernels pick other code paths (other rounding) for unaligned memory.
            state[name] = tensor.clone()
    model.load_state_dict(state, strict=False, assign=True)
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError(f"{weights}: some tensors were not loaded")
    model.tie_weights()


def _some(names: list[str]) -> str:
    return str(names[:5])[:-1] + (", ...]" if len(names) > 5 else "]")
