"""Addition with a verifier: the built-in task for online RL from verifiable rewards.

Prompt "17+5=" asks for the sum. The gold reward is 1 for the exact sum (surrounding spaces
ignored) and 0 otherwise, which is also the reward an RL run is trained on. One operand pair in
five is held out: training data never shows it and evaluation data shows nothing else, so held-out
accuracy measures what was learnt about addition, not which answers were memorised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignkit.data.records import Demonstration, PromptRecord


@dataclass
class ArithmeticTask:
    max_operand: int = 99

    def answer(self, prompt: str) -> str:
        left, right = prompt.rstrip("=").split("+")
        return str(int(left) + int(right))

    def gold_reward(self, prompt: str, completion: str) -> float:
        return float(completion.strip() == self.answer(prompt))

    def held_out(self, left: int, right: int) -> bool:
        return (left * 7 + right * 3) % 5 == 0

    def _prompts(self, n: int, seed: int, split: str) -> list[str]:
        rng, out = random.Random(seed), []
        while len(out) < n:
            left, right = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            if self.held_out(left, right) == (split == "eval"):
                out.append(f"{left}+{right}=")
        return out

    def demonstrations(self, n: int, seed: int = 0, split: str = "train") -> list[Demonstration]:
        return [Demonstration(p, self.answer(p), index=i, origin=f"arithmetic:{i}")
                for i, p in enumerate(self._prompts(n, seed, split))]

    def prompts(self, n: int, seed: int = 0, split: str = "train") -> list[PromptRecord]:
        return [PromptRecord(p, self.answer(p), index=i, origin=f"arithmetic:{i}")
                for i, p in enumerate(self._prompts(n, seed, split))]
