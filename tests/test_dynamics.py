"""The closed-form gradient calculus against autograd, on hundreds of random heads (docs/theory.md §2).

The reference here is written independently of windtunnel.dynamics: a head built from
``torch.softmax`` and a genuinely non-linear downstream loss, differentiated by autograd.

Tolerances: float64 closed forms and autograd differ only by rounding in sums of <= 7 terms of
O(1) magnitude, i.e. a few ulps (eps64 = 2.2e-16), so 1e-10 relative leaves a 10^5 margin; in
float32 (eps32 = 1.2e-7) the issue's 1e-4 leaves a ~10^3 margin.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel import dynamics as dyn

REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


# ----------------------------------------------------------------------------- random heads


@st.composite
def heads(draw, dtype=torch.float64):
    """A random head: shapes, broadcasting, mask kind, scale and a seed."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    share_kv = draw(st.booleans()) and len(lead) > 0  # k, v shared over the first leading dim
    tq = draw(st.integers(1, 7))
    tk = draw(st.integers(1, 7))
    d_k = draw(st.integers(1, 5))
    d_v = draw(st.integers(1, 5))
    mask_kind = draw(st.sampled_from(["none", "causal", "padding", "random", "empty_row"]))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 3.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kv_lead = lead[1:] if share_kv else lead

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q = randn(*lead, tq, d_k)
    k = randn(*kv_lead, tk, d_k)
    v = randn(*kv_lead, tk, d_v)
    mask = None
    if mask_kind == "causal":
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    elif mask_kind == "padding":
        n_valid = torch.randint(0, tk + 1, (*lead, 1, 1), generator=gen)
        mask = torch.arange(tk) < n_valid  # [*lead, 1, tk]: key padding, some rows all masked
    elif mask_kind in ("random", "empty_row"):
        mask = torch.rand(*lead, tq, tk, generator=gen) < 0.6
        if mask_kind == "empty_row":
            mask[..., 0, :] = False
    return q, k, v, mask, scale, gen


def _reference_head(q, k, v, mask, scale):
    """Independent forward pass: torch.softmax, with all-masked rows multiplied by 0."""
    tau = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = tau * (q @ k.transpose(-1, -2))
    if mask is None:
        return scores, torch.softmax(scores, -1)
    mask = mask.expand_as(scores)
    any_key = mask.any(-1, keepdim=True)
    safe = mask | ~any_key
    alpha = torch.softmax(scores.masked_fill(~safe, -math.inf), -1) * any_key
    return scores, alpha


def _downstream_loss(g, gen):
    """A non-linear downstream network and loss: the law must not care which one."""
    d_v = g.shape[-1]
    w = torch.randn(d_v, 3, generator=gen, dtype=torch.float64).to(g.dtype)
    c = torch.randn(3, generator=gen, dtype=torch.float64).to(g.dtype)
    return (torch.tanh(g @ w) * c).sum() + 0.1 * (g**2).sum()


def _autograd(q, k, v, mask, scale, gen):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    scores, alpha = _reference_head(q, k, v, mask, scale)
    g = alpha @ v
    loss = _downstream_loss(g, gen)
    d_s, d_q, d_k, d_v, u = torch.autograd.grad(loss, (scores, q, k, v, g))
    return {
        "alpha": alpha.detach(),
        "output": g.detach(),
        "u": u,
        "d_scores": d_s,
        "d_queries": d_q,
        "d_keys": d_k,
        "d_values": d_v,
    }


def _rel_err(a, b):
    size = b.abs().max() if b.numel() else torch.tensor(0.0)
    err = (a - b).abs().max() if b.numel() else torch.tensor(0.0)
    return float(err / size) if size > 0 else float(err)


def _check_against_autograd(head, dtype):
    q, k, v, mask, scale, gen = head
    ref = _autograd(q, k, v, mask, scale, gen)
    got = dyn.attention_gradients(q, k, v, ref["u"], mask=mask, scale=scale)
    tol = REL_TOL[dtype]
    for name in ("alpha", "output", "d_scores", "d_queries", "d_keys", "d_values"):
        value = getattr(got, name)
        assert value.shape == ref[name].shape, name
        assert _rel_err(value, ref[name]) <= tol, (name, _rel_err(value, ref[name]))
    u, alpha = ref["u"], ref["alpha"]
    # Derived quantities against their definitions, from the reference pattern.
    compat = u @ v.transpose(-1, -2)
    assert _rel_err(got.compatibility, compat.expand_as(alpha)) <= tol
    assert _rel_err(got.expected_compatibility, (u * ref["output"]).sum(-1)) <= tol
    assert _rel_err(got.responsibility, alpha.sum(-2)) <= tol
    assert _rel_err(-alpha * got.advantage, ref["d_scores"]) <= tol
    assert not any(torch.isnan(getattr(got, f)).any() for f in ("alpha", "advantage", "d_keys"))


