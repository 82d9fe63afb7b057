"""Tests for the loss functions in alignkit.algorithms.

Closed-form values are recomputed here with plain `math` on Python floats, written from the
formulas in the shared algorithm reference (section 8 "DPO family" and section 4 "R3M"), never
by calling the library.  A coverage test makes sure every registered loss has such a case.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.algorithms import (
    PREFERENCE_LOSSES,
    UNPAIRED_LOSSES,
    kto_reference_point,
    needs_reference,
    preference_loss,
    r3m_delta,
    sft_loss,
    unpaired_loss,
)

TIGHT = {"rel": 1e-9, "abs": 1e-12}


# --------------------------------------------------------------------------------------------
# Plain-float helpers (independent of torch / the library)
# --------------------------------------------------------------------------------------------


def logsig(t: float) -> float:
    """log(sigmoid(t)), stable for both signs."""
    if t >= 0:
        return -math.log1p(math.exp(-t))
    return t - math.log1p(math.exp(t))


def sig(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def log_odds(avg_logp: float) -> float:
    p = math.exp(avg_logp)
    return math.log(p / (1.0 - p))


# --------------------------------------------------------------------------------------------
# Hand-made paired batch
# --------------------------------------------------------------------------------------------

CHOSEN = [-3.0, -4.5, -7.25]
REJECTED = [-4.5, -3.0, -9.0]
REF_CHOSEN = [-3.5, -4.0, -8.0]
REF_REJECTED = [-4.0, -3.25, -8.5]
LEN_CHOSEN = [3, 5, 8]
LEN_REJECTED = [4, 2, 6]
# h_w = [0.5, -0.5, 0.75], h_l = [-0.5, 0.25, -0.5], margin = [1.0, -0.75, 1.25]


def rows() -> list[dict[str, float]]:
    out = []
    for i in range(len(CHOSEN)):
        hw = CHOSEN[i] - REF_CHOSEN[i]
        hl = REJECTED[i] - REF_REJECTED[i]
        out.append({
            "i": i, "pw": CHOSEN[i], "pl": REJECTED[i], "hw": hw, "hl": hl, "m": hw - hl,
            "lw": float(LEN_CHOSEN[i]), "ll": float(LEN_REJECTED[i]),
        })
    return out


def paired_tensors(dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {
        "chosen_logps": torch.tensor(CHOSEN, dtype=dtype),
        "rejected_logps": torch.tensor(REJECTED, dtype=dtype),
        "ref_chosen_logps": torch.tensor(REF_CHOSEN, dtype=dtype),
        "ref_rejected_logps": torch.tensor(REF_REJECTED, dtype=dtype),
        "chosen_lengths": torch.tensor(LEN_CHOSEN),
        "rejected_lengths": torch.tensor(LEN_REJECTED),
    }


# Closed forms -------------------------------------------------------------------------------


def f_dpo(r, beta):
    return -logsig(beta * r["m"])


def f_ipo(r, beta):
    margin = r["hw"] / r["lw"] - r["hl"] / r["ll"]
    return (margin - 1.0 / (2.0 * beta)) ** 2


def f_cdpo(r, beta, eps):
    z = beta * r["m"]
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def f_rdpo(r, beta, eps):
    z = beta * r["m"]
    return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)


def f_hinge(r, beta):
    return max(0.0, 1.0 - beta * r["m"])


def f_simpo(r, beta, gamma):
    return -logsig(beta / r["lw"] * r["pw"] - beta / r["ll"] * r["pl"] - gamma)


def f_orpo(r, lam):
    avg_w, avg_l = r["pw"] / r["lw"], r["pl"] / r["ll"]
    return -avg_w - lam * logsig(log_odds(avg_w) - log_odds(avg_l))


def f_nca(r, beta):
    rw, rl = beta * r["hw"], beta * r["hl"]
    return -logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl)


def f_bco(r, beta, delta):
    rw, rl = beta * r["hw"], beta * r["hl"]
    return -logsig(rw - delta) - logsig(-(rl - delta))


def f_nll(r):
    return -r["pw"] / r["lw"]


def f_rpo(r, beta, eta):
    return f_dpo(r, beta) + eta * f_nll(r)


def f_r3m_delta(r, beta, lam):
    return max(math.log(1.0 / lam - 1.0) - beta * r["m"], 0.0)


def f_r3m(r, beta, lam, delta=None):
    d = f_r3m_delta(r, beta, lam) if delta is None else delta[r["i"]]
    return -logsig(beta * r["m"] + d) + lam * abs(d)


EXPLICIT_DELTA = [0.0, 0.3, -0.2]

# (case id, loss name, config, closed form of one row)
PREFERENCE_CASES = [
    ("dpo", "dpo", {"beta": 0.5}, lambda r: f_dpo(r, 0.5)),
    ("dpo-default-beta", "dpo", {}, lambda r: f_dpo(r, 0.1)),
    ("ipo", "ipo", {"beta": 0.25}, lambda r: f_ipo(r, 0.25)),
    ("ipo-tau-alias", "ipo", {"tau": 0.4}, lambda r: f_ipo(r, 0.4)),
    ("cdpo", "cdpo", {"beta": 0.5, "label_smoothing": 0.2}, lambda r: f_cdpo(r, 0.5, 0.2)),
    ("rdpo", "rdpo", {"beta": 0.5, "label_smoothing": 0.2}, lambda r: f_rdpo(r, 0.5, 0.2)),
    ("rdpo-eps0-is-dpo", "rdpo", {"beta": 0.5, "label_smoothing": 0.0}, lambda r: f_dpo(r, 0.5)),
    # beta=0.9 puts example 0 (1 - 0.9) and example 2 (1 - 1.125) on both sides of the hinge
    ("hinge", "hinge", {"beta": 0.9}, lambda r: f_hinge(r, 0.9)),
    ("simpo", "simpo", {"beta": 2.5, "gamma": 0.3}, lambda r: f_simpo(r, 2.5, 0.3)),
    ("orpo", "orpo", {"lam": 0.2}, lambda r: f_orpo(r, 0.2)),
    ("orpo-lambda-alias", "orpo", {"lambda": 0.3}, lambda r: f_orpo(r, 0.3)),
    ("orpo-default-lambda", "orpo", {}, lambda r: f_orpo(r, 0.1)),
    ("nca", "nca", {"beta": 0.5}, lambda r: f_nca(r, 0.5)),
    ("bco", "bco", {"beta": 0.5, "delta": 0.15}, lambda r: f_bco(r, 0.5, 0.15)),
    ("bco-tensor-delta", "bco", {"beta": 0.5, "delta": torch.tensor(-0.1, dtype=torch.float64)},
     lambda r: f_bco(r, 0.5, -0.1)),
    ("nll", "nll", {}, f_nll),
    ("rpo", "rpo", {"beta": 0.5, "eta": 0.25}, lambda r: f_rpo(r, 0.5, 0.25)),
    ("rpo-defaults", "rpo", {}, lambda r: f_rpo(r, 0.01, 0.005)),
    # lam=0.75, beta=2: log(1/3) - 2*m -> delta 0 for m=1.0 and 1.25, positive (0.4014) for m=-0.75
    ("r3m-mixed", "r3m_dpo", {"beta": 2.0, "lam": 0.75}, lambda r: f_r3m(r, 2.0, 0.75)),
    # lam=0.9, beta=2: every delta is 0 -> plain DPO with beta=2
    ("r3m-delta-zero", "r3m_dpo", {"beta": 2.0, "lam": 0.9}, lambda r: f_dpo(r, 2.0)),
    # lam=0.3, beta=0.1: log(7/3) = 0.847 > 0.1*|m| -> every delta positive
    ("r3m-delta-positive", "r3m_dpo", {"beta": 0.1, **{"lambda": 0.3}}, lambda r: f_r3m(r, 0.1, 0.3)),
    ("r3m-explicit-delta", "r3m_dpo",
     {"beta": 0.5, "lam": 0.6, "delta": torch.tensor(EXPLICIT_DELTA, dtype=torch.float64)},
     lambda r: f_r3m(r, 0.5, 0.6, EXPLICIT_DELTA)),
    ("mix", "mix", {"weights": {"dpo": 1.0, "nll": 0.25, "orpo": 0.5}, "beta": 0.5, "lambda": 0.3},
     lambda r: f_dpo(r, 0.5) + 0.25 * f_nll(r) + 0.5 * f_orpo(r, 0.3)),
]


@pytest.mark.parametrize(("name", "config", "expected"),
                         [c[1:] for c in PREFERENCE_CASES], ids=[c[0] for c in PREFERENCE_CASES])
def test_preference_closed_form(name, config, expected):
    got = preference_loss(name, **paired_tensors(), **config)
    want = [expected(r) for r in rows()]
    assert got.shape == (len(want),)
    assert got.tolist() == pytest.approx(want, **TIGHT)


def test_preference_closed_form_float32():
    got = preference_loss("dpo", **paired_tensors(torch.float32), beta=0.5)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([f_dpo(r, 0.5) for r in rows()], rel=1e-6)


def test_r3m_cases_hit_both_delta_regimes():
    """The r3m closed-form cases really exercise delta == 0 and delta > 0."""
    mixed = [f_r3m_delta(r, 2.0, 0.75) for r in rows()]
    assert mixed[1] > 0 and mixed[0] == 0 and mixed[2] == 0
    assert all(f_r3m_delta(r, 2.0, 0.9) == 0 for r in rows())
    assert all(f_r3m_delta(r, 0.1, 0.3) > 0 for r in rows())


@pytest.mark.parametrize(("beta", "lam"), [(2.0, 0.75), (0.1, 0.3), (2.0, 0.9)])
def test_r3m_delta_closed_form(beta, lam):
    margin = torch.tensor([r["m"] for r in rows()], dtype=torch.float64, requires_grad=True)
    got = r3m_delta(margin, beta=beta, lam=lam)
    assert not got.requires_grad
    assert got.tolist() == pytest.approx([f_r3m_delta(r, beta, lam) for r in rows()], **TIGHT)


def test_r3m_dpo_delta_is_stop_grad():
    """d loss / d margin = -beta * sigmoid(-(beta*m + delta)): delta contributes no gradient."""
    beta, lam = 2.0, 0.75
    t = paired_tensors()
    chosen = t.pop("chosen_logps").requires_grad_()
    preference_loss("r3m_dpo", chosen_logps=chosen, **t, beta=beta, lam=lam).sum().backward()
    want = [-beta * sig(-(beta * r["m"] + f_r3m_delta(r, beta, lam))) for r in rows()]
    assert chosen.grad.tolist() == pytest.approx(want, **TIGHT)


# --------------------------------------------------------------------------------------------
# Unpaired losses
# --------------------------------------------------------------------------------------------

U_LOGPS = [-3.0, -4.5, -6.0, -2.25]
U_REF = [-3.5, -4.0, -6.75, -2.0]
U_LABELS = [True, False, True, False]


def u_rows():
    return [{"h": lp - ref, "y": y} for lp, ref, y in zip(U_LOGPS, U_REF, U_LABELS, strict=True)]


def f_kto(r, beta, wd, wu, z0):
    if r["y"]:
        return wd * (1 - sig(beta * (r["h"] - z0)))
    return wu * (1 - sig(beta * (z0 - r["h"])))


def f_ubco(r, beta, delta):
    reward = beta * r["h"]
    return -logsig(reward - delta) if r["y"] else -logsig(-(reward - delta))


UNPAIRED_CASES = [
    ("kto", "kto", {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.5,
                    "reference_point": 0.3},
     lambda r: f_kto(r, 0.5, 1.0, 1.5, 0.3)),
    ("kto-tensor-z0", "kto", {"beta": 2.0, "desirable_weight": 0.75, "undesirable_weight": 1.25,
                              "reference_point": torch.tensor(0.2, dtype=torch.float64)},
     lambda r: f_kto(r, 2.0, 0.75, 1.25, 0.2)),
    ("kto-defaults", "kto", {}, lambda r: f_kto(r, 0.1, 1.0, 1.0, 0.0)),
    ("bco", "bco", {"beta": 0.5, "delta": 0.2}, lambda r: f_ubco(r, 0.5, 0.2)),
    ("bco-negative-delta", "bco", {"beta": 2.0, "delta": -0.35}, lambda r: f_ubco(r, 2.0, -0.35)),
]


@pytest.mark.parametrize(("name", "config", "expected"),
                         [c[1:] for c in UNPAIRED_CASES], ids=[c[0] for c in UNPAIRED_CASES])
@pytest.mark.parametrize("label_dtype", [torch.bool, torch.long])
def test_unpaired_closed_form(name, config, expected, label_dtype):
    got = unpaired_loss(
        name,
        logps=torch.tensor(U_LOGPS, dtype=torch.float64),
        ref_logps=torch.tensor(U_REF, dtype=torch.float64),
        labels=torch.tensor(U_LABELS).to(label_dtype),
        **config,
    )
    want = [expected(r) for r in u_rows()]
    assert got.shape == (len(want),)
    assert got.tolist() == pytest.approx(want, **TIGHT)


def test_kto_weights_keep_float64_precision():
    got = unpaired_loss("kto", logps=torch.tensor(U_LOGPS, dtype=torch.float64),
                        ref_logps=torch.tensor(U_REF, dtype=torch.float64),
                        labels=torch.tensor(U_LABELS), beta=2.0, desirable_weight=1.1,
                        undesirable_weight=0.8, reference_point=0.2)
    want = [f_kto(r, 2.0, 1.1, 0.8, 0.2) for r in u_rows()]
    assert got.tolist() == pytest.approx(want, **TIGHT)


@pytest.mark.parametrize(
    ("logps", "ref", "want"),
    [
        ([-3.0, -4.0, -5.0], [-3.5, -4.1, -5.3], (0.5 + 0.1 + 0.3) / 3),  # positive mean
        ([-3.0, -4.0, -5.0], [-2.5, -4.1, -4.7], 0.0),  # mean (-0.5+0.1-0.3)/3 < 0 -> clamped
    ],
)
def test_kto_reference_point(logps, ref, want):
    lp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    z0 = kto_reference_point(lp, torch.tensor(ref, dtype=torch.float64))
    assert z0.shape == ()
    assert z0.item() == pytest.approx(want, **TIGHT)
    assert not z0.requires_grad and z0.grad_fn is None


def test_kto_reference_point_feeds_kto_without_gradient():
    lp = torch.tensor([-3.0, -4.0], dtype=torch.float64, requires_grad=True)
    z0 = kto_reference_point(lp, torch.tensor([-3.5, -4.5], dtype=torch.float64))
    loss = unpaired_loss("kto", logps=lp, ref_logps=torch.tensor([-3.25, -3.0], dtype=torch.float64),
                         labels=torch.tensor([True, False]), beta=1.0, reference_point=z0)
    loss.sum().backward()
    # gradient from the kto value only: d/dh [1 - sig(b(h - z0))] = -b sig'(.), etc.
    h = [0.25, -1.0]
    s0, s1 = sig(h[0] - 0.5), sig(0.5 - h[1])
    assert lp.grad.tolist() == pytest.approx([-s0 * (1 - s0), s1 * (1 - s1)], **TIGHT)


# --------------------------------------------------------------------------------------------
# Coverage: every registered loss has a closed-form case
# --------------------------------------------------------------------------------------------


def test_every_preference_loss_has_closed_form_case():
    assert {c[1] for c in PREFERENCE_CASES} == set(PREFERENCE_LOSSES.names())


def test_every_unpaired_loss_has_closed_form_case():
    assert {c[1] for c in UNPAIRED_CASES} == set(UNPAIRED_LOSSES.names())


# --------------------------------------------------------------------------------------------
# Gradient accumulation over micro-batches equals the full-batch gradient
# --------------------------------------------------------------------------------------------

PREFERENCE_GRAD_CONFIGS = {
    "dpo": {"beta": 0.7},
    "ipo": {"beta": 0.3},
    "cdpo": {"beta": 0.7, "label_smoothing": 0.15},
    "rdpo": {"beta": 0.7, "label_smoothing": 0.15},
    "hinge": {"beta": 0.3},
    "simpo": {"beta": 2.0, "gamma": 0.5},
    "orpo": {"lam": 0.4},
    "nca": {"beta": 0.7},
    "bco": {"beta": 0.7, "delta": 0.2},  # running mean fixed for the step
    "nll": {},
    "rpo": {"beta": 0.5, "eta": 0.3},
    "r3m_dpo": {"beta": 0.5, "lam": 0.6},  # per-pair delta computed inside each micro-batch
    "mix": {"weights": {"dpo": 1.0, "simpo": 0.5, "nll": 0.2}, "beta": 0.8},
}
UNPAIRED_GRAD_CONFIGS = {
    "kto": {"beta": 0.8, "desirable_weight": 1.0, "undesirable_weight": 1.4,
            "reference_point": torch.tensor(0.25, dtype=torch.float64)},
    "bco": {"beta": 0.8, "delta": 0.1},
}


def test_grad_configs_cover_registries():
    assert set(PREFERENCE_GRAD_CONFIGS) == set(PREFERENCE_LOSSES.names())
    assert set(UNPAIRED_GRAD_CONFIGS) == set(UNPAIRED_LOSSES.names())


def slices(n: int, m: int) -> list[slice]:
    return [slice(s, min(s + m, n)) for s in range(0, n, m)]


logp_value = st.floats(-30.0, -0.5, allow_nan=False, allow_infinity=False)


@st.composite
def paired_batch(draw):
    n = draw(st.integers(2, 12))
    m = draw(st.integers(1, n))
    col = lambda: torch.tensor(draw(st.lists(logp_value, min_size=n, max_size=n)), dtype=torch.float64)
    lens = lambda: torch.tensor(draw(st.lists(st.integers(1, 20), min_size=n, max_size=n)))
    return n, m, col(), col(), col(), col(), lens(), lens()


@st.composite
def unpaired_batch(draw):
    n = draw(st.integers(2, 12))
    m = draw(st.integers(1, n))
    col = lambda: torch.tensor(draw(st.lists(logp_value, min_size=n, max_size=n)), dtype=torch.float64)
    labels = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return n, m, col(), col(), labels


def assert_grads_equal(full, accum):
    for a, b in zip(full, accum, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PREFERENCE_GRAD_CONFIGS))
@settings(max_examples=20, deadline=None)
@given(batch=paired_batch())
def test_preference_grad_accumulation(name, batch):
    n, m, lp_w, lp_l, ref_w, ref_l, len_w, len_l = batch
    config = PREFERENCE_GRAD_CONFIGS[name]
    chosen = lp_w.clone().requires_grad_()
    rejected = lp_l.clone().requires_grad_()

    def losses(sl):
        return preference_loss(
            name, chosen_logps=chosen[sl], rejected_logps=rejected[sl],
            ref_chosen_logps=ref_w[sl], ref_rejected_logps=ref_l[sl],
            chosen_lengths=len_w[sl], rejected_lengths=len_l[sl], **config)

    full = [g if g is not None else torch.zeros_like(x) for g, x in zip(
        torch.autograd.grad(losses(slice(None)).mean(), (chosen, rejected), allow_unused=True),
        (chosen, rejected), strict=True)]
    accum = [torch.zeros_like(chosen), torch.zeros_like(rejected)]
    for sl in slices(n, m):
        g = torch.autograd.grad(losses(sl).sum() / n, (chosen, rejected), allow_unused=True)
        for acc, gi in zip(accum, g, strict=True):
            if gi is not None:
                acc += gi
    assert_grads_equal(full, accum)


@pytest.mark.parametrize("name", sorted(UNPAIRED_GRAD_CONFIGS))
@settings(max_examples=25, deadline=None)
@given(batch=unpaired_batch())
def test_unpaired_grad_accumulation(name, batch):
    n, m, lp, ref, labels = batch
    config = UNPAIRED_GRAD_CONFIGS[name]
    logps = lp.clone().requires_grad_()

    def losses(sl):
        return unpaired_loss(name, logps=logps[sl], ref_logps=ref[sl], labels=labels[sl], **config)

    (full,) = torch.autograd.grad(losses(slice(None)).mean(), logps)
    accum = torch.zeros_like(logps)
    for sl in slices(n, m):
        accum += torch.autograd.grad(losses(sl).sum() / n, logps)[0]
    assert_grads_equal([full], [accum])


# SFT: token-weighted accumulation -------------------------------------------------------------


def sft_inputs(lengths: list[int], seed: int = 0):
    t_max = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    token_logps = (-5 * torch.rand(len(lengths), t_max, generator=gen, dtype=torch.float64))
    mask = (torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)
    return token_logps.requires_grad_(), mask


def sft_full_grad(token_logps, mask):
    total = mask.sum()
    return torch.autograd.grad(sft_loss(token_logps, mask) / total, token_logps)[0]


def sft_accumulated_grad(token_logps, mask, m):
    total = mask.sum()  # token count of the whole optimizer step
    acc = torch.zeros_like(token_logps)
    for sl in slices(token_logps.shape[0], m):
        acc += torch.autograd.grad(sft_loss(token_logps[sl], mask[sl]) / total, token_logps)[0]
    return acc


def sft_naive_grad(token_logps, mask, m):
    """Per-micro-batch token mean, then the mean over micro-batches (the classic bug)."""
    parts = slices(token_logps.shape[0], m)
    acc = torch.zeros_like(token_logps)
    for sl in parts:
        mb_loss = sft_loss(token_logps[sl], mask[sl]) / mask[sl].sum()
        acc += torch.autograd.grad(mb_loss / len(parts), token_logps)[0]
    return acc


def test_sft_loss_closed_form():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    assert sft_loss(token_logps, mask).item() == pytest.approx(1.0 + 2.0 + 0.5 + 0.25 + 9.0, **TIGHT)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sft_grad_accumulation_token_weighted(data):
    n = data.draw(st.integers(2, 12))
    m = data.draw(st.integers(1, n))
    lengths = data.draw(st.lists(st.integers(1, 16), min_size=n, max_size=n))
    token_logps, mask = sft_inputs(lengths, seed=data.draw(st.integers(0, 10_000)))
    full = sft_full_grad(token_logps, mask)
    torch.testing.assert_close(sft_accumulated_grad(token_logps, mask, m), full, rtol=1e-12, atol=1e-15)
    # padding positions get no gradient
    assert torch.all(full[mask == 0] == 0)

    # naive per-micro-batch normalisation matches iff every micro-batch holds the same token count
    counts = {int(mask[sl].sum()) for sl in slices(n, m)}
    naive = sft_naive_grad(token_logps, mask, m)
    assert torch.allclose(naive, full, rtol=1e-12, atol=1e-15) == (len(counts) == 1)


def test_sft_naive_micro_batch_mean_is_a_negative_control():
    """Lengths 1 and 4 split into two micro-batches: the naive average weights the short
    sequence's token 4x more than each long-sequence token; the step-total division does not."""
    token_logps, mask = sft_inputs([1, 4])
    full = sft_full_grad(token_logps, mask)
    naive = sft_naive_grad(token_logps, mask, 1)
    assert full[0, 0].item() == pytest.approx(-1 / 5)
    assert full[1, 0].item() == pytest.approx(-1 / 5)
    assert naive[0, 0].item() == pytest.approx(-1 / 2)
    assert naive[1, 0].item() == pytest.approx(-1 / 8)
    assert not torch.allclose(naive, full)
    torch.testing.assert_close(sft_accumulated_grad(token_logps, mask, 1), full)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

