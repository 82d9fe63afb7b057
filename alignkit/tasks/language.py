"""A synthetic language with a hidden gold reward: the built-in task for learning from preferences.

Sixteen two-letter words; each word may be followed by four of them (a bigram grammar drawn from
`key_seed`). Prompt "ka mo:" asks for a continuation of four words, e.g. "di fu ne ra". Every word
has a hidden value in [0, 1]. The gold reward is the mean value of the four words, where a word that
breaks the grammar scores 0 and a word past the fourth costs a full word; the learner sees only data
that was labelled with it, never the values.

- corpus: continuations drawn uniformly from the grammar (what a base model is pretrained on);
- demonstrations: the best of `demo_best_of` grammar samples by gold reward, using only
  in-distribution words (so SFT improves on the base but leaves room above it);
- comparisons: two grammar samples, a quarter of them a word short or long, labelled Bradley-Terry
  from the gold reward (`labels.py`);
- prompts: "train" and "eval" end in one of twelve in-distribution words, "ood" in one of the four
  out-of-distribution words that demonstrations never contain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignkit.data.records import Comparison, Demonstration, PromptRecord
from alignkit.tasks.labels import check_split, label_pairs

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
WORDS, OOD_WORDS, SUCCESSORS, LENGTH = 16, 4, 4, 4


@dataclass
class LanguageTask:
    key_seed: int = 7
    demo_best_of: int = 4
    label_temperature: float = 0.05  # Bradley-Terry temperature on gold-reward margins

    def __post_init__(self):
        rng = random.Random(self.key_seed)
        self.words = rng.sample([c + v for c in CONSONANTS for v in VOWELS], WORDS)
        self.ood_words = self.words[:OOD_WORDS]
        self.in_words = self.words[OOD_WORDS:]
        # three in-distribution successors and one out-of-distribution successor per word
        self._next = {w: rng.sample(self.in_words, SUCCESSORS - 1) + [rng.choice(self.ood_words)]
                      for w in self.words}
        self._value = {w: rng.random() for w in self.words}

    def gold_reward(self, prompt: str, completion: str) -> float:
        last, words, score = prompt.rstrip(":").split()[-1], completion.split(), 0.0
        for word in words[:LENGTH]:
            score += self._value[word] if word in self._next.get(last, ()) else 0.0
            last = word
        return max(0.0, score - len(words[LENGTH:])) / LENGTH

    def _continuation(self, last: str, rng: random.Random, in_distribution: bool) -> str:
        words = []
        for _ in range(LENGTH):
            choices = self._next[last][:SUCCESSORS - 1] if in_distribution else self._next[last]
            last = rng.choice(choices)
            words.append(last)
        return " ".join(words)

    def _odd_length(self, completion: str, rng: random.Random) -> str:
        """A quarter of comparison samples lose their last word or gain one, so labels also teach length."""
        words = completion.split()
        draw = rng.random()
        if draw < 0.125:
            return " ".join(words[:-1])
        if draw < 0.25:
            return " ".join(words + [rng.choice(self._next[words[-1]])])
        return completion

    def _prompt(self, rng: random.Random, split: str) -> str:
        check_split(split)
        first = rng.choice(self.words if split in ("ood", "corpus") else self.in_words)
        successors = {"ood": self._next[first][-1:], "corpus": self._next[first]}.get(split, self._next[first][:-1])
        return f"{first} {rng.choice(successors)}:"

    def _records(self, kind, n: int, seed: int, split: str, completion) -> list:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            prompt = self._prompt(rng, split)
            out.append(kind(prompt, completion(prompt, rng), index=i, origin=f"language:{i}"))
        return out

    def corpus(self, n: int, seed: int = 0) -> list[Demonstration]:
        """Prompt/continuation pairs drawn uniformly from the grammar, for pretraining a base model."""
        return self._records(Demonstration, n, seed, "corpus",
                             lambda p, rng: self._continuation(p.split()[-1][:-1], rng, False))

    def demonstrations(self, n: int, seed: int = 0, split: str = "train") -> list[Demonstration]:
        def best(prompt: str, rng: random.Random) -> str:
            samples = [self._continuation(prompt[:-1].split()[-1], rng, split != "ood")
                       for _ in range(self.demo_best_of)]
            return max(samples, key=lambda c: self.gold_reward(prompt, c))
        return self._records(Demonstration, n, seed, split, best)

    def prompts(self, n: int, seed: int = 0, split: str = "train") -> list[PromptRecord]:
        return self._records(PromptRecord, n, seed, split, lambda p, rng: None)

    def comparisons(self, n: int, seed: int = 0, flip_rate: float = 0.0, split: str = "train",
                    targeted_flip_rate: float = 0.0) -> tuple[list[Comparison], list[bool]]:
        """Pairs of grammar samples labelled Bradley-Terry from the gold reward; returns the pairs and,
        per pair, whether corruption flipped its label."""
        rng = random.Random(seed)

        def candidates():
            for _ in range(n):
                prompt = self._prompt(rng, split)
                last = prompt[:-1].split()[-1]
                yield prompt, *(self._odd_length(self._continuation(last, rng, False), rng) for _ in range(2))
        return label_pairs(candidates(), self.gold_reward, rng, self.label_temperature, flip_rate, targeted_flip_rate,
                           "language")
