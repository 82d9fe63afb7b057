"""Preference labels sampled from a gold reward, with the two kinds of corruption experiments need.

A pair (a, b) with gold margin m = r(a) - r(b) prefers a with probability sigmoid(m / temperature)
(Bradley-Terry); temperature 0 is its limit, where the higher gold reward always wins (a coin on
ties). Corruption is applied on top, and reported per pair as the ground truth of noise:
- random flips: each label swapped independently with probability `flip_rate`;
- targeted flips: the `targeted_flip_rate` share of pairs with the largest |m| labelled against the
  gold reward: the pairs a reward model is most sure of, so the most damaging flips of a given count.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

from alignkit.data.records import Comparison


def prefers_first(rng: random.Random, margin: float, temperature: float) -> bool:
    if temperature == 0:
        return margin > 0 or (margin == 0 and rng.random() < 0.5)
    return rng.random() < 1 / (1 + math.exp(-margin / temperature))


def labelled_pair(rng: random.Random, prompt: str, a: str, b: str, margin: float, temperature: float,
                  flip_rate: float, index: int, origin: str) -> tuple[Comparison, bool]:
    """One comparison with a sampled label, randomly flipped with probability `flip_rate`."""
    first = prefers_first(rng, margin, temperature)
    flipped = rng.random() < flip_rate
    chosen, rejected = (a, b) if first != flipped else (b, a)
    return Comparison(prompt, chosen, rejected, index=index, origin=origin), flipped


def label_pairs(candidates: Iterable[tuple[str, str, str]], gold: Callable[[str, str], float], rng: random.Random,
                temperature: float, flip_rate: float, targeted_flip_rate: float, task: str
                ) -> tuple[list[Comparison], list[bool]]:
    """Label (prompt, a, b) candidates from the gold reward, then corrupt them; returns pairs and flip flags.

    `candidates` may draw from `rng` too: it is consumed lazily, one pair at a time."""
    pairs, flipped = [], []
    for i, (prompt, a, b) in enumerate(candidates):
        margin = gold(prompt, a) - gold(prompt, b)
        pair, flip = labelled_pair(rng, prompt, a, b, margin, temperature, flip_rate, index=i, origin=f"{task}:{i}")
        pairs.append(pair)
        flipped.append(flip)
    return flip_most_confident(pairs, flipped, gold, targeted_flip_rate)


def flip_most_confident(pairs: list[Comparison], flipped: list[bool], gold: Callable[[str, str], float],
                        rate: float) -> tuple[list[Comparison], list[bool]]:
    """Label the `rate` share of pairs with the largest |gold margin| against the gold reward."""
    margins = [gold(p.prompt, p.chosen) - gold(p.prompt, p.rejected) for p in pairs]
    targets = sorted(range(len(pairs)), key=lambda i: -abs(margins[i]))[:round(rate * len(pairs))]
    pairs, flipped = list(pairs), list(flipped)
    for i in targets:
        if margins[i] > 0:
            p = pairs[i]
            pairs[i] = Comparison(p.prompt, p.rejected, p.chosen, index=p.index, origin=p.origin)
        flipped[i] = True
    return pairs, flipped


SPLITS = ("train", "eval", "ood")


def check_split(split: str) -> str:
    if split not in SPLITS + ("corpus",):
        raise ValueError(f"unknown task split {split!r}; splits: {', '.join(SPLITS)}")
    return split