REFERENCE_LOSSES = [n for n in PREFERENCE_LOSSES.names() if n != "mix" and needs_reference(n)]


def test_reference_losses_list_is_not_trivial():
    assert {"dpo", "ipo", "cdpo", "rdpo", "hinge", "nca", "bco", "rpo", "r3m_dpo"} <= set(REFERENCE_LOSSES)


@pytest.mark.parametrize("name", REFERENCE_LOSSES)
def test_missing_reference_raises_value_error(name):
    t = paired_tensors()
    del t["ref_chosen_logps"], t["ref_rejected_logps"]
    with pytest.raises(ValueError, match=r"needs ref_(chosen|rejected)_logps"):
        preference_loss(name, **t)


@pytest.mark.parametrize("missing", ["ref_chosen_logps", "ref_rejected_logps"])
def test_missing_reference_names_the_field(missing):
    t = paired_tensors()
    del t[missing]
    with pytest.raises(ValueError, match=missing):
        preference_loss("dpo", **t)


def test_mix_missing_reference_raises():
    t = paired_tensors()
    del t["ref_rejected_logps"]
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference_loss("mix", **t, weights={"simpo": 1.0, "dpo": 1.0})


@pytest.mark.parametrize(("name", "missing"), [("ipo", "chosen_lengths"), ("simpo", "rejected_lengths"),
                                               ("orpo", "chosen_lengths"), ("nll", "chosen_lengths")])
