"""vlmoe: turn a dense vision-language model into a sparse Mixture-of-Experts one, and train it."""

from vlmoe.moe import aux_loss

__version__ = "0.1.0"

__all__ = ["__version__", "aux_loss"]
