from __future__ import annotations

from collections import Counter

import pytest

from vlmoe.data.conversations import ConversationSample
from vlmoe.data.mixing import MixtureSource, mix_sources


def _samples(prefix: str, n: int) -> list[ConversationSample]:
    return [
        ConversationSample(f"{prefix}{i}", [], [{"role": "user", "content": "q"}], domain="own")
        for i in range(n)
    ]


def test_shares_follow_weights_and_every_sample_carries_its_source_domain():
    sources = [
        MixtureSource("chart", _samples("c", 100), 0.5),
        MixtureSource("chat", _samples("t", 10), 0.3),
        MixtureSource("ocr", _samples("o", 50), 0.2),
    ]
    mixed = mix_sources(sources, num_samples=101, seed=0)
    assert Counter(s.domain for s in mixed) == {"chart": 51, "chat": 30, "ocr": 20}
    assert all(s.id[0] == {"chart": "c", "chat": "t", "ocr": "o"}[s.domain] for s in mixed)
    chat_ids = Counter(s.id for s in mixed if s.domain == "chat")
    assert set(chat_ids.values()) == {3}  # 30 draws from 10 samples: exactly three epochs
    assert len({s.id for s in mixed if s.domain == "chart"}) == 51  # no repeats while samples remain


def test_mixing_is_deterministic_per_seed():
    sources = [MixtureSource("a", _samples("a", 20), 1), MixtureSource("b", _samples("b", 20), 1)]
    first = [s.id for s in mix_sources(sources, 30, seed=1)]
    assert first == [s.id for s in mix_sources(sources, 30, seed=1)]
    assert first != [s.id for s in mix_sources(sources, 30, seed=2)]


def test_bad_weights_are_refused_clearly():
    for weight in (-1, float("inf"), float("nan")):  # an infinite share makes every count garbage
        with pytest.raises(ValueError, match=f"'a': weight is {weight}; use a finite weight >= 0"):
            mix_sources(
                [MixtureSource("a", _samples("a", 2), weight), MixtureSource("b", _samples("b", 2), 1)], 4
            )
    with pytest.raises(ValueError, match="all mixture weights are 0"):
        mix_sources([MixtureSource("a", _samples("a", 2), 0)], 4)
    with pytest.raises(ValueError, match="'b' has weight 1 but no samples"):
        mix_sources([MixtureSource("b", [], 1)], 4)