def test_missing_lengths_raise_value_error(name, missing):
    t = paired_tensors()
    del t[missing]
    with pytest.raises(ValueError, match=missing):
        preference_loss(name, **t)


@pytest.mark.parametrize("name", ["simpo", "orpo", "nll"])
def test_reference_free_losses_run_without_reference(name):
    t = paired_tensors()
    del t["ref_chosen_logps"], t["ref_rejected_logps"]
    assert torch.isfinite(preference_loss(name, **t)).all()


def test_unknown_preference_loss_lists_known_names():
    with pytest.raises(KeyError) as info:
        preference_loss("no_such_loss", **paired_tensors())
    message = str(info.value)
    assert "no_such_loss" in message
    for known in PREFERENCE_LOSSES.names():
        assert known in message


def test_unknown_unpaired_loss_lists_known_names():
    with pytest.raises(KeyError) as info:
        unpaired_loss("dpo", logps=torch.zeros(2), ref_logps=torch.zeros(2), labels=torch.ones(2))
    for known in UNPAIRED_LOSSES.names():
        assert known in str(info.value)


@pytest.mark.parametrize(("name", "config"), [("dpo", {"gamma": 1.0}), ("simpo", {"lam": 0.1}),
                                              ("nll", {"beta": 0.1}), ("hinge", {"betta": 0.1})])
