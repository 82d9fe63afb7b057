"""Advantage estimators against their closed forms, computed by hand on small tensors."""

import inspect
import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.algorithms.advantages import ADVANTAGES, OUTPUTS, estimate

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 4.0, 6.0, 8.0]], dtype=torch.float64)


def call(name, *args, **options):
    return ADVANTAGES.call(name, *args, **options)


def assert_close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double(), expected, atol=1e-9), (actual, expected)


def test_grpo_normalises_each_group_by_its_unbiased_std():
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: mean 5, unbiased std sqrt(20/3)
    s0, s1 = math.sqrt(1 / 3), math.sqrt(20 / 3)
    assert_close(call("grpo", R, eps=0.0), [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0],
                                           [-3 / s1, -1 / s1, 1 / s1, 3 / s1]])


def test_grpo_gives_zero_for_a_group_without_variance():
    assert call("grpo", torch.ones(1, 4)).tolist() == [[0.0] * 4]


def test_dr_grpo_only_centres():
    assert call("dr_grpo", R).tolist() == [[0.5, -0.5, -0.5, 0.5], [-3.0, -1.0, 1.0, 3.0]]


def test_rloo_subtracts_the_mean_of_the_others():
    # 2 - (4+6+8)/3 = -4; 4 - 16/3; 6 - 14/3; 8 - 4
    assert call("rloo", R)[1].tolist() == pytest.approx([-4.0, 4 - 16 / 3, 6 - 14 / 3, 4.0])
    assert call("rloo", R)[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_remax_subtracts_the_greedy_reward():
    assert call("remax", R, baseline=torch.tensor([1.0, 5.0], dtype=torch.float64)).tolist() == [
        [0.0, -1.0, -1.0, 0.0], [-3.0, -1.0, 1.0, 3.0]]


def test_reinforce_pp_baseline_whitens_over_tokens():
    rewards = torch.tensor([[1.0, 3.0]], dtype=torch.float64)       # centred: -1, +1
    lengths = torch.tensor([[3, 1]])                                 # tokens: -1,-1,-1,+1 -> mean -0.5, var 0.75
    out = call("reinforce_pp_baseline", rewards, lengths=lengths, eps=0.0)
    assert_close(out, [[-0.5 / math.sqrt(0.75), 1.5 / math.sqrt(0.75)]])


def differences(rewards: torch.Tensor) -> torch.Tensor:
    return rewards[:, :, None] - rewards[:, None, :]


def test_pairwise_equals_grpo_when_preferences_are_reward_differences():
    out = call("pairwise", differences(R), eps=0.0)
    assert_close(out, call("grpo", R, eps=0.0))


def test_pairwise_on_a_hand_made_verdict_matrix():
    d = torch.tensor([[[0.0, 1.0, 1.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]])
    # row means: 2/3, -1/3, -1/3; sum of squares 4 over 2*3*2 = 12 -> spread sqrt(1/3)
    out = call("pairwise", d, eps=0.0)
    spread = math.sqrt(1 / 3)
    assert_close(out, [[2 / 3 / spread, -1 / 3 / spread, -1 / 3 / spread]])


def test_pairwise_mean_is_rloo_from_reward_differences_and_is_clamped():
    assert_close(call("pairwise_mean", differences(R)), call("rloo", R))
    big = differences(torch.tensor([[0.0, 100.0]]))
    assert call("pairwise_mean", big).tolist() == [[-10.0, 10.0]]


def test_pairwise_rejects_a_matrix_that_is_not_skew_symmetric():
    with pytest.raises(ValueError, match="skew-symmetric"):
        call("pairwise", torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="G >= 2"):
        call("pairwise", torch.zeros(1, 1, 1))


def test_gae_by_hand_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 9.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    gamma, lam = 0.9, 0.5
    d2 = 1.0 - 0.6
    d1 = 0.0 + gamma * 0.6 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    advantages, returns = call("gae", rewards, values, mask, gamma=gamma, lam=lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])
    assert advantages[1].tolist() == pytest.approx([0.5 - 0.1, 0.0, 0.0])   # one token: V after it is 0
    assert returns[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 10_000))
