import errno
import os

import pytest
import torch
from model_helpers import logits, perturb
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import vlmoe
from vlmoe.models import tiny

# Qwen2-MoE's disabled shared expert has size 0; torch warns when initialising it.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _stock_logits(path, batch, text_only):
    model_class = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    stock = model_class.from_pretrained(path).eval()
    assert not any(type(m).__module__.startswith("vlmoe") for m in stock.modules())
    with torch.no_grad():
        return stock, stock(**batch).logits


def test_export_loads_in_stock_transformers_with_same_logits(family, tiny_model, tmp_path):
    model, _, batch = tiny_model
    qwen = family.startswith("qwen")
    vlmoe.upcycle_ffn(model, num_experts=4, top_k=2, layers=[1] if qwen else "all")
    vlmoe.add_mole(model, num_experts=0, rank=4)  # plain LoRA: merged into the base weights
    perturb(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    path = vlmoe.export_hf(model, tmp_path / "export")
    if qwen:  # the LM alone, as Qwen2MoeForCausalLM: compare on text
        batch = {"input_ids": torch.tensor([[10, 20, 30, 40, 50, 60]])}
    stock, exported = _stock_logits(path, batch, text_only=qwen)
    expected = logits(
        model, batch if not qwen else {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    )
    # Padding rows differ between attention kernels (stock loads sdpa); real tokens must match.
    real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    torch.testing.assert_close(exported[real], expected[real], rtol=0, atol=1e-5)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    text_config = stock.config.get_text_config()
    assert text_config.model_type == ("qwen2_moe" if qwen else "mixtral")
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(".experts.3." in key for key in keys)  # the classic per-expert layout on disk
    if qwen:
        assert text_config.mlp_only_layers == [0] and text_config.shared_expert_intermediate_size == 0
    else:
        generated = stock.generate(**batch, max_new_tokens=2, do_sample=False)
        assert generated.shape[1] == batch["input_ids"].shape[1] + 2


def test_qwen2_moe_export_of_top1_keeps_raw_probability_weights(tmp_path):
    model, _ = tiny("qwen2_vl")
    vlmoe.upcycle_ffn(model, num_experts=4, top_k=1, layers="every_other")
    perturb(model)
    batch = {"input_ids": torch.tensor([[5, 9, 17, 33, 65]])}
    stock, exported = _stock_logits(vlmoe.export_hf(model, tmp_path / "q"), batch, text_only=True)
    assert stock.config.norm_topk_prob is False
    torch.testing.assert_close(
        exported, logits(model, {**batch, "attention_mask": torch.ones(1, 5)}), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    ("surgery", "message"),
    [
        (lambda m: vlmoe.upcycle_ffn(m, layers="every_other"), r"only layers \[0\] of 2 are MoE"),
        (lambda m: vlmoe.upcycle_ffn(m, top_k=1), "Mixtral renormalises"),
        (lambda m: vlmoe.upcycle_ffn(m, capacity_factor=1.5), "drops tokens over capacity"),
        (lambda m: vlmoe.add_mole(vlmoe.upcycle_ffn(m, layers=[0]), layers=[1]), "routed LoRA experts"),
        (lambda m: vlmoe.install_moe_connector(vlmoe.upcycle_ffn(m)), "MoEConnector"),
    ],
)
def test_export_refuses_what_has_no_standard_form(surgery, message, tmp_path):
    model = surgery(tiny("llava")[0])
    with pytest.raises(ValueError, match=message):
        vlmoe.export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_model_built_without_its_recorded_surgery(tmp_path):
    path = vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "m")
    stock = AutoModelForImageTextToText.from_pretrained(path)  # random dense MLPs, the record kept
    with pytest.raises(
        ValueError, match=r"records surgery \['upcycle_ffn'\] but its modules show \[\]"
    ) as error:
        vlmoe.export_hf(stock, tmp_path / "hf")
    assert "save_pretrained" not in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_cli_export_reads_a_vlmoe_save(tmp_path):
    from typer.testing import CliRunner

    from vlmoe.cli import app

    model = vlmoe.upcycle_ffn(tiny("llava")[0])
    vlmoe.save(model, tmp_path / "saved")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported")
    assert stock.config.text_config.num_local_experts == 4
    refused = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert refused.exit_code == 1 and "not a vlmoe model directory" in refused.output
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    refused = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), str(notes)])
    assert refused.exit_code == 1 and f"DST {notes} is a file; pass a folder" in refused.output
    assert notes.read_text() == "keep me"  # not replaced by the export