def test_unknown_preference_config_key_raises_type_error(name, config):
    with pytest.raises(TypeError, match=next(iter(config))):
        preference_loss(name, **paired_tensors(), **config)


@pytest.mark.parametrize(("name", "config"), [("kto", {"delta": 0.1}), ("bco", {"reference_point": 0.1})])
def test_unknown_unpaired_config_key_raises_type_error(name, config):
    with pytest.raises(TypeError, match=next(iter(config))):
        unpaired_loss(name, logps=torch.zeros(2), ref_logps=torch.zeros(2),
                      labels=torch.tensor([True, False]), **config)


def test_mix_unknown_config_key_raises_type_error():
    with pytest.raises(TypeError):
        preference_loss("mix", **paired_tensors(), weights={"dpo": 1.0}, betta=5.0)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_rdpo_label_smoothing_out_of_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("rdpo", **paired_tensors(), label_smoothing=eps)


@pytest.mark.parametrize("lam", [0.0, 1.0, 1.5, -0.2])
def test_r3m_lambda_out_of_range(lam):
    with pytest.raises(ValueError, match="lambda"):
        preference_loss("r3m_dpo", **paired_tensors(), lam=lam)
    with pytest.raises(ValueError, match="lambda"):
        preference_loss("r3m_dpo", **paired_tensors(), **{"lambda": lam})
    with pytest.raises(ValueError, match="lambda"):
        r3m_delta(torch.zeros(3), lam=lam)