def test_group_advantages_do_not_depend_on_the_other_groups(n, g, seed):
    """Scoring groups together or one at a time gives the same advantages (group statistics are per group)."""
    rewards = torch.randn(n, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for name in ("grpo", "dr_grpo", "rloo"):
        together = call(name, rewards)
        alone = torch.cat([call(name, rewards[i:i + 1]) for i in range(n)])
        assert torch.allclose(together, alone)
    d = differences(rewards)
    assert torch.allclose(call("pairwise", d), torch.cat([call("pairwise", d[i:i + 1]) for i in range(n)]))


def test_every_registered_estimator_has_a_closed_form_test_here():
    tested = {"grpo", "dr_grpo", "rloo", "remax", "reinforce_pp_baseline", "pairwise", "pairwise_mean", "gae",
              "reinforce_pp"}
    assert set(ADVANTAGES.names()) == tested


TOKEN_REWARDS = torch.tensor([[0.5, 0.0, 1.0], [2.0, 7.0, 7.0]], dtype=torch.float64)   # row 1: one token, then padding
TOKEN_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_reinforce_pp_discounted_returns_whitened_over_valid_tokens():
    # gamma = 1: returns row 0: 1.5, 1, 1; row 1: 2 (padding rewards 7 ignored)
    # valid tokens 1.5, 1, 1, 2 -> mean 1.375; deviations .125, -.375, -.375, .625 -> var 0.6875 / 4 = 0.171875
    s = math.sqrt(0.171875)
    out = call("reinforce_pp", TOKEN_REWARDS, TOKEN_MASK, eps=0.0)
    assert_close(out, [[0.125 / s, -0.375 / s, -0.375 / s], [0.625 / s, 0.0, 0.0]])
    # gamma = 0.5: row 0: 0.5 + 0.5 * (0 + 0.5 * 1) = 0.75, 0.5, 1; row 1: 2 -> mean 4.25 / 4 = 1.0625
    # deviations -.3125, -.5625, -.0625, .9375 -> var 1.296875 / 4 = 0.32421875
    s = math.sqrt(0.32421875)
    out = call("reinforce_pp", TOKEN_REWARDS, TOKEN_MASK, gamma=0.5, eps=0.0)
    assert_close(out, [[-0.3125 / s, -0.5625 / s, -0.0625 / s], [0.9375 / s, 0.0, 0.0]])


def test_reinforce_pp_valid_tokens_have_zero_mean_and_unit_std():
    rewards = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 1, 3, 4])[:, None]).long()
    out = call("reinforce_pp", rewards, mask, gamma=0.9, eps=0.0)
    valid = out[mask.bool()]
    assert abs(valid.mean().item()) < 1e-12
    assert abs(valid.pow(2).mean().item() - 1.0) < 1e-12
    assert (out[~mask.bool()] == 0).all()


def test_estimate_passes_only_the_declared_inputs():
    everything = {"rewards": R, "baseline": torch.tensor([1.0, 5.0], dtype=torch.float64), "lengths": None,
                  "preferences": None, "token_rewards": TOKEN_REWARDS, "mask": TOKEN_MASK, "values": None}
    # grpo declares only rewards: the extra inputs (some None) are ignored; options are passed on
    assert_close(estimate("grpo", everything, eps=0.0), call("grpo", R, eps=0.0))
    # remax receives its keyword-only baseline from the inputs
    assert estimate("remax", everything).tolist() == [[0.0, -1.0, -1.0, 0.0], [-3.0, -1.0, 1.0, 3.0]]
    # token estimators get token_rewards and mask positionally
    assert_close(estimate("reinforce_pp", everything, gamma=0.5, eps=0.0),
                 call("reinforce_pp", TOKEN_REWARDS, TOKEN_MASK, gamma=0.5, eps=0.0))
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 7.0, 7.0]], dtype=torch.float64)
    advantages, returns = estimate("gae", {**everything, "values": values}, gamma=0.9, lam=0.5)
    expected = call("gae", TOKEN_REWARDS, values, TOKEN_MASK, gamma=0.9, lam=0.5)
    assert_close(advantages, expected[0])
    assert_close(returns, expected[1])


def test_estimate_names_a_missing_input():
    with pytest.raises(ValueError, match="baseline"):
        estimate("remax", {"rewards": R})
    with pytest.raises(ValueError, match="baseline"):
        estimate("remax", {"rewards": R, "baseline": None})   # None counts as not provided
    with pytest.raises(ValueError, match="values"):
        estimate("gae", {"token_rewards": TOKEN_REWARDS, "mask": TOKEN_MASK})
    with pytest.raises(KeyError, match="unknown advantage estimator"):
        estimate("no_such_estimator", {"rewards": R})
    with pytest.raises(TypeError, match="takes no option"):
        estimate("grpo", {"rewards": R}, gamma=0.5)


def test_every_estimator_declares_inputs_it_takes_and_a_known_output():
    for entry in ADVANTAGES:
        parameters = inspect.signature(entry.fn).parameters
        assert entry.meta["inputs"], entry.name
        assert set(entry.meta["inputs"]) <= set(parameters), entry.name
        assert entry.meta["output"] in OUTPUTS, entry.name



def _two_rank_sums():
    """batch_sum for two threads standing in for two ranks: an all-reduce made of a barrier."""
    barrier, slots = threading.Barrier(2), [None, None]

    def for_rank(rank):
        def batch_sum(values):
            slots[rank] = values.sum()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()   # both have read before the next call overwrites
            return total
        return batch_sum
    return for_rank


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_whole_batch_whitening_is_the_same_over_two_ranks(name):
    """Each half of the batch, whitened with sums over both halves, equals the whole batch whitened at once."""
    inputs = {"token_rewards": TOKEN_REWARDS, "mask": TOKEN_MASK, "rewards": R,
              "lengths": torch.tensor([[1.0, 2.0, 3.0, 1.0], [2.0, 2.0, 1.0, 3.0]], dtype=torch.float64)}
    whole = estimate(name, inputs)
    sums, parts = _two_rank_sums(), [None, None]

    def rank(i):
        parts[i] = estimate(name, {**{k: v[i:i + 1] for k, v in inputs.items()}, "batch_sum": sums(i)})

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert_close(torch.cat(parts), whole)
    assert not torch.equal(parts[0], estimate(name, {k: v[:1] for k, v in inputs.items()})), \
        "whitening one half alone differs: the test would catch a missing reduction"
