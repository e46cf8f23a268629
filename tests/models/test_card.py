import vlmoe
from vlmoe.models import CardInfo, parameter_report


def test_save_and_export_write_a_card_with_method_counts_and_results(tmp_path):
    model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0], num_experts=4, top_k=2)
    report = parameter_report(model)
    info = CardInfo(recipe="moe-llava", data="synthetic charts", evaluation={"chartqa relaxed accuracy": 0.5})
    card = (vlmoe.save(model, tmp_path / "m", card=info) / "README.md").read_text()
    assert "MoE-Tuning (MoE-LLaVA)" in card
    for row in ("| num experts | 4 |", "| top k | 2 |", "| layers | [0, 1] |"):
        assert row in card
    assert f"| total | {report.total:,} |" in card
    assert f"| active per token | {report.active_per_token:,} |" in card
    assert report.active_per_token < report.total
    assert "recipe: moe-llava" in card and "data: synthetic charts" in card
    assert "| chartqa relaxed accuracy | 0.5 |" in card
    exported = (vlmoe.export_hf(model, tmp_path / "e") / "README.md").read_text()
    assert "exported as: `LlavaForConditionalGeneration`" in exported and "| num experts | 4 |" in exported
    assert "No evaluation results recorded" in exported


def test_card_of_lora_experts_and_of_a_dense_model(tmp_path):
    model = vlmoe.add_mole(vlmoe.models.tiny("llava")[0], num_experts=3, rank=4, alpha=8)
    card = vlmoe.models.model_card(model)
    assert "LoRA experts" in card and "| rank | 4 |" in card and "| lora |" in card
    dense = vlmoe.models.tiny("qwen2_vl")[0]
    assert "No surgery" in vlmoe.models.model_card(dense)