@pytest.mark.parametrize("weights", [None, {}])
def test_mix_without_weights_raises(weights):
    config = {} if weights is None else {"weights": weights}
    with pytest.raises(ValueError, match="weights"):
        preference_loss("mix", **paired_tensors(), **config)


def test_mix_cannot_contain_itself():
    with pytest.raises(ValueError, match="mix"):
        preference_loss("mix", **paired_tensors(), weights={"dpo": 1.0, "mix": 1.0})


def test_mix_unknown_part_raises_key_error():
    with pytest.raises(KeyError, match="nope"):
        preference_loss("mix", **paired_tensors(), weights={"nope": 1.0})


# --------------------------------------------------------------------------------------------
# needs_reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("simpo", False), ("orpo", False), ("nll", False),
                                                ("dpo", True), ("rpo", True), ("r3m_dpo", True)])
def test_needs_reference(name, expected):
    assert needs_reference(name) is expected


@pytest.mark.parametrize(("weights", "expected"), [
    ({"simpo": 1.0, "nll": 0.1}, False),
    ({"orpo": 1.0}, False),
    ({"simpo": 1.0, "dpo": 0.5}, True),
    ({"dpo": 1.0, "nll": 0.005}, True),
])
def test_needs_reference_mix_follows_parts(weights, expected):
    assert needs_reference("mix", weights=weights) is expected


def test_needs_reference_unknown_name_raises_key_error():
    with pytest.raises(KeyError, match="known"):
        needs_reference("no_such_loss")
