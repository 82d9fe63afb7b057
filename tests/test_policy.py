"""Policy-gradient terms (alignkit.algorithms.policy) against closed forms worked out by hand, their gradients,
and the micro-batching property of the aggregations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.algorithms.policy import (
    AGGREGATIONS,
    IMPORTANCE_RATIOS,
    KL_ESTIMATORS,
    Totals,
    clipped_surrogate,
    clipped_value_loss,
    overlong_penalty,
)

F64 = torch.float64

# Registry names this file tests by name; test_every_registered_name_is_tested_here compares them with the registries.
AGGREGATION_NAMES = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
KL_NAMES = {"k1", "k2", "k3"}
RATIO_NAMES = {"token", "sequence"}


def t(data, dtype=F64) -> torch.Tensor:
    return torch.tensor(data, dtype=dtype)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=F64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.double(), expected, atol=atol), (actual, expected)


def aggregate(name, values, mask, totals):
    return AGGREGATIONS.call(name, values, mask, totals)


def kl(name, logprobs, ref_logprobs):
    return KL_ESTIMATORS.call(name, logprobs, ref_logprobs)


def log_ratio(name, logprobs, old_logprobs, mask):
    return IMPORTANCE_RATIOS.call(name, logprobs, old_logprobs, mask)


# ---------------------------------------------------------------------------------------------------------------------
# clipped_surrogate: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
# ---------------------------------------------------------------------------------------------------------------------

RATIOS = [[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]]   # inside, above and below the clip range [0.8, 1.2]
ADV = [[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]   # row 0: A > 0; row 1: A < 0


def test_surrogate_both_branches_for_both_signs_of_the_advantage():
    lr = torch.log(t(RATIOS)).requires_grad_()
    terms = clipped_surrogate(lr, t(ADV), torch.ones(2, 3, dtype=F64))
    # A = +2: rho 1.1 -> -2.2 (inside);  rho 1.5 -> max(-3.0, -2.4) = -2.4 (clipped);  rho 0.5 -> max(-1.0, -1.6) = -1.0
    # A = -1: rho 1.1 -> 1.1 (inside);   rho 1.5 -> max(1.5, 1.2) = 1.5 (unclipped);   rho 0.5 -> max(0.5, 0.8) = 0.8
    assert_close(terms.loss, [[-2.2, -2.4, -1.0], [1.1, 1.5, 0.8]])
    assert terms.clipped.tolist() == [[False, True, False], [False, False, True]]
    assert not terms.dual_clipped.any()
    assert_close(terms.ratio, RATIOS)
    assert not terms.ratio.requires_grad
    # d(-A rho)/d log rho = -A rho on the unclipped branch, 0 where the clipped constant is taken
    terms.loss.sum().backward()
    assert_close(lr.grad, [[-2.2, 0.0, -1.0], [1.1, 1.5, 0.0]])


def test_surrogate_clip_higher_is_asymmetric():
    lr = torch.log(t([[1.25, 1.3, 0.85, 0.75]]))
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    terms = clipped_surrogate(lr, adv, torch.ones(1, 4, dtype=F64), clip_low=0.2, clip_high=0.28)
    # range [0.8, 1.28]: A = 1, rho 1.25 -> -1.25 (not clipped); rho 1.3 -> max(-1.3, -1.28) = -1.28 (clipped)
    # A = -1, rho 0.85 -> 0.85 (inside); rho 0.75 -> max(0.75, 0.8) = 0.8 (clipped at 1 - clip_low)
    assert_close(terms.loss, [[-1.25, -1.28, 0.85, 0.8]])
    assert terms.clipped.tolist() == [[False, True, False, True]]
    # the symmetric default clips rho = 1.25 at 1.2
    assert_close(clipped_surrogate(lr, adv, torch.ones(1, 4, dtype=F64)).loss, [[-1.2, -1.2, 0.85, 0.8]])


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    lr = torch.log(t([[10.0, 2.0, 0.5, 10.0, 10.0]])).requires_grad_()
    adv = t([[-2.0, -2.0, -2.0, 2.0, 0.0]])
    terms = clipped_surrogate(lr, adv, torch.ones(1, 5, dtype=F64), dual_clip=3.0)
    # A = -2, rho 10: PPO gives max(20, 2.4) = 20, dual clip bounds it by -c A = 3 * 2 = 6
    # A = -2, rho 2: max(4, 2.4) = 4 < 6 -> 4;   A = -2, rho 0.5: max(1, 1.6) = 1.6
    # A = +2, rho 10: -2.4, untouched (bound -c A = -6 would be lower);   A = 0: 0
    assert_close(terms.loss, [[6.0, 4.0, 1.6, -2.4, 0.0]])
    assert terms.dual_clipped.tolist() == [[True, False, False, False, False]]
    assert terms.clipped.tolist() == [[False, False, True, True, False]]
    terms.loss.sum().backward()
    # the bound -c A is constant in rho: no gradient; rho 2 unclipped: -A rho = 4
    assert_close(lr.grad, [[0.0, 4.0, 0.0, 0.0, 0.0]])
    # without dual clip the first token's loss is the plain PPO value
    assert_close(clipped_surrogate(lr.detach(), adv, torch.ones(1, 5, dtype=F64)).loss[0, 0], 20.0)


def test_surrogate_masked_positions_give_zero_loss_flags_and_gradient():
    lr = t([[0.1, 5.0, -5.0], [3.0, 30.0, -30.0]]).requires_grad_()
    adv = t([[1.0, -4.0, 4.0], [-1.0, -1.0, 1.0]])
    mask = t([[1, 0, 0], [0, 0, 0]])
    terms = clipped_surrogate(lr, adv, mask, dual_clip=3.0)
    assert_close(terms.loss, [[-math.exp(0.1), 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert not terms.clipped.any() and not terms.dual_clipped.any()
    terms.loss.sum().backward()
    assert_close(lr.grad, [[-math.exp(0.1), 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_surrogate_extreme_log_ratios_stay_finite():
    lr = t([[1000.0, -1000.0]]).requires_grad_()
    terms = clipped_surrogate(lr, t([[-1.0, 1.0]]), torch.ones(1, 2, dtype=F64))
    assert torch.isfinite(terms.loss).all() and torch.isfinite(terms.ratio).all()
    terms.loss.sum().backward()
    assert torch.isfinite(lr.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# importance ratios and their gradients
# ---------------------------------------------------------------------------------------------------------------------

def test_token_ratio_gradient_at_ratio_one_is_minus_the_advantage():
    old = t([[-1.0, -2.0, -0.3], [-0.7, -4.0, 9.0]])
    logprobs = old.clone().requires_grad_()
    adv = t([[0.5, -1.5, 2.0], [3.0, -0.25, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    terms = clipped_surrogate(log_ratio("token", logprobs, old, mask), adv, mask)
    assert_close(terms.ratio, torch.ones(2, 3))
    terms.loss.sum().backward()  # the per-token loss only depends on its own token: grad of the sum is per token
    assert_close(logprobs.grad, [[-0.5, 1.5, -2.0], [-3.0, 0.25, 0.0]])


def test_token_ratio_is_the_masked_per_token_log_ratio():
    mask = t([[1, 1, 0]])
    assert_close(log_ratio("token", t([[-1.0, -2.0, 3.0]]), t([[-1.5, -1.0, 0.0]]), mask), [[0.5, -1.0, 0.0]])


def test_sequence_ratio_value_is_the_length_normalised_sequence_ratio_at_every_token():
    logprobs, old = t([[-1.0, -2.0, 3.0], [-0.5, 1.0, 1.0]]), t([[-1.5, -1.0, 0.0], [-0.9, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # row 0: (0.5 - 1.0) / 2 = -0.25 on its two tokens; row 1: 0.4 on its one token; padding 0
    assert_close(log_ratio("sequence", logprobs, old, mask), [[-0.25, -0.25, 0.0], [0.4, 0.0, 0.0]])


# Three completions, |y| = 3, 2, 4, padding holds garbage. log pi - log pi_old per valid token:
#   row 0: 0.5, 0.1, 0.3        mean 0.3   -> s = e^0.3 = 1.35 > 1.2, A = +1: clipped (no gradient)
#   row 1: 0.1, -0.05           mean 0.025 -> s = 1.025, A = -0.5: unclipped
#   row 2: 0.05, 0.1, -0.2, 0.15 mean 0.025 -> s = 1.025, A = 2: unclipped
GSPO_OLD = [[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, 0.0, 0.0], [-2.0, -0.1, -0.6, -1.1]]
GSPO_DIFF = [[0.5, 0.1, 0.3, 4.0], [0.1, -0.05, -3.0, 2.0], [0.05, 0.1, -0.2, 0.15]]
GSPO_MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
GSPO_ADV = [1.0, -0.5, 2.0]


def gspo_objective(logprobs, old, mask, adv, eps=0.2):
    """GSPO computed directly: -(1/n) sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t(log pi - log pi_old))."""
    s = torch.exp(((logprobs - old) * mask).sum(1) / mask.sum(1))
    return -torch.minimum(s * adv, s.clamp(1 - eps, 1 + eps) * adv).mean()


def surrogate_loss(ratio_name, logprobs, old, mask, adv_per_sequence, aggregation="seq-mean-token-mean"):
    adv = adv_per_sequence[:, None].expand_as(logprobs)
    terms = clipped_surrogate(log_ratio(ratio_name, logprobs, old, mask), adv, mask)
    return aggregate(aggregation, terms.loss, mask, Totals.of(mask, logprobs.shape[1])), terms


def test_sequence_ratio_gradient_equals_gspo():
    old, mask, adv = t(GSPO_OLD), t(GSPO_MASK), t(GSPO_ADV)
    ours_lp = (old + t(GSPO_DIFF)).requires_grad_()
    gspo_lp = ours_lp.detach().clone().requires_grad_()
    ours, terms = surrogate_loss("sequence", ours_lp, old, mask, adv)
    gspo = gspo_objective(gspo_lp, old, mask, adv)
    ours.backward()
    gspo.backward()
    assert torch.allclose(ours, gspo)
    assert_close(ours_lp.grad, gspo_lp.grad, atol=1e-12)
    assert terms.clipped[0, :3].all() and not terms.clipped[1:].any()
    # hand check: clipped row 0 has no gradient; row 2: -(1/3) A s / |y| = -(1/3) * 2 * e^0.025 / 4 on each token
    assert_close(ours_lp.grad[0], [0.0] * 4)
    assert_close(ours_lp.grad[2], [-2 * math.exp(0.025) / 12] * 4)
    assert_close(ours_lp.grad[1], [0.5 * math.exp(0.025) / 6] * 2 + [0.0, 0.0])
    # the token ratio gives another gradient on these inputs (row 0's token with diff 0.1 is not clipped)
    token_lp = ours_lp.detach().clone().requires_grad_()
    surrogate_loss("token", token_lp, old, mask, adv)[0].backward()
    assert not torch.allclose(token_lp.grad, gspo_lp.grad)


def test_sequence_ratio_token_form_gradient_uses_each_tokens_advantage():
    """GSPO-token: d loss_i,t / d log pi(y_t) = -s_i A_i,t (unclipped), not the sequence mean of the advantages."""
    old = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    logprobs = (old + t([[0.1, -0.1, 0.0], [0.05, 0.0, 0.0]])).requires_grad_()
    mask = t([[1, 1, 1], [1, 0, 0]])
    adv = t([[1.0, -2.0, 0.5], [3.0, 9.0, 9.0]])
    terms = clipped_surrogate(log_ratio("sequence", logprobs, old, mask), adv, mask)
    # row 0: s = e^((0.1 - 0.1 + 0) / 3) = 1 at each token; row 1: s = e^0.05 on its one token
    assert_close(terms.ratio, [[1.0, 1.0, 1.0], [math.exp(0.05), 1.0, 1.0]])
    terms.loss.sum().backward()
    assert_close(logprobs.grad, [[-1.0, 2.0, -0.5], [-3 * math.exp(0.05), 0.0, 0.0]])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_sequence_ratio_gradient_equals_gspo_on_random_inputs(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)
    old = -torch.rand(n, length, generator=g, dtype=F64) * 3
    logprobs = (old + 0.4 * torch.randn(n, length, generator=g, dtype=F64)).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=F64)
    direct = logprobs.detach().clone().requires_grad_()
    ours = surrogate_loss("sequence", logprobs, old, mask, adv)[0]
    gspo = gspo_objective(direct, old, mask, adv)
    ours.backward()
    gspo.backward()
    assert torch.allclose(ours, gspo)
    assert torch.allclose(logprobs.grad, direct.grad, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators, u = log pi_ref - log pi
# ---------------------------------------------------------------------------------------------------------------------

KL_LOGP = [-1.0, -2.0, -0.5]
KL_REF = [-1.5, -1.0, -0.5]   # u = -0.5, 1.0, 0.0


def test_kl_estimators_closed_forms():
    logp, ref = t(KL_LOGP), t(KL_REF)
    assert_close(kl("k1", logp, ref), [0.5, -1.0, 0.0])                                      # -u
    assert_close(kl("k2", logp, ref), [0.125, 0.5, 0.0])                                     # u^2 / 2
    assert_close(kl("k3", logp, ref), [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])            # e^u - u - 1


def test_kl_gradients_wrt_the_policy_logprobs():
    logp = t(KL_LOGP).requires_grad_()
    ref = t(KL_REF)
    grads = {}
    for name in ("k1", "k2", "k3"):
        grads[name] = torch.autograd.grad(kl(name, logp, ref).sum(), logp)[0]
    assert_close(grads["k1"], [1.0, 1.0, 1.0])                                       # d(-u)/dlogp = 1
    assert_close(grads["k2"], [0.5, -1.0, 0.0])                                      # -u
    assert_close(grads["k3"], [1 - math.exp(-0.5), 1 - math.e, 0.0])                 # 1 - e^u


def test_k3_is_non_negative_and_clamped():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(200, generator=g, dtype=F64) * 4, torch.randn(200, generator=g, dtype=F64) * 4
    k3 = kl("k3", logp, ref)
    assert (k3 >= 0).all() and (k3 <= 10.0).all()
    # u = 3: e^3 - 4 = 16.09 -> 10;  u = -5: e^-5 + 4 = 4.0067 (below the value clamp);  u = +-1000: 10
    u = t([3.0, -5.0, 1000.0, -1000.0])
    logp = torch.zeros(4, dtype=F64, requires_grad=True)
    k3 = kl("k3", logp, u)
    assert_close(k3, [10.0, math.exp(-5) + 4.0, 10.0, 10.0])
    # the clamp of u to +-20 keeps e^u finite, so the gradient is 0 (not nan) where the value clamp is active
    k3.sum().backward()
    assert_close(logp.grad, [0.0, 1 - math.exp(-5), 0.0, 0.0])


def test_k1_and_k3_are_unbiased_for_the_kl_under_the_policy():
    # E_{y ~ pi}[k(y)] = KL(pi || pi_ref) for k1 and k3 (E[e^u] = sum pi_ref = 1); k2 is biased
    pi = torch.log_softmax(t([0.3, -1.0, 2.0, 0.5]), 0)
    ref = torch.log_softmax(t([1.0, 0.2, -0.5, 0.0]), 0)
    exact = (pi.exp() * (pi - ref)).sum()
    for name in ("k1", "k3"):
        assert torch.allclose((pi.exp() * kl(name, pi, ref)).sum(), exact)
    assert not torch.allclose((pi.exp() * kl("k2", pi, ref)).sum(), exact)


# ---------------------------------------------------------------------------------------------------------------------
# value loss and overlong penalty
# ---------------------------------------------------------------------------------------------------------------------

def test_clipped_value_loss_takes_the_larger_branch():
    values = t([1.0, 1.0, 0.6, 0.4]).requires_grad_()
    old = t([0.5, 0.5, 0.5, 0.5])
    returns = t([2.0, 0.0, 2.0, 2.0])
    loss = clipped_value_loss(values, old, returns, clip=0.2)
    # V=1, R=2: (V-R)^2 = 1, clipped V 0.7: 1.69 -> 0.845 (clipped branch)
    # V=1, R=0: 1 vs 0.7^2 = 0.49 -> 0.5 (unclipped branch)
    # V=0.6 inside [0.3, 0.7]: 1.4^2 / 2 = 0.98;  V=0.4 inside: 1.6^2 / 2 = 1.28
    assert_close(loss, [0.845, 0.5, 0.98, 1.28])
    loss.sum().backward()
    # clipped branch is constant in V; otherwise d/dV (V-R)^2/2 = V - R
    assert_close(values.grad, [0.0, 1.0, -1.4, -1.6])


def test_value_loss_without_clip_is_half_the_squared_error():
    values, old, returns = t([1.0, 1.0, -3.0]), t([0.5, 0.5, 0.0]), t([2.0, 0.0, 1.0])
    assert_close(clipped_value_loss(values, old, returns, clip=None), [0.5, 0.5, 8.0])


def test_overlong_penalty_below_inside_and_at_the_end_of_the_buffer():
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 25])
    # max_length 20, buffer 4: 0 up to 16, then (16 - L) / 4, -1 from 20 on
    assert_close(overlong_penalty(lengths, 20, 4), [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


# ---------------------------------------------------------------------------------------------------------------------
# aggregations
# ---------------------------------------------------------------------------------------------------------------------

AGG_VALUES = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 70.0, 80.0], [9.0, 100.0, 110.0, 120.0]]
AGG_MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
AGG_MAX_LENGTH = 5


def test_totals_count_tokens_and_non_empty_sequences():
    assert Totals.of(t(AGG_MASK), AGG_MAX_LENGTH) == Totals(7, 3, 5)
    assert Totals.of(t([[1, 1, 0], [0, 0, 0]]), 3) == Totals(2, 1, 3)


def test_aggregations_closed_forms():
    values, mask = t(AGG_VALUES), t(AGG_MASK)
    totals = Totals.of(mask, AGG_MAX_LENGTH)
    # valid tokens 1+2+3+4 + 5+6 + 9 = 30 over 7 tokens
    assert_close(aggregate("token-mean", values, mask, totals), 30 / 7)
    # row means 2.5, 5.5, 9 -> 17 / 3
    assert_close(aggregate("seq-mean-token-mean", values, mask, totals), 17 / 3)
    # 30 / (3 sequences x L_max 5)
    assert_close(aggregate("seq-mean-token-sum-norm", values, mask, totals), 2.0)


def test_aggregations_accept_a_boolean_mask():
    values, mask = t(AGG_VALUES), t(AGG_MASK)
    totals = Totals.of(mask, AGG_MAX_LENGTH)
    for name in sorted(AGGREGATION_NAMES):
        assert torch.allclose(aggregate(name, values, mask.bool(), totals), aggregate(name, values, mask, totals))


def split_rows(n: int, sizes: list[int]) -> list[slice]:
    assert sum(sizes) == n
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def full_and_accumulated(aggregation, ratio_name, logprobs, old, adv, mask, max_length, slices):
    """(full value, full grad, summed micro-batch value, accumulated micro-batch grad) of the policy loss."""
    totals = Totals.of(mask, max_length)

    def loss(lp, rows):
        lr = log_ratio(ratio_name, lp, old[rows], mask[rows])
        terms = clipped_surrogate(lr, adv[rows], mask[rows], clip_high=0.28, dual_clip=3.0)
        return aggregate(aggregation, terms.loss, mask[rows], totals)

    full_lp = logprobs.detach().clone().requires_grad_()
    full = loss(full_lp, slice(None))
    full.backward()
    micro_lp = logprobs.detach().clone().requires_grad_()
    total = torch.zeros((), dtype=F64)
    for rows in slices:
        part = loss(micro_lp[rows], rows)
        part.backward()
        total = total + part.detach()
    return full.detach(), full_lp.grad, total, micro_lp.grad


def random_batch(g, n, length, allow_empty=True):
    lengths = torch.randint(0 if allow_empty else 1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)
    old = -torch.rand(n, length, generator=g, dtype=F64) * 3
    logprobs = old + 0.3 * torch.randn(n, length, generator=g, dtype=F64)
    adv = torch.randn(n, length, generator=g, dtype=F64)
    return logprobs, old, adv, mask


@pytest.mark.parametrize("aggregation", sorted(AGGREGATION_NAMES))
@pytest.mark.parametrize("sizes", [[1, 1, 1], [2, 1], [1, 2]], ids=["ones", "two-one", "one-two"])
def test_micro_batches_sum_to_the_mini_batch_on_the_fixed_example(aggregation, sizes):
    values, mask = t(AGG_VALUES), t(AGG_MASK)
    totals = Totals.of(mask, AGG_MAX_LENGTH)
    full_values = values.clone().requires_grad_()
    full = aggregate(aggregation, full_values, mask, totals)
    full.backward()
    micro_values = values.clone().requires_grad_()
    parts = []
    for rows in split_rows(3, sizes):
        part = aggregate(aggregation, micro_values[rows], mask[rows], totals)
        part.backward()
        parts.append(part.detach())
    assert torch.allclose(sum(parts), full)
    assert torch.allclose(micro_values.grad, full_values.grad)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATION_NAMES))
def test_micro_batch_totals_are_needed_for_the_property(aggregation):
    """Dividing by each micro-batch's own totals breaks the sum on this ragged example (the property is not free)."""
    values, mask = t(AGG_VALUES), t(AGG_MASK)
    full = aggregate(aggregation, values, mask, Totals.of(mask, AGG_MAX_LENGTH))
    local = sum(aggregate(aggregation, values[rows], mask[rows], Totals.of(mask[rows], AGG_MAX_LENGTH))
                for rows in split_rows(3, [1, 2]))
    assert not torch.allclose(local, full)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_micro_batching_gives_the_mini_batch_value_and_gradient(data):
    n = data.draw(st.integers(1, 6), label="rows")
    length = data.draw(st.integers(1, 6), label="length")
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1), label="cuts")) if n > 1 else []
    seed = data.draw(st.integers(0, 10_000), label="seed")
    max_length = length + data.draw(st.integers(0, 3), label="extra")
    g = torch.Generator().manual_seed(seed)
    logprobs, old, adv, mask = random_batch(g, n, length)
    bounds = [0, *cuts, n]
    slices = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    for aggregation in sorted(AGGREGATION_NAMES):
        for ratio_name in sorted(RATIO_NAMES):
            full, full_grad, total, micro_grad = full_and_accumulated(
                aggregation, ratio_name, logprobs, old, adv, mask, max_length, slices)
            assert torch.allclose(total, full, atol=1e-12), (aggregation, ratio_name)
            assert torch.allclose(micro_grad, full_grad, atol=1e-12), (aggregation, ratio_name)


# ---------------------------------------------------------------------------------------------------------------------
# registry coverage
# ---------------------------------------------------------------------------------------------------------------------

def test_every_registered_name_is_tested_here():
    assert set(AGGREGATIONS.names()) == AGGREGATION_NAMES
    assert set(KL_ESTIMATORS.names()) == KL_NAMES
    assert set(IMPORTANCE_RATIOS.names()) == RATIO_NAMES
