"""Addition with a verifier: the built-in task for online RL from verifiable rewards.

Prompt "17+5=" asks for the sum. The gold reward is 1 for the exact sum (surrounding spaces
ignored) and 0 otherwise, which is also the reward an RL run is trained on. One operand pair in
five is held out: the "train" and "eval" splits never show it and the "ood" split shows nothing
else, so accuracy on "ood" measures what was learnt about addition, not which answers were
memorised ("eval" draws in-distribution pairs with another seed and may repeat training pairs).

The base-model corpus holds equations whose answer is the sum half of the time and a near miss
(off by 1 to 3) otherwise; comparisons pair the sum with a near miss, labelled by the gold reward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignkit.data.records import Comparison, Demonstration, PromptRecord
from alignkit.tasks.labels import check_split, label_pairs


@dataclass
class ArithmeticTask:
    max_operand: int = 99
    label_temperature: float = 0.0   # Bradley-Terry temperature; 0: the verifier's verdict decides

    def answer(self, prompt: str) -> str:
        left, right = prompt.rstrip("=").split("+")
        return str(int(left) + int(right))

    def gold_reward(self, prompt: str, completion: str) -> float:
        return float(completion.strip() == self.answer(prompt))

    def held_out(self, left: int, right: int) -> bool:
        return (left * 7 + right * 3) % 5 == 0

    def _prompts(self, n: int, seed: int, split: str) -> list[str]:
        check_split(split)
        rng, out = random.Random(seed), []
        while len(out) < n:
            left, right = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if split == "corpus" or self.held_out(left, right) == (split == "ood"):
                out.append(f"{left}+{right}=")
        return out

    def _near_miss(self, prompt: str, rng: random.Random) -> str:
        return str(int(self.answer(prompt)) + rng.choice([-3, -2, -1, 1, 2, 3]))

    def corpus(self, n: int, seed: int = 0) -> list[Demonstration]:
        """Equations over every operand pair, right half of the time, for pretraining a base model."""
        rng = random.Random(seed + 1)
        return [Demonstration(p, self.answer(p) if rng.random() < 0.5 else self._near_miss(p, rng), index=i,
                              origin=f"arithmetic:{i}") for i, p in enumerate(self._prompts(n, seed, "corpus"))]

    def demonstrations(self, n: int, seed: int = 0, split: str = "train") -> list[Demonstration]:
        return [Demonstration(p, self.answer(p), index=i, origin=f"arithmetic:{i}")
                for i, p in enumerate(self._prompts(n, seed, split))]

    def prompts(self, n: int, seed: int = 0, split: str = "train") -> list[PromptRecord]:
        return [PromptRecord(p, self.answer(p), index=i, origin=f"arithmetic:{i}")
                for i, p in enumerate(self._prompts(n, seed, split))]

    def comparisons(self, n: int, seed: int = 0, flip_rate: float = 0.0, split: str = "train",
                    targeted_flip_rate: float = 0.0) -> tuple[list[Comparison], list[bool]]:
        """(sum, near miss) pairs in random order, labelled from the verifier; see `labels.py`."""
        rng = random.Random(seed + 2)

        def candidates():
            for prompt in self._prompts(n, seed, split):
                a, b = self.answer(prompt), self._near_miss(prompt, rng)
                yield (prompt, a, b) if rng.random() < 0.5 else (prompt, b, a)
        return label_pairs(candidates(), self.gold_reward, rng, self.label_temperature, flip_rate, targeted_flip_rate,
                           "arithmetic")