@settings(max_examples=200)
@given(heads(torch.float64))
def test_closed_form_equals_autograd_float64(head):
    _check_against_autograd(head, torch.float64)


@settings(max_examples=200)
@given(heads(torch.float32))
def test_closed_form_equals_autograd_float32(head):
    _check_against_autograd(head, torch.float32)


@settings(max_examples=100)
@given(heads(torch.float64))
def test_exact_identities(head):
    q, k, v, mask, scale, gen = head
    u = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen, dtype=q.dtype)
    got = dyn.attention_gradients(q, k, v, u, mask=mask, scale=scale)
    # Zero row sum of dL/ds.
    assert got.d_scores.sum(-1).abs().max() <= 1e-12
    # E_a[b] = u·g.
    assert torch.allclose(got.expected_compatibility, (u * got.output).sum(-1), atol=1e-12)
    # Masked keys: zero attention and zero gradient; an all-masked row is all zero.
    assert (got.alpha[~got.mask] == 0).all() and (got.d_scores[~got.mask] == 0).all()
    empty = ~got.mask.any(-1)
    assert (got.alpha[empty] == 0).all() and (got.d_scores[empty] == 0).all()
    # Shift invariance: a common vector added to every value leaves dS unchanged.
    shift = torch.randn(v.shape[-1], generator=gen, dtype=v.dtype)
    shifted = dyn.attention_gradients(q, k, v + shift, u, mask=mask, scale=scale)
    nonempty = ~empty
    assert torch.allclose(shifted.d_scores[nonempty], got.d_scores[nonempty], atol=1e-12)
    # Gating: |dL/ds_ij| <= a_ij max_k |b_ik - E[b]| (over allowed k).
    spread = got.advantage.abs().amax(-1, keepdim=True)
    assert (got.d_scores.abs() <= got.alpha * spread + 1e-12).all()
    # Causal-style masks: sum_j R_j = number of query rows with at least one key.
    assert torch.allclose(got.responsibility.sum(-1), nonempty.to(q.dtype).sum(-1), atol=1e-12)


def test_advantage_sign_convention():
    """Descent convention: a gradient step raises s_ij exactly where advantage > 0."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    v, u = torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.randn(4, 2, generator=gen, dtype=torch.float64)
    got = dyn.attention_gradients(q, k, v, u)
    step = -got.d_scores  # a free score step moves s by -dL/ds
    assert torch.equal(step > 0, got.advantage > 0)
    assert torch.allclose(got.advantage, (u.unsqueeze(1) * (got.output.unsqueeze(1) - v)).sum(-1))


def test_scale_enters_only_through_the_pattern():
    """dS depends on scale only through alpha: equal patterns give equal dS."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(6, 4, generator=gen, dtype=torch.float64)
    v, u = torch.randn(6, 2, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)
    a = dyn.attention_gradients(q, k, v, u, scale=0.5)
    b = dyn.attention_gradients(2 * q, k, v, u, scale=0.25)
    assert torch.allclose(a.alpha, b.alpha, atol=1e-14)
    assert torch.allclose(a.d_scores, b.d_scores, atol=1e-14)


def test_check_law_reports_tiny_errors_and_catches_a_wrong_formula(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64), torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    v, u = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64), torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert dyn.check_law(q, k, v, u, mask=causal).worst_rel_error <= 1e-12
    # A law with the sign of the advantage flipped must be caught.
    real = dyn.attention_gradients

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return dyn.AttentionGradients(**{**out.__dict__, "d_scores": -out.d_scores})

    monkeypatch.setattr(dyn, "attention_gradients", wrong)
    assert dyn.check_law(q, k, v, u, mask=causal).max_rel_error["d_scores"] > 0.5


# ----------------------------------------------------------------------------- weights and readout


