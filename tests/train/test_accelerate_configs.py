"""Every shipped accelerate config parses, and accelerate's launcher turns it into what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {  # file -> (distributed type, what the launcher must put in the environment)
    "ddp.yaml": ("MULTI_GPU", {}),
    "fsdp2.yaml": (
        "FSDP",
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
        },
    ),
    "deepspeed-zero2.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true"}),
    "deepspeed-zero3.yaml": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true"}),
}


def test_every_shipped_config_is_checked_here():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


def _launch_env(path: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file path -m vlmoe.cli train demo` gives the workers."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "vlmoe.cli", "train", "demo"]
    )
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == 2 and args.module and args.training_script == "vlmoe.cli"
    if args.use_deepspeed:  # as launch_command does before the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_to_what_accelerate_expects(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the DeepSpeed JSON paths are relative to the repository root
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    distributed_type, expected_env = EXPECTED[path.name]
    assert config.distributed_type.value == distributed_type
    assert config.mixed_precision == "no"  # the recipe's `precision` decides
    env = _launch_env(path)
    assert {key: env.get(key) for key in expected_env} == expected_env
    if distributed_type == "DEEPSPEED":
        json_path = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(json_path.read_text())
        stage = int(path.stem[-1])
        assert ds["zero_optimization"]["stage"] == stage
        # Batch sizes and precision are the recipe's (HF fills "auto" from TrainingArguments).
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto"
        if stage == 3:  # the final model is gathered whole on save (accelerator.get_state_dict)
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fsdp2_config_builds_an_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.chdir(ROOT)
    for key, value in _launch_env(ROOT / "configs" / "accelerate" / "fsdp2.yaml").items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap is None  # the model's own _no_split_modules
