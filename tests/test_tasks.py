"""Built-in tasks: gold rewards, splits, base corpora, and preference labels sampled from the gold reward."""

import math
import random
import statistics

import pytest

from alignkit.tasks import TASKS, ArithmeticTask, CipherTask, LanguageTask
from alignkit.tasks.labels import flip_most_confident, labelled_pair, prefers_first

ALL = [ArithmeticTask(max_operand=9), CipherTask(), LanguageTask()]


def agreement(task, pairs) -> float:
    """Share of pairs whose chosen completion has the higher gold reward (ties count half)."""
    def score(p):
        diff = task.gold_reward(p.prompt, p.chosen) - task.gold_reward(p.prompt, p.rejected)
        return 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0
    return statistics.mean(map(score, pairs))


@pytest.mark.parametrize("task", ALL, ids=lambda t: type(t).__name__)
def test_every_task_has_corpus_demonstrations_comparisons_and_three_prompt_splits(task):
    corpus, demos = task.corpus(300, seed=0), task.demonstrations(300, seed=0)
    gold = lambda records: statistics.mean(task.gold_reward(r.prompt, r.completion) for r in records)  # noqa: E731
    assert gold(demos) > gold(corpus)  # demonstrations are better than what a base model sees
    prompts = {split: task.prompts(50, seed=1, split=split) for split in ("train", "eval", "ood")}
    assert all(len(p) == 50 for p in prompts.values())
    assert not {p.prompt for p in prompts["ood"]} & {p.prompt for p in prompts["train"] + prompts["eval"]}
    pairs, flipped = task.comparisons(200, seed=0)
    assert len(pairs) == 200 and not any(flipped)
    assert agreement(task, pairs) > 0.6


def test_language_gold_reward_scores_words_and_grammar():
    task = LanguageTask()
    prompt = f"{task.words[5]} {task.words[6]}:"
    last, words = task.words[6], []
    for _ in range(4):
        last = task._next[last][0]
        words.append(last)
    good = " ".join(words)
    expected = sum(task._value[w] for w in words) / 4
    assert task.gold_reward(prompt, good) == pytest.approx(expected)
    assert task.gold_reward(prompt, good + " " + words[0]) == pytest.approx(max(0.0, expected - 0.25))
    outside = next(w for w in task.words if w not in task._next[words[2]])
    assert task.gold_reward(prompt, " ".join(words[:3] + [outside])) == pytest.approx(
        sum(task._value[w] for w in words[:3]) / 4)
    assert task.gold_reward(prompt, "xx yy zz ww") == 0.0


def test_language_demonstrations_avoid_ood_words_and_ood_prompts_end_in_one():
    task = LanguageTask()
    demo_words = {w for d in task.demonstrations(500) for w in d.completion.split()}
    assert demo_words and not demo_words & set(task.ood_words)
    assert all(p.prompt[:-1].split()[-1] in task.ood_words for p in task.prompts(100, split="ood"))
    assert all(p.prompt[:-1].split()[-1] not in task.ood_words for p in task.prompts(100, split="eval"))


def test_arithmetic_ood_split_holds_the_pairs_training_never_shows():
    task = ArithmeticTask(max_operand=9)
    operands = lambda records: {tuple(map(int, r.prompt[:-1].split("+"))) for r in records}  # noqa: E731
    train = operands(task.demonstrations(500) + task.comparisons(500)[0] + task.prompts(500, split="eval"))
    ood = operands(task.prompts(200, split="ood"))
    assert all(task.held_out(*pair) for pair in ood) and not train & ood
    assert operands(task.corpus(500)) & ood  # the base corpus covers every pair


def test_bradley_terry_labels_follow_the_sigmoid_of_the_margin():
    rng, margin, temperature = random.Random(0), 0.1, 0.1
    share = statistics.mean(prefers_first(rng, margin, temperature) for _ in range(20_000))
    assert share == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    assert prefers_first(rng, 0.2, 0.0) and not prefers_first(rng, -0.2, 0.0)
    ties = statistics.mean(prefers_first(rng, 0.0, 0.0) for _ in range(4000))
    assert ties == pytest.approx(0.5, abs=0.03)


def test_random_flips_swap_a_share_of_labels_and_are_reported():
    rng = random.Random(1)
    results = [labelled_pair(rng, "p", "good", "bad", 1.0, 0.0, 0.3, i, "x") for i in range(5000)]
    assert statistics.mean(f for _, f in results) == pytest.approx(0.3, abs=0.02)
    assert all((pair.chosen == "bad") == flipped for pair, flipped in results)


@pytest.mark.parametrize("task", ALL, ids=lambda t: type(t).__name__)
def test_noise_knobs_lower_label_agreement_by_what_they_flip(task):
    clean, _ = task.comparisons(400, seed=3)
    noisy, flipped = task.comparisons(400, seed=3, flip_rate=0.2)
    assert 0.15 < statistics.mean(flipped) < 0.25
    assert all((a.chosen == b.chosen) != f for a, b, f in zip(clean, noisy, flipped, strict=True))
    targeted, marked = task.comparisons(400, seed=3, targeted_flip_rate=0.25)
    assert sum(marked) == 100
    assert agreement(task, targeted) < agreement(task, clean) - 0.15


def test_targeted_flips_hit_the_largest_margins_and_end_against_gold():
    gold = {"a": 1.0, "b": 0.0, "c": 0.6, "d": 0.5}.get
    from alignkit.data.records import Comparison
    pairs = [Comparison("p", "a", "b"), Comparison("p", "c", "d"), Comparison("p", "b", "a")]
    out, flipped = flip_most_confident(pairs, [False, False, True], lambda p, c: gold(c), rate=0.34)
    assert [(p.chosen, p.rejected) for p in out] == [("b", "a"), ("c", "d"), ("b", "a")]
    assert flipped == [True, False, True]
    # the third pair (margin 1, already against gold) ranks equal with the first: either may be taken,
    # and both end against gold
    out, flipped = flip_most_confident(pairs, [False, False, True], lambda p, c: gold(c), rate=0.67)
    assert [(p.chosen, p.rejected) for p in out] == [("b", "a"), ("c", "d"), ("b", "a")] and flipped[0]


def test_tasks_registry_lists_the_three_tasks():
    assert {"arithmetic", "cipher", "language"} <= set(TASKS.names())
    assert isinstance(TASKS.get("language").fn(), LanguageTask)


@pytest.mark.parametrize("task", ALL, ids=lambda t: type(t).__name__)
def test_an_unknown_split_is_an_error_naming_the_splits(task):
    with pytest.raises(ValueError, match="unknown task split 'test'.*train, eval, ood"):
        task.prompts(3, split="test")