@settings(max_examples=50)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_linear_head_and_readout_equal_autograd(seed, soft, cross):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    batch, t, d_x, d_k, d_v, n_cls = 2, 6, 5, 3, 4, 3
    x = torch.randn(batch, t, d_x, **f64)
    x_kv = torch.randn(batch, t + 1, d_x + 1, **f64) if cross else None
    d_src = d_x + 1 if cross else d_x
    w_q = torch.randn(d_x, d_k, **f64).requires_grad_(True)
    w_k = torch.randn(d_src, d_k, **f64).requires_grad_(True)
    w_v = torch.randn(d_src, d_v, **f64).requires_grad_(True)
    w_o = torch.randn(d_v, n_cls, **f64).requires_grad_(True)
    t_kv = t + 1 if cross else t
    mask = torch.ones(t, t_kv, dtype=torch.bool).tril()
    site_mask = torch.rand(batch, t, generator=gen) < 0.7
    site_mask[0, 0] = True
    if soft:
        targets = torch.softmax(torch.randn(batch, t, n_cls, **f64), -1)
    else:
        targets = torch.randint(0, n_cls, (batch, t), generator=gen)
    # Autograd reference: explicit projections, masked softmax, readout, mean CE.
    src = x if x_kv is None else x_kv
    q, k, v = x @ w_q, src @ w_k, src @ w_v
    _, alpha = _reference_head(q, k, v, mask, None)
    g = alpha @ v
    logp = torch.log_softmax(g @ w_o, -1)
    tgt = targets if soft else torch.nn.functional.one_hot(targets, n_cls).double()
    loss = -(tgt * logp).sum(-1)[site_mask].mean()
    refs = torch.autograd.grad(loss, (w_q, w_k, w_v, w_o, g))

    readout = dyn.cross_entropy_readout(g.detach(), w_o.detach(), targets, site_mask=site_mask)
    assert abs(float(readout.loss_nats - loss.detach())) <= 1e-12
    assert _rel_err(readout.d_w_out, refs[3]) <= 1e-10
    assert _rel_err(readout.upstream, refs[4]) <= 1e-10
    assert readout.n_labelled == int(site_mask.sum())
    head = dyn.linear_head_gradients(
        x, w_q.detach(), w_k.detach(), w_v.detach(), readout.upstream, mask=mask, x_kv=x_kv
    )
    for got, ref in zip((head.d_w_query, head.d_w_key, head.d_w_value), refs[:3]):
        assert _rel_err(got, ref) <= 1e-10


# ----------------------------------------------------------------------------- first order


def _free_head(seed, t=6, d_k=3, d_v=4):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    q, k, v = torch.randn(2, t, d_k, **f64), torch.randn(2, t, d_k, **f64), torch.randn(2, t, d_v, **f64)
    u = torch.randn(2, t, d_v, **f64)
    return q, k, v, u, torch.ones(t, t, dtype=torch.bool).tril()


FIRST_ORDER_FIELDS = ("delta_scores", "delta_alpha", "delta_advantage", "delta_output", "delta_loss_linear")


def _free_step_errors(seed, lr, update):
    q, k, v, u, mask = _free_head(seed)
    pred = dyn.predict_free_step(q, k, v, u, lr=lr, mask=mask, update=update)
    grads = dyn.attention_gradients(q, k, v, u, mask=mask)
    after = (
        q - lr * grads.d_queries if "queries" in update else q,
        k - lr * grads.d_keys if "keys" in update else k,
        v - lr * grads.d_values if "values" in update else v,
    )
    meas = dyn.measure_change((q, k, v), after, u, mask=mask)
    return {f: float((getattr(meas, f) - getattr(pred, f)).abs().max()) for f in FIRST_ORDER_FIELDS}, pred, meas, grads


