"""Inputs and checks shared by the model tests (a plain module: conftest files are not importable)."""

import torch
from PIL import Image


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


def logits(model, batch, cluster_ids=None) -> torch.Tensor:
    """Eval-mode logits with the padding mask (and MoCLE cluster ids) given to the routers."""
    from vlmoe.moe import routing_inputs

    model.eval()
    with (
        torch.no_grad(),
        routing_inputs(model, attention_mask=batch["attention_mask"], cluster_ids=cluster_ids),
    ):
        return model(**batch).logits


def perturb(model, scale: float = 0.02, seed: int = 1) -> None:
    """Move every parameter a little, so zero-init LoRA B and identical experts stop being special."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
