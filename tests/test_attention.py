"""MultiHeadAttention against SDPA and a per-head loop; masks, ablation, hook_z_grad, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from windtunnel.attention import MultiHeadAttention
from windtunnel.dynamics import masked_softmax
from windtunnel.hooks import name_hook_points, record


def _module(d_model, n_heads, *, bias=False, causal=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = MultiHeadAttention(
        d_model=d_model, n_heads=n_heads, bias=bias, causal=causal, generator=None
    )
    # Weights of order 1/sqrt(d_model), so scores and outputs are O(1) and a 1e-6 tolerance bites.
    attn.reset_parameters(g, std=1.0 / math.sqrt(d_model))
    if bias:
        with torch.no_grad():
            for b in (attn.b_Q, attn.b_K, attn.b_V, attn.b_O):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    name_hook_points(attn)
    return attn.to(dtype), g


def _sdpa_reference(attn, x, allowed):
    """Output of the module computed with torch's SDPA on the module's own projections."""
    q = torch.einsum("bpd,hde->bhpe", x, attn.W_Q)
    k = torch.einsum("bpd,hde->bhpe", x, attn.W_K)
    v = torch.einsum("bpd,hde->bhpe", x, attn.W_V)
    if attn.bias:
        q = q + attn.b_Q[:, None]
        k = k + attn.b_K[:, None]
        v = v + attn.b_V[:, None]
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [batch, head, pos, d_head]
    out = torch.einsum("bhpe,hed->bpd", z, attn.W_O)
    return out + attn.b_O if attn.bias else out


@given(
    batch=st.integers(1, 3),
    pos=st.integers(1, 9),
    n_heads=st.integers(1, 4),
    d_head=st.integers(1, 8),
    bias=st.booleans(),
    causal=st.booleans(),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_matches_sdpa(batch, pos, n_heads, d_head, bias, causal, padding, seed, dtype):
    d_model = n_heads * d_head
    attn, g = _module(d_model, n_heads, bias=bias, causal=causal, dtype=dtype, seed=seed)
    x = torch.randn(batch, pos, d_model, generator=g).to(dtype)
    allowed = torch.ones(batch, 1, pos, pos, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(pos, pos, dtype=torch.bool).tril()
    mask = None
    if padding:
        keep = torch.rand(batch, pos, generator=g) < 0.7  # key-padding mask, True = real token
        mask = keep[:, None, None, :]
        allowed = allowed & mask
    with torch.no_grad():
        out = attn(x, mask=mask)
        ref = _sdpa_reference(attn, x, allowed)
    # Rows with at least one allowed key must agree with SDPA to 1e-6 (fp32) or 1e-12 (fp64) at
    # unit magnitude: about 8 ulps of fp32 (eps 1.2e-7), room for the different summation orders
    # of two softmax-and-matmul implementations. Outputs here are O(1); the bound scales with the
    # largest |output| above 1 so that it stays a relative statement.
    live = allowed.any(-1)[:, 0]  # [batch, pos]
    atol = (1e-6 if dtype == torch.float32 else 1e-12) * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out[live], ref[live], rtol=0, atol=atol)
    # Rows with no allowed key attend to nothing: z = 0, so the output is b_O (or 0).
    dead = out[~live]
    expected = attn.b_O.expand_as(dead) if bias else torch.zeros_like(dead)
    torch.testing.assert_close(dead, expected, rtol=0, atol=0)


def test_pattern_rows_sum_to_one_on_allowed_keys_and_hook_layouts():
    attn, g = _module(12, 3)
    x = torch.randn(2, 5, 12, generator=g)
    keep = torch.tensor([[True] * 5, [False, True, True, False, True]])
    with torch.no_grad(), record(attn) as cache:
        attn(x, mask=keep[:, None, None, :])
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() & keep[:, None, None, :]
    pattern = cache["hook_pattern"]
    assert pattern.shape == (2, 3, 5, 5)
    for name in ("hook_q", "hook_k", "hook_v", "hook_z"):
        assert cache[name].shape == (2, 5, 3, 4)
    assert cache["hook_attn_scores"].shape == (2, 3, 5, 5)
    assert torch.all(pattern[~allowed.expand_as(pattern)] == 0)
    assert torch.all(torch.isinf(cache["hook_attn_scores"][~allowed.expand_as(pattern)]))
    sums = pattern.sum(-1)
    live = allowed.any(-1).expand_as(sums)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]))
    assert torch.all(sums[~live] == 0)  # batch 1, query 0: its only key is padding
    assert not live.all()
    # z is the pattern applied to the recorded values, head by head.
    z = torch.einsum("bhqk,bkhe->bqhe", pattern, cache["hook_v"])
    torch.testing.assert_close(cache["hook_z"], z)


def test_masked_softmax_fully_masked_rows_are_zero_with_zero_grad():
    scores = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores.requires_grad_(True)
    allowed = torch.tensor([[True, False, True, True], [False] * 4, [False, False, True, False]])
    pattern = masked_softmax(scores, allowed)
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((pattern * weights).sum(), scores)
    assert torch.all(pattern[1] == 0) and torch.all(grad[1] == 0)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[~allowed] == 0)
    torch.testing.assert_close(pattern[2], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    row0 = torch.softmax(scores[0, [0, 2, 3]], dim=0)
    torch.testing.assert_close(pattern[0, [0, 2, 3]], row0, rtol=0, atol=1e-15)


def test_masked_softmax_hand_value():
    # Scores 0 and 1 on two allowed keys give weights 1 : e.
    pattern = masked_softmax(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[True, True, False]]))
    e = math.e
    torch.testing.assert_close(pattern, torch.tensor([[1 / (1 + e), e / (1 + e), 0.0]]))


def _manual_heads(attn, x, keep):
    """Plain per-head, per-query loop (causal, key padding ``keep``): per-head outputs [batch, pos, d_head]."""
    batch, pos, _ = x.shape
    heads = []
    for h in range(attn.n_heads):
        q = x @ attn.W_Q[h]
        k = x @ attn.W_K[h]
        v = x @ attn.W_V[h]
        rows = []
        for b in range(batch):
            per_query = []
            for i in range(pos):
                keys = [j for j in range(i + 1) if keep[b, j]]
                out = torch.zeros(attn.d_head, dtype=x.dtype)
                if keys:
                    s = torch.stack([q[b, i] @ k[b, j] for j in keys]) * attn.scale
                    a = torch.softmax(s, dim=0)
                    out = sum(a[n] * v[b, j] for n, j in enumerate(keys))
                per_query.append(out)
            rows.append(torch.stack(per_query))
        heads.append(torch.stack(rows))  # [batch, pos, d_head]
    return heads


def test_hook_z_grad_is_the_upstream_gradient_before_w_o():
    attn, g = _module(12, 3, dtype=torch.float64, seed=3)
    x = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, True], [True, False, True, True]])
    target = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)

    def loss_fn(out):
        return ((out - target) ** 2).sum() / 3.0 + out[:, -1].exp().sum()

    with record(attn, names=["hook_z"], grads=True) as cache:
        loss = loss_fn(attn(x, mask=keep[:, None, None, :]))
        loss.backward()

    # Reference: the per-head outputs g^(h) from a plain loop, made leaves, then the loss through
    # W_O only; u^(h) = dL/dg^(h) by autograd.
    with torch.no_grad():
        heads = [h.requires_grad_(True) for h in _manual_heads(attn, x, keep)]
    torch.testing.assert_close(
        cache["hook_z"], torch.stack(heads, dim=2).detach(), rtol=0, atol=1e-14
    )
    ref_loss = loss_fn(sum(heads[h] @ attn.W_O[h].detach() for h in range(3)))
    torch.testing.assert_close(ref_loss, loss.detach(), rtol=0, atol=1e-12)
    grads = torch.autograd.grad(ref_loss, heads)
    torch.testing.assert_close(cache["hook_z_grad"], torch.stack(grads, dim=2), rtol=0, atol=1e-14)


def test_head_multiplier_zero_ablates_exactly_that_head():
    attn, g = _module(12, 3, seed=4)
    x = torch.randn(2, 6, 12, generator=g)
    with torch.no_grad():
        full = attn(x)
        attn.set_head_multiplier(torch.tensor([1.0, 0.0, 1.0]))
        with record(attn, names=["hook_z", "hook_pattern"]) as cache:
            ablated = attn(x)
        attn.set_head_multiplier(None)
        assert torch.equal(attn(x), full)
        # Reference: zero head 1's output projection instead.
        saved = attn.W_O[1].clone()
        attn.W_O[1].zero_()
        ref = attn(x)
        attn.W_O[1].copy_(saved)
    assert torch.all(cache["hook_z"][:, :, 1] == 0)
    assert torch.all(cache["hook_pattern"][:, 1] == 0)
    assert cache["hook_z"][:, :, 0].abs().sum() > 0
    torch.testing.assert_close(ablated, ref, rtol=0, atol=1e-6)
    assert (ablated - full).abs().max() > 1e-3


def test_batched_head_multiplier_matches_one_run_per_row():
    attn, g = _module(8, 2, seed=5)
    x = torch.randn(1, 5, 8, generator=g).expand(3, 5, 8)
    multiplier = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.5]])
    with torch.no_grad():
        attn.set_head_multiplier(multiplier)
        batched = attn(x)
        for row in range(3):
            attn.set_head_multiplier(multiplier[row])
            torch.testing.assert_close(batched[row], attn(x[:1])[0], rtol=0, atol=1e-6)
        attn.set_head_multiplier(None)


def test_reset_parameters_is_deterministic_and_uses_the_generator():
    a = MultiHeadAttention(d_model=8, n_heads=2, generator=torch.Generator().manual_seed(7))
    b = MultiHeadAttention(d_model=8, n_heads=2, generator=torch.Generator().manual_seed(7))
    c = MultiHeadAttention(d_model=8, n_heads=2, generator=torch.Generator().manual_seed(8))
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name])
        assert not torch.equal(p, dict(c.named_parameters())[name])
    assert 0.01 < a.W_Q.std().item() < 0.03
    zero = MultiHeadAttention(d_model=8, n_heads=2, generator=None)
    assert all(torch.all(p == 0) for p in zero.parameters())
    assert "head_multiplier" not in a.state_dict()


def test_parameter_shapes_and_count():
    attn = MultiHeadAttention(d_model=12, n_heads=3, bias=True, generator=None)
    assert attn.W_Q.shape == (3, 12, 4) and attn.W_O.shape == (3, 4, 12)
    assert sum(p.numel() for p in attn.parameters()) == 4 * 12 * 12 + 3 * 12 + 12
    no_bias = MultiHeadAttention(d_model=12, n_heads=3, generator=None)
    assert sum(p.numel() for p in no_bias.parameters()) == 4 * 12 * 12


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(d_model=64, n_heads=3),
            r"MultiHeadAttention.n_heads must divide d_model .*n_heads=3, d_model=64",
        ),
        (dict(d_model=0, n_heads=2), r"MultiHeadAttention.d_model must be an int >= 1; got 0"),
        (dict(d_model=8, n_heads=2.0), r"MultiHeadAttention.n_heads must be an int >= 1; got 2.0"),
        (
            dict(d_model=8, n_heads=2, d_head=0),
            r"MultiHeadAttention.d_head must be an int >= 1; got 0",
        ),
        (
            dict(d_model=8, n_heads=2, scale=-1.0),
            r"MultiHeadAttention.scale must be None or a finite number > 0; got -1.0",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs, generator=None)


def test_explicit_d_head_need_not_divide():
    attn = MultiHeadAttention(d_model=10, n_heads=3, d_head=5, generator=None)
    assert attn(torch.zeros(1, 2, 10)).shape == (1, 2, 10)


def test_bad_forward_arguments():
    attn = MultiHeadAttention(d_model=8, n_heads=2, generator=None)
    with pytest.raises(
        ValueError,
        match=r"x must be a floating-point tensor of shape \[batch, pos, d_model\] with d_model = 8; got float32 \[2, 3, 7\]",
    ):
        attn(torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match=r"x must be .*; got int64 \[2, 3, 8\]"):
        attn(torch.zeros(2, 3, 8, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"mask must be bool and broadcastable to \[batch, head, query_pos, key_pos\] = \[2, 2, 3, 3\]; got float32",
    ):
        attn(torch.zeros(2, 3, 8), mask=torch.ones(2, 1, 1, 3))
    with pytest.raises(ValueError, match=r"mask must be bool .*; got bool \[2, 1, 1, 4\]"):
        attn(torch.zeros(2, 3, 8), mask=torch.ones(2, 1, 1, 4, dtype=torch.bool))


def test_bad_head_multiplier():
    attn = MultiHeadAttention(d_model=8, n_heads=2, generator=None)
    with pytest.raises(
        ValueError,
        match=r"multiplier must be None or a floating tensor of shape \[head\] or \[batch, head\] with head = 2; got float32 \[3\]",
    ):
        attn.set_head_multiplier(torch.ones(3))
    with pytest.raises(ValueError, match=r"got int64 \[2\]"):
        attn.set_head_multiplier(torch.ones(2, dtype=torch.long))
    attn.set_head_multiplier(torch.ones(4, 2))
    with pytest.raises(
        ValueError,
        match=r"head_multiplier \[batch, head\] must match the batch size 2; got float32 \[4, 2\]",
    ):
        attn(torch.zeros(2, 3, 8))


def test_recorded_hooks_satisfy_the_routing_law():
    """docs/theory.md §2.2–2.3 from recorded tensors alone: dL/ds = A ⊙ (B - rowsum(A ⊙ B)), dL/dv = A^T U.

    B = u_i·v_j uses u = hook_z_grad; the left-hand sides are the recorded hook_attn_scores_grad
    and hook_v_grad, so this checks that the hooks expose exactly the law's quantities, padding
    and an empty row included.
    """
    attn, g = _module(12, 3, dtype=torch.float64, seed=6)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True] * 5, [False, True, True, False, True]])
    target = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    with record(attn, grads=True) as cache:
        ((attn(x, mask=keep[:, None, None, :]) - target) ** 3).sum().backward()
    a = cache["hook_pattern"]  # [batch, head, query_pos, key_pos]
    u = cache["hook_z_grad"].transpose(1, 2)  # [batch, head, pos, d_head]
    v = cache["hook_v"].transpose(1, 2)
    b = u @ v.transpose(-1, -2)  # compatibility [batch, head, query_pos, key_pos]
    d_scores = a * (b - (a * b).sum(-1, keepdim=True))
    scores_grad = cache["hook_attn_scores_grad"]
    torch.testing.assert_close(scores_grad, d_scores, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        scores_grad.sum(-1), torch.zeros_like(scores_grad.sum(-1)), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        cache["hook_v_grad"].transpose(1, 2), a.transpose(-1, -2) @ u, rtol=0, atol=1e-12
    )
    assert torch.all(scores_grad[1, :, 0] == 0)  # the empty row has zero gradient
