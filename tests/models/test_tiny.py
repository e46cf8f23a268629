import pytest
import torch

from vlmoe.models import tiny


def test_processor_output_runs_forward_and_generate(family, tiny_model):
    model, processor, batch = tiny_model
    logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert logits.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.isfinite(logits).all()
    # The processor expanded each image into the number of image tokens the model expects.
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert (batch["input_ids"] == image_token_id).sum() > 0
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


def test_same_seed_same_weights_other_seed_other_weights(family):
    first, _ = tiny(family, seed=0)
    again, _ = tiny(family, seed=0)
    other, _ = tiny(family, seed=1)
    state, state_again, state_other = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[name], state_again[name]) for name in state)
    assert any(not torch.equal(state[name], state_other[name]) for name in state)


def test_tokenizer_round_trips_text(family):
    _, processor = tiny(family)
    text = "What is the value of 42 in the chart?"
    assert processor.tokenizer.decode(processor.tokenizer(text, add_special_tokens=False).input_ids) == text


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ValueError, match="llava_next"):
        tiny("gpt2")