def test_cli_export_of_a_stock_checkpoint_names_the_missing_record(tmp_path):
    from typer.testing import CliRunner

    from vlmoe.cli import app

    vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "saved")
    assert CliRunner().invoke(app, ["export", str(tmp_path / "saved"), str(tmp_path / "hf")]).exit_code == 0
    tiny("llava")[0].save_pretrained(tmp_path / "download")
    for stock in (tmp_path / "hf", tmp_path / "download"):  # export's own output, a plain HF save
        result = CliRunner().invoke(app, ["export", str(stock), str(tmp_path / "again")])
        assert result.exit_code == 1, result.output
        assert f"SRC {stock}/config.json has no 'vlmoe' record: it is a stock checkpoint" in result.output
        assert "missing tensors" not in result.output
    assert not (tmp_path / "again").exists()


def test_export_to_a_path_inside_a_file_names_the_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    model = vlmoe.upcycle_ffn(tiny("llava")[0])
    with pytest.raises(ValueError, match=rf"{notes}/out is inside {notes}, which is a file: pass a folder"):
        vlmoe.export_hf(model, notes / "out")
    assert notes.read_text() == "keep me"


def test_export_refuses_the_folder_the_model_was_loaded_from_or_one_holding_it(tmp_path):
    path = vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0], num_experts=4, top_k=2), tmp_path / "runs" / "m")
    (tmp_path / "runs" / "config.json").write_text("{}")  # so check_replaceable alone would pass it
    model = vlmoe.load(path)
    for target, verb in ((path, "is"), (tmp_path / "runs", "holds")):
        with pytest.raises(ValueError, match=rf"{target} {verb} {path}, the folder the model was loaded"):
            vlmoe.export_hf(model, target)
    assert "vlmoe" in vlmoe.models.checkpoint.read_config(path)  # the vlmoe model is still there
    assert vlmoe.export_hf(model, tmp_path / "hf") == tmp_path / "hf"


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC])
def test_cli_export_reports_an_os_error_writing_dst_in_one_line(code, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmoe.cli import app
    from vlmoe.models import export

    vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "saved")
    dst = tmp_path / "hf"

    def fail(model, path, card_text, processor):  # root ignores chmod, so the write fails here instead
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(export, "_save_atomically", fail)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), str(dst)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == f"vlmoe export: {os.strerror(code)} ({dst})\n"


def test_cli_export_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmoe.cli import app
    from vlmoe.models import export

    vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "saved")
    monkeypatch.setattr(export, "_save_atomically", lambda *args: None + 1)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), str(tmp_path / "hf")])
    assert isinstance(result.exception, TypeError)  # not reported as a user's error


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cli_export_carries_the_processor_saved_in_src(family, tmp_path):
    from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin
    from typer.testing import CliRunner

    from vlmoe.cli import app

    model, processor = tiny(family)
    model = vlmoe.upcycle_ffn(model, layers=[1] if family == "qwen2_vl" else "all")
    vlmoe.save(model, tmp_path / "saved", processor=processor)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), str(tmp_path / "hf")])
    assert result.exit_code == 0 and "(with its processor)" in result.output, result.output
    loaded = AutoProcessor.from_pretrained(tmp_path / "hf")
    prompt = "a chart of sales"
    if family == "llava":  # the whole VLM: the processor, images and all
        assert isinstance(loaded, ProcessorMixin) and type(loaded) is type(processor)
        assert loaded.tokenizer(prompt).input_ids == processor.tokenizer(prompt).input_ids
    else:  # Qwen2MoeForCausalLM, the LM alone: its tokenizer
        assert isinstance(loaded, PreTrainedTokenizerBase)
        assert loaded(prompt).input_ids == processor.tokenizer(prompt).input_ids
    # Without a processor in SRC the export is the weights alone, as before.
    vlmoe.save(model, tmp_path / "bare")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "bare"), str(tmp_path / "hf2")])
    assert result.exit_code == 0 and "processor" not in result.output
    assert not (tmp_path / "hf2" / "tokenizer_config.json").exists()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_model_with_plain_lora_only_exports_as_its_own_stock_architecture(family, tmp_path):
    # ChartMoE's LLM LoRA without its connector: save_pretrained would write q_proj.base.weight
    # names no stock model reads; the export merges the LoRA and writes the base architecture.
    model, processor = tiny(family)
    stock_class = type(model)
    vlmoe.add_mole(model, num_experts=0, rank=4)
    perturb(model)
    path = vlmoe.export_hf(model, tmp_path / "dense", processor=processor)
    stock = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(stock) is stock_class and "vlmoe" not in stock.config.to_dict()
    assert not any(type(m).__module__.startswith("vlmoe") for m in stock.modules())
    batch = {
        "input_ids": torch.tensor([[5, 9, 17, 33, 65]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    with torch.no_grad():
        exported = stock(**batch).logits
    torch.testing.assert_close(exported, logits(model, batch), rtol=0, atol=1e-5)  # the merge's rounding
    assert (path / "tokenizer_config.json").is_file()  # the whole processor: the export is the VLM
