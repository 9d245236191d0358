"""In-memory stand-ins for the sense store and the lexicon (the interfaces of docs/interfaces.md).

They let the loss and loop tests run without building a real lexicon or sense dictionary.
"""

from __future__ import annotations

import torch

from dskd.tasks import Item, Task


class FakeStore:
    """A dict-based sense store: entry -> (n_e, d) senses; multi-token tails get entries >= vocab_size."""

    def __init__(self, senses: dict[int, torch.Tensor], spans: dict[tuple[int, ...], int] | None = None, median=3.5):
        self._senses = senses
        self._spans = spans or {}
        self.dim = next(iter(senses.values())).shape[-1]
        self.meta = {"distance": {"median_mse": median}}
        self.teacher_fingerprint = "fake-teacher"
        self.fingerprint = "fake-store"

    def senses(self, entry: int) -> torch.Tensor:
        return self._senses.get(entry, torch.zeros(0, self.dim))

    def entry_of(self, tail: tuple[int, ...]) -> int | None:
        if len(tail) == 1:
            return tail[0] if tail[0] in self._senses else None
        return self._spans.get(tuple(tail))

    @classmethod
    def random(cls, tokens: list[int], dim: int, k: int = 3, seed: int = 0, scale: float = 1.0) -> FakeStore:
        g = torch.Generator().manual_seed(seed)
        return cls({t: torch.randn(k, dim, generator=g) * scale for t in tokens})


class FakeLexicon:
    """A dict-based lexicon: token id -> list of tails (token-id tuples)."""

    def __init__(self, syn: dict[int, list[tuple[int, ...]]], ant: dict[int, list[tuple[int, ...]]]):
        self._syn, self._ant = syn, ant
        self.fingerprint = "fake-lexicon"
        self.tokenizer_fingerprint = "fake-tokenizer"

    def synonyms(self, token_id: int) -> list[tuple[int, ...]]:
        return self._syn.get(token_id, [])

    def antonyms(self, token_id: int) -> list[tuple[int, ...]]:
        return self._ant.get(token_id, [])

    @classmethod
    def from_pairs(cls, syn_pairs, ant_pairs) -> FakeLexicon:
        syn: dict[int, list[tuple[int, ...]]] = {}
        ant: dict[int, list[tuple[int, ...]]] = {}
        for table, pairs in ((syn, syn_pairs), (ant, ant_pairs)):
            for a, b in pairs:
                table.setdefault(a, []).append((b,))
                table.setdefault(b, []).append((a,))
        return cls(syn, ant)


# ---- a hand-made multiple-choice task (evaluation tests) ----------------------------------------
QS = [
    ("Which is hot?", ("fire", "water", "the cold night", "ice"), 0),
    ("Which is fast?", ("a slow bus", "the quick train"), 1),
    ("What is the opposite of good?", ("bad", "a big red house", "happy"), 0),
    ("Which word means large?", ("small", "little", "big"), 2),
    ("Which is dark?", ("day", "night"), 1),
    ("Which rises?", ("the price of water in the market", "fall"), 0),
]


class ToyTask(Task):
    name = "toy"
    title = "Toy"
    protocol = "hand-made"

    def _load(self, part: str) -> list[Item]:
        sub = ["a", "a", "b", "b", "b", "c"]
        items = [Item(f"{part}{i}", q, c, g, subject=sub[i]) for i, (q, c, g) in enumerate(QS)]
        return items if part == "eval" else [Item(f"t{x.id}", f"Train {x.question}", x.choices, x.gold) for x in items]


class FixedShots(ToyTask):
    """Every question is shown the same exemplars (the first k training items), as MMLU's dev shots."""

    def exemplars(self, item, k, seed=0):
        return self.train_items()[:k]
