"""Addition with a verifier: the built-in task for online RL from verifiable rewards.

Prompt "17+5=" asks for the sum. The gold reward is 1 for the exact sum (surrounding spaces
ignored) and 0 otherwise, which is also the reward an RL run is trained on.
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

    def _prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [f"{rng.randint(0, self.max_operand)}+{rng.randint(0, self.max_operand)}=" for _ in range(n)]

    def demonstrations(self, n: int, seed: int = 0) -> list[Demonstration]:
        return [Demonstration(p, self.answer(p), index=i, origin=f"arithmetic:{i}")
                for i, p in enumerate(self._prompts(n, seed))]

    def prompts(self, n: int, seed: int = 0) -> list[PromptRecord]:
        return [PromptRecord(p, self.answer(p), index=i, origin=f"arithmetic:{i}")
                for i, p in enumerate(self._prompts(n, seed))]
