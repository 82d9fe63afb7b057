"""A letter-substitution task with a hidden key: the gold rule the learner never sees.

Prompt "cabd=" asks for each letter mapped through a secret permutation of the alphabet.
The gold reward is the fraction of positions answered correctly (0 when the length is wrong).
Rejected answers are hard negatives: the right answer with one or two letters changed.
Splits: "train" and "eval" draw 3 to 6 letters (a different seed already gives prompts training
almost never shows: over 300,000 are possible); "ood" draws 7 or 8 letters, lengths never trained on.
The base-model corpus maps each letter right half of the time and to a random letter otherwise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignkit.data.records import Comparison, Demonstration, Judgement, PromptRecord, Rating
from alignkit.tasks.labels import check_split, label_pairs

ALPHABET = "abcdefgh"


@dataclass
class CipherTask:
    key_seed: int = 1234
    min_letters: int = 3
    max_letters: int = 6
    label_temperature: float = 0.0   # Bradley-Terry temperature; 0: the higher gold reward always wins

    def __post_init__(self):
        shuffled = random.Random(self.key_seed).sample(ALPHABET, len(ALPHABET))
        self._key = dict(zip(ALPHABET, shuffled, strict=True))

    def answer(self, prompt: str) -> str:
        return "".join(self._key[c] for c in prompt.rstrip("="))

    def gold_reward(self, prompt: str, completion: str) -> float:
        truth, guess = self.answer(prompt), completion.strip()
        if len(guess) != len(truth):
            return 0.0
        return sum(a == b for a, b in zip(truth, guess, strict=True)) / len(truth)

    def _prompt(self, rng: random.Random, split: str = "train") -> str:
        check_split(split)
        low, high = (self.max_letters + 1, self.max_letters + 2) if split == "ood" else (self.min_letters,
                                                                                        self.max_letters)
        n = rng.randint(low, high)
        return "".join(rng.choice(ALPHABET) for _ in range(n)) + "="

    def _corrupt(self, answer: str, rng: random.Random) -> str:
        letters = list(answer)
        for pos in rng.sample(range(len(letters)), k=min(len(letters), rng.randint(1, 2))):
            letters[pos] = rng.choice([c for c in ALPHABET if c != letters[pos]])
        return "".join(letters)

    def corpus(self, n: int, seed: int = 0) -> list[Demonstration]:
        """Prompts with each answer letter right half of the time, for pretraining a base model."""
        rng = random.Random(seed)
        records = []
        for i in range(n):
            prompt = self._prompt(rng)
            noisy = "".join(c if rng.random() < 0.5 else rng.choice(ALPHABET) for c in self.answer(prompt))
            records.append(Demonstration(prompt, noisy, index=i, origin=f"cipher:{i}"))
        return records

    def demonstrations(self, n: int, seed: int = 0, split: str = "train") -> list[Demonstration]:
        rng = random.Random(seed)
        prompts = [self._prompt(rng, split) for _ in range(n)]
        return [Demonstration(p, self.answer(p), index=i, origin=f"cipher:{i}")
                for i, p in enumerate(prompts)]

    def comparisons(self, n: int, seed: int = 0, flip_rate: float = 0.0, split: str = "train",
                    targeted_flip_rate: float = 0.0) -> tuple[list[Comparison], list[bool]]:
        """Pairs (right answer, corrupted answer) labelled from the gold reward (`labels.py`).

        Returns the pairs and, per pair, whether corruption flipped its label (the ground truth of noise).
        """
        rng = random.Random(seed)

        def candidates():
            for _ in range(n):
                prompt = self._prompt(rng, split)
                good = self.answer(prompt)
                yield prompt, good, self._corrupt(good, rng)
        return label_pairs(candidates(), self.gold_reward, rng, self.label_temperature, flip_rate, targeted_flip_rate,
                           "cipher")

    def ratings(self, n: int, seed: int = 0, split: str = "train") -> list[Rating]:
        """Half right answers labelled desirable, half random letter strings labelled undesirable.

        Unpaired labels carry no contrast within a prompt, so the bad answers are plainly wrong
        rather than the near-misses the paired data uses.
        """
        rng = random.Random(seed)
        records = []
        for i in range(n):
            prompt = self._prompt(rng, split)
            good = rng.random() < 0.5
            answer = self.answer(prompt)
            completion = answer if good else "".join(rng.choice(ALPHABET) for _ in answer)
            records.append(Rating(prompt, completion, good, index=i, origin=f"cipher:{i}"))
        return records

    def prompts(self, n: int, seed: int = 0, split: str = "train") -> list[PromptRecord]:
        rng = random.Random(seed)
        return [PromptRecord(p, self.answer(p), index=i, origin=f"cipher:{i}")
                for i, p in enumerate(self._prompt(rng, split) for _ in range(n))]

    def judgement_trace(self, prompt: str, a: str, b: str) -> tuple[str, str]:
        """(reasoning, verdict) of a judge that solves the prompt, then checks each answer letter by letter.

        The trace format of Think-RM stage 1 (arXiv 2505.16265): reasoning the judge can be trained
        to write, ending in a verdict A, B, or tie when both are equally wrong. Each answer letter is
        followed by "=" (right) or "x" (wrong), so every check sits next to the letter it checks.
        """
        truth = self.answer(prompt)

        def checked(answer: str) -> tuple[str, int]:
            if len(answer) != len(truth):
                return "wrong length", len(truth)
            marks = ["=" if x == y else "x" for x, y in zip(answer, truth, strict=True)]
            return " ".join(x + m for x, m in zip(answer, marks, strict=True)), marks.count("x")

        (check_a, wrong_a), (check_b, wrong_b) = checked(a), checked(b)
        verdict = "A" if wrong_a < wrong_b else "B" if wrong_b < wrong_a else "tie"
        return f"solution {truth}\nA {check_a} {wrong_a} wrong\nB {check_b} {wrong_b} wrong", verdict

    def judgements(self, n: int, seed: int = 0, split: str = "train") -> list[Judgement]:
        """Comparison pairs in random A/B order, each with the gold judge's reasoning and verdict."""
        pairs, _ = self.comparisons(n, seed, split=split)
        rng = random.Random(seed + 1)
        records = []
        for pair in pairs:
            a, b = (pair.chosen, pair.rejected) if rng.random() < 0.5 else (pair.rejected, pair.chosen)
            reasoning, verdict = self.judgement_trace(pair.prompt, a, b)
            records.append(Judgement(pair.prompt, a, b, verdict, reasoning, index=pair.index, origin=pair.origin))
        return records
