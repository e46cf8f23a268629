"""The collator with the tiny models of every family: exact label masks, images, truncation."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from vlmoe.data.collator import IGNORE_INDEX, ConversationCollator, _joined_image_inputs, split_model_inputs
from vlmoe.data.conversations import ConversationSample
from vlmoe.models import TINY_FAMILIES, tiny

# What the template writes between the generation prompt and the next turn, around a reply.
REPLY_FORMAT = {
    "llava": " {}</s>",  # LLaVA's template ends replies with a space: the collator adds EOS
    "llava_next": " {}</s>",
    "qwen2_vl": "{}<|im_end|>",
    "qwen2_5_vl": "{}<|im_end|>",
    "idefics3": "{}<end_of_utterance>",
}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request):
    model, processor = tiny(request.param)
    return request.param, model, processor


def _chat(sample_id, images, *texts, **tags):
    roles = ["user", "assistant"] * len(texts)
    messages = [{"role": r, "content": t} for r, t in zip(roles, texts, strict=False)]
    return ConversationSample(sample_id, images, messages, **tags)


def _image(color, size=(56, 56)):
    return Image.new("RGB", size, color)


def _supervised_text(processor, batch, row):
    labels = batch["labels"][row]
    kept = labels[labels != IGNORE_INDEX]
    assert torch.equal(kept, batch["input_ids"][row][labels != IGNORE_INDEX])
    return processor.tokenizer.decode(kept)


def test_labels_are_exactly_the_replies_and_their_end_tokens(family):
    name, model, processor = family
    samples = [
        _chat("img", [_image("red")], "<image>\nWhat colour is it?", "Red.", "Are you sure?", "Yes, red."),
        _chat("txt", [], "What is 3 + 4?", "7"),
    ]
    batch = ConversationCollator(processor)(samples)
    fmt = REPLY_FORMAT[name]
    assert _supervised_text(processor, batch, 0) == fmt.format("Red.") + fmt.format("Yes, red.")
    assert _supervised_text(processor, batch, 1) == fmt.format("7")
    lengths = batch["attention_mask"].sum(dim=1)
    assert (
        batch["attention_mask"][1, : lengths[1]].all() and not batch["attention_mask"][1, lengths[1] :].any()
    )
    assert (batch["labels"][1, lengths[1] :] == IGNORE_INDEX).all()  # right padding, never supervised
    assert (batch["input_ids"][1, lengths[1] :] == processor.tokenizer.pad_token_id).all()
    inputs, _ = split_model_inputs(batch)
    loss = model(**inputs).loss  # the model finds as many image tokens as image features
    assert torch.isfinite(loss)


def test_image_tokens_are_the_processors_own_expansion(family):
    name, _, processor = family
    sample = _chat("img", [_image("red")], "<image>\nWhat colour is it?", "Red.")
    batch = ConversationCollator(processor)([sample])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    reference = processor(text=[text], images=[[_image("red")]], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((batch["input_ids"] == image_id).sum()) == int((reference["input_ids"] == image_id).sum()) > 1
    # Templates that close replies with a token: the same ids throughout.
    if name in ("qwen2_vl", "qwen2_5_vl", "idefics3"):
        assert torch.equal(batch["input_ids"], reference["input_ids"])
    else:  # LLaVA's template closes replies with a space: the same ids but for the EOS we add
        ours = batch["input_ids"][0].tolist()
        eos_at = ours.index(processor.tokenizer.eos_token_id)
        assert batch["labels"][0, eos_at] == processor.tokenizer.eos_token_id
        assert ours[:eos_at] + ours[eos_at + 1 :] == reference["input_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])


def test_several_images_and_tags(family):
    _, model, processor = family
    samples = [
        _chat("two", [_image("red"), _image("blue", (30, 50))], "<image> and <image>: same?", "No.",
              domain="chart", task="chart_qa", cluster_id=5),
        _chat("one", [_image("green")], "<image>\nColour?", "Green.", domain="vqa"),
    ]  # fmt: skip
    batch = ConversationCollator(processor)(samples)
    assert batch["domains"] == ["chart", "vqa"] and batch["tasks"] == ["chart_qa", None]
    assert batch["cluster_ids"].tolist() == [5, -1]
    inputs, _ = split_model_inputs(batch)
    assert torch.isfinite(model(**inputs).loss)


def test_images_processed_once_equal_one_processor_call_on_the_batch(family):
    name, _, processor = family
    samples = [
        _chat("two", [_image("red"), _image("blue", (30, 50))], "<image> and <image>: same?", "No."),
        _chat("none", [], "No picture here?", "None."),
        _chat("one", [_image("green", (84, 56))], "<image>\nColour?", "Green."),
    ]  # fmt: skip
    collator = ConversationCollator(processor)
    batch = collator(samples)
    images = [[_image("red"), _image("blue", (30, 50))], [], [_image("green", (84, 56))]]
    reference = collator._image_inputs(samples, images, batch["input_ids"])  # one call on the batch
    assert sorted(k for k in batch if k in reference) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(batch[key], value), key
    parts = [
        output
        for sample in samples
        for output in collator._encode(sample, images[samples.index(sample)]).image_outputs
    ]
    # LLaVA's and Qwen2-VL's per-image rows concatenate (LLaVA-NeXT's do while the images' patch
    # counts agree, as here); Idefics3's tiles and pixel masks need the processor's batch padding.
    assert (_joined_image_inputs(parts) is not None) == (name != "idefics3")


def test_truncation_keeps_images_whole_and_cuts_text_after(family):
    _, model, processor = family
    long_answer = "The highest value is 42. " * 20
    sample = _chat("long", [_image("red")], "<image>\nDescribe the chart.", long_answer)
    full = ConversationCollator(processor)([sample])
    collator = ConversationCollator(processor, max_length=full["input_ids"].shape[1] - 30)
    image_ids = collator._image_token_ids
    last_image = max(i for i, t in enumerate(full["input_ids"][0].tolist()) if t in image_ids)
    cut = collator([sample])
    assert cut["input_ids"].shape[1] == collator.max_length
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : collator.max_length])
    assert torch.equal(cut["labels"][0], full["labels"][0, : collator.max_length])
    assert torch.isfinite(model(**split_model_inputs(cut)[0]).loss)
    too_short = ConversationCollator(processor, max_length=last_image)
    with pytest.raises(ValueError, match=f"image tokens reach position {last_image + 1} but max_length is"):
        too_short([sample])


def test_a_sample_cut_before_its_reply_is_warned_about_once_and_counted(family):
    _, _, processor = family
    sample = _chat("cut", [_image("red")], "<image>\nDescribe the chart in every detail, please.", "Bars.")
    full = ConversationCollator(processor)([sample])
    first_reply = int((full["labels"][0] != IGNORE_INDEX).nonzero()[0])
    collator = ConversationCollator(processor, max_length=first_reply)  # ends just before the reply
    image_ids = collator._image_token_ids
    assert max(i for i, t in enumerate(full["input_ids"][0].tolist()) if t in image_ids) < first_reply
    with pytest.warns(UserWarning, match=f"sample 'cut' .*max_length {first_reply} cuts it before its first"):
        batch = collator([sample])
    assert (batch["labels"] == IGNORE_INDEX).all()
    assert collator.unsupervised_samples == {"cut"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: counted already, no second warning
        collator([sample])
    kept = ConversationCollator(processor, max_length=first_reply + 1)
    assert (kept([sample])["labels"] != IGNORE_INDEX).sum() == 1 and not kept.unsupervised_samples


def test_chart_conversations_from_disk_collate_for_llava(tmp_path):
    from vlmoe.data.chart_dataset import ChartSetConfig, generate_chart_set
    from vlmoe.data.conversations import read_conversations

    (shard,) = generate_chart_set(tmp_path, ChartSetConfig(n=2, size_px=96))
    samples, report = read_conversations(shard / "conversations.jsonl")
    assert report.bad == [] and len(samples) >= 6
    model, processor = tiny("llava")
    batch = ConversationCollator(processor)(samples[:3])
    assert batch["tasks"] == ["chart_to_table", "chart_to_json", "chart_to_code"]
    table = samples[0].messages[1]["content"]
    assert _supervised_text(processor, batch, 0) == f" {table}</s>"
    assert torch.isfinite(model(**split_model_inputs(batch)[0]).loss)


def test_templates_that_trim_replies_are_followed_and_rewriting_ones_refused():
    _, processor = tiny("qwen2_vl")
    sample = _chat("s", [], "2+2?", "4 ")
    trimming = processor.chat_template.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")
    processor.chat_template = trimming
    batch = ConversationCollator(processor)([sample])
    assert _supervised_text(processor, batch, 0) == "4<|im_end|>"
    processor.chat_template = trimming.replace("| trim", "| upper")
    with pytest.raises(ValueError, match="turn 1's text does not appear in the chat template's rendering"):
        ConversationCollator(processor)([_chat("s", [], "2+2?", "four")])


def test_image_outputs_of_unequal_shapes_or_unknown_keys_are_not_joined():
    row = {"pixel_values": torch.zeros(1, 5, 3, 4, 4), "image_sizes": torch.tensor([[4, 4]])}
    other = {"pixel_values": torch.zeros(1, 3, 3, 4, 4), "image_sizes": torch.tensor([[4, 8]])}
    joined = _joined_image_inputs([row, row])
    assert joined["pixel_values"].shape == (2, 5, 3, 4, 4) and joined["image_sizes"].tolist() == [[4, 4]] * 2
    assert _joined_image_inputs([row, other]) is None  # unequal patch counts: the batch pads them
    assert _joined_image_inputs([{**row, "pixel_attention_mask": torch.ones(1, 5, 4, 4)}]) is None
    assert _joined_image_inputs([row, {"pixel_values": row["pixel_values"]}]) is None
    assert _joined_image_inputs([]) is None
