import pytest
import torch
from PIL import Image

from vlmoe.models import TINY_FAMILIES, tiny


def tiny_batch(family: str, processor, num_samples: int = 2) -> dict[str, torch.Tensor]:
    """A fixed padded batch of chat prompts, each with one image, in the family's own format."""
    questions = ["What is the highest value?", "Describe the chart in one word please."]
    prompts = []
    for question in questions[:num_samples]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (20, 90, 200))]
    processor.tokenizer.padding_side = "left"
    # Idefics3 takes one list of images per sample; the others a flat list.
    images = [[image] for image in images[:num_samples]] if family == "idefics3" else images[:num_samples]
    return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    model, processor = tiny(family, seed=0)
    return model, processor, tiny_batch(family, processor)