@pytest.mark.parametrize("update", [("queries", "keys", "values"), ("queries", "keys"), ("values",)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_error_shrinks_like_lr_squared(seed, update):
    big, pred, meas, grads = _free_step_errors(seed, 1e-3, update)
    small, *_ = _free_step_errors(seed, 1e-4, update)
    for field in FIRST_ORDER_FIELDS:
        if big[field] < 1e-14:  # exactly linear in this update (e.g. Δs under a value-only step)
            assert small[field] < 1e-14
            continue
        ratio = big[field] / small[field]
        assert 70 < ratio < 130, (field, ratio)
    # The closed forms of docs/theory.md §2.6 for the free step.
    lr = 1e-3
    if "values" in update:
        q, k, v, u, mask = _free_head(seed)
        assert torch.allclose(pred.delta_values, -lr * grads.alpha.transpose(-1, -2) @ u)
        expected_db = -lr * u @ u.transpose(-1, -2) @ grads.alpha  # Δb = -η U U^T A
        assert torch.allclose(pred.delta_compatibility, expected_db, atol=1e-15)
        assert torch.allclose(meas.delta_compatibility, expected_db, atol=1e-15)  # exact: linear in v
    if update == ("queries", "keys"):
        q, k, v, u, mask = _free_head(seed)
        tau = grads.scale
        ds = grads.d_scores
        expected = -lr * tau**2 * (ds @ k @ k.transpose(-1, -2) + q @ q.transpose(-1, -2) @ ds)
        assert torch.allclose(pred.delta_scores, torch.where(grads.mask, expected, 0.0), atol=1e-15)
        # Loss (linearised in g, u fixed) falls by lr (|dQ|^2 + |dK|^2).
        drop = lr * (grads.d_queries.pow(2).sum() + grads.d_keys.pow(2).sum())
        assert torch.allclose(pred.delta_loss_linear, -drop)


def test_score_step_loss_decrease_is_eta_times_dS_norm_squared():
    """A free score step Δs = -η dS lowers the loss by η |dS|_F^2 to first order."""
    q, k, v, u, mask = _free_head(7)
    grads = dyn.attention_gradients(q, k, v, u, mask=mask)
    for lr in (1e-3, 1e-4):
        scores = grads.scale * q @ k.transpose(-1, -2) - lr * grads.d_scores
        alpha = dyn.masked_softmax(scores, grads.mask)
        change = float((u * (alpha @ v - grads.output)).sum())
        predicted = -lr * float(grads.d_scores.pow(2).sum())
        assert abs(change - predicted) <= 50 * lr**2 * abs(predicted / lr)


def test_linear_step_prediction_matches_a_real_sgd_step():
    """predict_linear_step against torch.optim.SGD on W_Q, W_K, W_V with a CE readout."""
    errors = {}
    for lr in (1e-2, 1e-3):
        gen = torch.Generator().manual_seed(11)
        f64 = dict(generator=gen, dtype=torch.float64)
        x = torch.randn(3, 8, 5, **f64)
        w = [torch.randn(5, d, **f64).requires_grad_(True) for d in (3, 3, 4)]
        w_o = torch.randn(4, 6, **f64)
        targets = torch.randint(0, 6, (3, 8), generator=gen)
        mask = torch.ones(8, 8, dtype=torch.bool).tril()

        def head(ws):
            q, k, v = (x @ wi for wi in ws)
            return q, k, v, dyn.masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(3), mask) @ v

        q0, k0, v0, g0 = head(w)
        loss0 = torch.nn.functional.cross_entropy((g0 @ w_o).reshape(-1, 6), targets.reshape(-1))
        u = torch.autograd.grad(loss0, g0, retain_graph=True)[0]
        pred = dyn.predict_linear_step(x, *(wi.detach() for wi in w), u, lr=lr, mask=mask)
        opt = torch.optim.SGD(w, lr=lr)
        opt.zero_grad()
        loss0.backward()
        opt.step()
        with torch.no_grad():
            q1, k1, v1, g1 = head(w)
            loss1 = torch.nn.functional.cross_entropy((g1 @ w_o).reshape(-1, 6), targets.reshape(-1))
        meas = dyn.measure_change((q0.detach(), k0.detach(), v0.detach()), (q1, k1, v1), u, mask=mask)
        # ΔV = X ΔW_V is exactly linear: Gram-mixed pull, equal to machine precision.
        assert torch.allclose(meas.delta_values, pred.delta_values, atol=1e-14)
        d_values = dyn.attention_gradients(q0.detach(), k0.detach(), v0.detach(), u, mask=mask).d_values
        gram_pull = -lr * x @ torch.einsum("bti,btj->ij", x, d_values)  # ΔV = -η X X^T A^T U
        assert torch.allclose(pred.delta_values, gram_pull, atol=1e-14)
        errors[lr] = (
            float((meas.delta_scores - pred.delta_scores).abs().max()),
            float((meas.delta_alpha - pred.delta_alpha).abs().max()),
            abs(float(loss1 - loss0.detach()) - float(pred.delta_loss_linear)),
        )
    for big, small in zip(errors[1e-2], errors[1e-3]):
        assert 60 < big / small < 140, (big, small)


# ----------------------------------------------------------------------------- bad input


def _ok():
    return torch.zeros(2, 3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 5, 6), torch.zeros(2, 3, 6)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.zeros(2, 3, 4, dtype=torch.long)), r"q must be a floating-point tensor of shape \[\.\.\., query_pos, d_k\]; got int64"),
        (dict(k=torch.zeros(2, 5, 3)), r"k must be \[\.\.\., key_pos, d_k=4\]"),
        (dict(v=torch.zeros(2, 4, 6)), r"v must be \[\.\.\., key_pos=5, d_v\]"),
        (dict(u=torch.zeros(2, 3, 5)), r"u must be \[\.\.\., query_pos=3, d_v=6\]"),
        (dict(u=torch.zeros(2, 3, 6, dtype=torch.float64)), r"share one dtype"),
        (dict(q=torch.zeros(4, 3, 4)), r"leading dimensions must broadcast"),
        (dict(mask=torch.ones(3, 5)), r"mask must be bool and broadcastable to \[\.\.\., query_pos, key_pos\] = \[2, 3, 5\]; got float32 \[3, 5\]"),
        (dict(mask=torch.ones(3, 4, dtype=torch.bool)), r"mask must be bool .* got bool \[3, 4\]"),
        (dict(scale="big"), r"scale must be a finite real number"),
        (dict(scale=math.inf), r"scale must be a finite real number"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    q, k, v, u = _ok()
    args = dict(q=q, k=k, v=v, u=u, mask=None, scale=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        dyn.attention_gradients(args["q"], args["k"], args["v"], args["u"], mask=args["mask"], scale=args["scale"])


def test_bad_input_of_the_other_entry_points():
    q, k, v, u = _ok()
    with pytest.raises(ValueError, match=r"lr must be a finite real number"):
        dyn.predict_free_step(q, k, v, u, lr=float("nan"))
    with pytest.raises(ValueError, match=r"update must be a non-empty subset"):
        dyn.predict_free_step(q, k, v, u, lr=0.1, update=("values", "weights"))
    x = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"w_query must be \[5, d\]"):
        dyn.linear_head_gradients(x, torch.zeros(4, 2), torch.zeros(5, 2), torch.zeros(5, 6), u)
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor"):
        dyn.linear_head_gradients(torch.zeros(2, 3, 5, dtype=torch.int32), torch.zeros(5, 2), torch.zeros(5, 2), torch.zeros(5, 6), u)
    g, w_o = torch.zeros(2, 3, 6), torch.zeros(6, 4)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 4\)"):
        dyn.cross_entropy_readout(g, w_o, torch.full((2, 3), 4))
    with pytest.raises(ValueError, match=r"targets must be long \[2, 3\] or float \[2, 3, 4\]"):
        dyn.cross_entropy_readout(g, w_o, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"site_mask must be bool \[2, 3\]"):
        dyn.cross_entropy_readout(g, w_o, torch.zeros(2, 3, dtype=torch.long), site_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"site_mask must label at least one position"):
        dyn.cross_entropy_readout(g, w_o, torch.zeros(2, 3, dtype=torch.long), site_mask=torch.zeros(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- verify_law


def test_verify_law_passes_on_both_dtypes_and_is_deterministic():
    for dtype in (torch.float64, torch.float32):
        a = dyn.verify_law(40, dtype=dtype, generator=torch.Generator().manual_seed(1))
        b = dyn.verify_law(40, dtype=dtype, generator=torch.Generator().manual_seed(1))
        assert a.passed and a.max_rel_error == b.max_rel_error
        assert set(a.max_rel_error) == set(dyn.LAW_QUANTITIES) | set(dyn.WEIGHT_QUANTITIES)


def test_verify_law_fails_on_a_wrong_value_gradient(monkeypatch):
    real = dyn.attention_gradients

    def wrong(*args, **kwargs):  # responsibility-weighted pull with the pattern not transposed
        out = real(*args, **kwargs)
        return dyn.AttentionGradients(**{**out.__dict__, "d_values": 1.001 * out.d_values})

    monkeypatch.setattr(dyn, "attention_gradients", wrong)
    report = dyn.verify_law(8, generator=torch.Generator().manual_seed(0))
    assert not report.passed
    assert report.max_rel_error["d_values"] > 1e-4 and report.max_rel_error["d_scores"] < 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_trials=0), r"n_trials must be an int >= 1; got 0"),
    (dict(n_trials=3, dtype=torch.float16), r"dtype must be torch.float32 or torch.float64"),
])
def test_verify_law_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dyn.verify_law(generator=torch.Generator(), **kwargs)


