"""The attention-site protocol on hand-built sites: the law against autograd, GQA bookkeeping, errors."""

import pytest
import torch
from torch import nn

from windtunnel.sites import AttentionSite, check_law, model_gradient_errors, record_sites, routing_law


def _gqa_site(*, batch=2, t=5, n_heads=4, n_kv=2, d=3, dtype=torch.float64, generator):
    """A grouped-query layer built by hand, with autograd's gradients at q, k, v as the reference."""
    q, k, v = (
        torch.randn(batch, t, h, d, generator=generator, dtype=dtype).requires_grad_()
        for h in (n_heads, n_kv, n_kv)
    )
    kv_head_of = tuple(h * n_kv // n_heads for h in range(n_heads))
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    scale = 0.7
    index = torch.tensor(kv_head_of)
    k_h, v_h = k.index_select(2, index), v.index_select(2, index)
    scores = scale * torch.einsum("bqhd,bkhd->bhqk", q, k_h)
    pattern = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1)
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v_h)
    u = torch.randn(z.shape, generator=generator, dtype=dtype)
    d_q, d_k, d_v = torch.autograd.grad((z * u).sum(), (q, k, v))
    site = AttentionSite(
        name="layer", layer=0, q=q.detach(), k=k.detach(), v=v.detach(), mask=mask, scale=scale,
        pattern=pattern.detach(), z=z.detach(), kv_head_of=kv_head_of, z_grad=u,
        q_grad=d_q, k_grad=d_k, v_grad=d_v,
    )
    return site


def test_routing_law_of_a_grouped_query_site_equals_autograd():
    site = _gqa_site(generator=torch.Generator().manual_seed(0))
    law = routing_law(site)
    assert law.d_keys.shape == site.k.shape and law.d_queries.shape == site.q.shape
    errors = model_gradient_errors(site, law)
    assert max(errors.values()) <= 1e-12, errors
    assert check_law(site).worst_rel_error <= 1e-12
    # rows of dL/ds sum to zero (the advantage has zero mean under the pattern)
    assert law.d_scores.sum(-1).abs().max() <= 1e-12


def test_expand_and_sum_to_kv_are_adjoint():
    site = _gqa_site(generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(site.k.shape, generator=g, dtype=torch.float64)
    y = torch.randn(site.q.shape[:3] + (site.k.shape[3],), generator=g, dtype=torch.float64)
    assert site.expand_kv(x).shape == y.shape
    assert torch.allclose((site.expand_kv(x) * y).sum(), (x * site.sum_to_kv(y)).sum())
    assert site.kv_head_of == (0, 0, 1, 1) and site.n_heads == 4 and site.n_kv_heads == 2


def test_site_rejects_wrong_shapes_and_maps_in_one_error():
    site = _gqa_site(generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"2 problems in AttentionSite\('bad'\)") as info:
        AttentionSite(
            name="bad", layer=0, q=site.q, k=site.k, v=site.v, mask=site.mask.float(),
            scale=site.scale, pattern=site.pattern, z=site.z, kv_head_of=(0, 1, 2, 3),
        )
    assert "mask must be bool" in str(info.value) and "kv_head_of must be a tuple of 4 ints in [0, 2)" in str(info.value)
    with pytest.raises(ValueError, match="expand_kv: x must be"):
        site.expand_kv(site.q)


def test_u_without_backward_and_dropout_are_clear_errors():
    site = _gqa_site(generator=torch.Generator().manual_seed(4))
    fields = {f: getattr(site, f) for f in ("name", "layer", "q", "k", "v", "mask", "scale", "pattern", "z", "kv_head_of")}
    bare = AttentionSite(**fields)
    with pytest.raises(ValueError, match="has no u = dL/dz: no backward pass has been run"):
        routing_law(bare)
    with pytest.raises(ValueError, match="attention dropout p=0.1"):
        routing_law(AttentionSite(**fields, dropout=0.1, z_grad=site.u))
    with pytest.raises(ValueError, match="holds no autograd gradient"):
        model_gradient_errors(AttentionSite(**fields, z_grad=site.u))


def test_unsupported_model_names_its_class():
    with torch.random.fork_rng():  # nn.Linear draws its init from the global RNG
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"no attention-site adapter supports Sequential \(torch.nn.modules.container\)"):
        with record_sites(model):
            pass
    with pytest.raises(TypeError, match="must be a torch.nn.Module; got str"):
        with record_sites("gpt2"):
            pass
