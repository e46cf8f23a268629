"""Mix several conversation sources by weight; every sample keeps a domain tag.

The domain (the name of the source a sample was drawn from) travels to the collator and the
training logs, so losses and expert loads can be split by where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vlmoe.data.conversations import ConversationSample


@dataclass(frozen=True)
class MixtureSource:
    name: str  # the domain tag given to its samples
    samples: list[ConversationSample]
    weight: float


def mix_sources(sources: list[MixtureSource], num_samples: int, seed: int = 0) -> list[ConversationSample]:
    """`num_samples` samples drawn so each source's share is its weight / total weight, shuffled.

    A source is read without repetition until it runs out, then repeated (epochs of it).
    Shares are rounded by largest remainder, so they sum exactly to `num_samples`.

    >>> from vlmoe.data.conversations import ConversationSample
    >>> def make(n):
    ...     return [ConversationSample(str(i), [], [{"role": "user", "content": "q"}]) for i in range(n)]
    >>> mixed = mix_sources([MixtureSource("chart", make(5), 3), MixtureSource("chat", make(5), 1)], 8)
    >>> sorted(s.domain for s in mixed).count("chart")
    6
    """
    if not sources:
        raise ValueError("mix_sources needs at least one source")
    for source in sources:
        if not 0 <= source.weight < float("inf"):  # NaN too; an infinite share makes every count garbage
            raise ValueError(f"source {source.name!r}: weight is {source.weight}; use a finite weight >= 0")
        if source.weight > 0 and not source.samples:
            raise ValueError(f"source {source.name!r} has weight {source.weight} but no samples; drop it")
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError("all mixture weights are 0; give at least one source a positive weight")
    exact = weights / weights.sum() * num_samples
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_samples - counts.sum()]:
        counts[i] += 1
    rng = np.random.default_rng(seed)
    mixed: list[ConversationSample] = []
    for source, count in zip(sources, counts, strict=True):
        if count == 0:
            continue
        repeats = -(-count // len(source.samples))
        order = np.concatenate([rng.permutation(len(source.samples)) for _ in range(repeats)])[:count]
        mixed += [replace(source.samples[i], domain=source.name) for i in order]
    return [mixed[i] for i in rng.permutation(len(mixed))]
