"""Small builders shared by the core tests."""

import torch
from torch import nn


class SwiGLU(nn.Module):
    """The shape of transformers' LlamaMLP, without needing a config."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FcMLP(nn.Module):
    """The shape of Phi / CLIP MLPs: fc1 -> activation_fn -> fc2, with biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.activation_fn = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class Projector(nn.Module):
    """The shape of LLaVA's multi-modal projector: linear_1 -> act -> linear_2."""

    def __init__(self, vision: int, text: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision, text)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text, text)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Fill every parameter with random values (zero-init LoRA B included) for checks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)
    return module


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def fake_record(captures: list):
    """`vlmoe.moe.graphs._record` without CUDA, for monkeypatching: the 'graph' recomputes the
    forward on its static inputs into its static output, as a replay would; each capture appends
    its first input's shape to `captures`."""

    def record(forward, static_inputs):
        captures.append(tuple(static_inputs[0].shape))
        static_output = forward(*static_inputs)

        def replay():
            static_output.copy_(forward(*static_inputs))

        return replay, static_output

    return record