# ----------------------------------------------------------------------------- non-finite input


def _finite_cases():
    """Per public function: valid float64 tensor arguments by name, and a call taking them."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    head = dict(q=r(2, 3, 4), k=r(2, 5, 4), v=r(2, 5, 6), u=r(2, 3, 6))
    linear = dict(x=r(2, 3, 5), x_kv=r(2, 5, 7), w_query=r(5, 4), w_key=r(7, 4), w_value=r(7, 6), u=r(2, 3, 6))
    grads = dyn.attention_gradients(**head)
    deltas = dict(delta_queries=r(2, 3, 4), delta_keys=r(2, 5, 4), delta_values=r(2, 5, 6))
    steps = {f"{when}[{i}]": r(*t.shape) for when in ("before", "after") for i, t in enumerate(head.values()) if i < 3}
    return {
        "attention_gradients": (head, lambda a: dyn.attention_gradients(**a)),
        "predict_free_step": (head, lambda a: dyn.predict_free_step(**a, lr=0.1)),
        "check_law": (head, lambda a: dyn.check_law(**a)),
        "summand_magnitudes": (head, lambda a: dyn.summand_magnitudes(grads, **a)),
        "propagate_first_order": ({**head, **deltas}, lambda a: dyn.propagate_first_order(grads, **a)),
        "linear_head_gradients": (linear, lambda a: dyn.linear_head_gradients(**a)),
        "predict_linear_step": (linear, lambda a: dyn.predict_linear_step(**a, lr=0.1)),
        "cross_entropy_readout": (
            dict(g=r(2, 3, 6), w_out=r(6, 4), targets=torch.softmax(r(2, 3, 4), -1)),
            lambda a: dyn.cross_entropy_readout(**a),
        ),
        "measure_change": (
            {**steps, "u": head["u"]},
            lambda a: dyn.measure_change(
                tuple(a[f"before[{i}]"] for i in range(3)), tuple(a[f"after[{i}]"] for i in range(3)), a["u"]
            ),
        ),
    }


FINITE_CASES = _finite_cases()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "owner,name", [(owner, name) for owner, (args, _) in FINITE_CASES.items() for name in args]
)
def test_non_finite_input_names_the_function_and_the_argument(owner, name, bad):
    args, call = FINITE_CASES[owner]
    call(args)  # the valid arguments pass
    poisoned = args[name].clone()
    poisoned.view(-1)[1] = bad
    counts = "1 nan, 0 inf" if math.isnan(bad) else "0 nan, 1 inf"
    expected = f"{owner}: {name} must be finite; got 1 non-finite entry ({counts}) in float64 {list(poisoned.shape)}."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        call({**args, name: poisoned})


def test_every_public_tensor_function_refuses_non_finite_input():
    takes_tensors = {
        name for name in dyn.__all__
        if inspect.isfunction(getattr(dyn, name))
        and any("Tensor" in str(p.annotation) for p in inspect.signature(getattr(dyn, name)).parameters.values())
    }
    assert takes_tensors - set(FINITE_CASES) == {"masked_softmax"}  # exempt: masked scores are -inf
    for owner, (args, _) in FINITE_CASES.items():  # every tensor parameter is poisoned in the test above
        params = inspect.signature(getattr(dyn, owner)).parameters
        tensor_params = {n for n, p in params.items() if "torch.Tensor" in str(p.annotation)}
        tensor_params -= {"mask", "site_mask", "grads"}
        if owner == "measure_change":
            tensor_params = (tensor_params - {"before", "after"}) | {f"{w}[{i}]" for w in ("before", "after") for i in range(3)}
        assert tensor_params == set(args), owner
    scores = torch.tensor([[0.0, -math.inf], [1.0, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.isfinite(dyn.masked_softmax(scores, mask)).all()
