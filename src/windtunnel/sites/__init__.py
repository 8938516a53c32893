"""Attention sites: the routing law of arXiv 2512.22473 on any supported transformer.

An attention site is one softmax attention layer of one forward pass as its softmax saw it: the
per-head queries (after rotary embeddings), keys and values (per key-value head under
grouped-query attention, with the query-head -> key-value-head map), the boolean mask the model
used, the score scale, the pattern, the head output z before the output projection and, after
``backward()``, u = dL/dz. With them, :func:`routing_law` gives dL/ds_ij = a_ij (b_ij - E_{a_i}[b])
(b_ij = u_i·v_j), the value pull dL/dv_j = sum_i a_ij u_i and the query and key gradients of every
head, for models windtunnel did not build.

Adapters: windtunnel's TinyGPT (its hook points), Hugging Face ``transformers`` models (a
``"windtunnel"`` implementation registered with the public ``AttentionInterface``; extra
``windtunnel[hf]``) and TransformerLens ``HookedTransformer`` (its hook points; extra
``windtunnel[tl]``). Example::

    from windtunnel.sites import record_sites, routing_law, model_gradient_errors

    model.eval()
    with record_sites(model) as recording:
        loss = torch.nn.functional.cross_entropy(model(tokens).logits[:, :-1].flatten(0, 1),
                                                 tokens[:, 1:].flatten())
        loss.backward()
    for site in recording.sites:  # one per layer, in the order the layers ran
        law = routing_law(site, dtype=torch.float64)
        print(site.name, law.advantage.abs().mean(), model_gradient_errors(site, law))

Beyond the sites, :mod:`windtunnel.probes` needs from some instruments a model's readout input
(:func:`record_readout`) and the residual before the final norm (:func:`record_final_residual`), its key map of token embeddings (:func:`token_keys`), its value
projections (:func:`value_projections`, :func:`record_values`) and ablations (:func:`ablated`);
each adapter provides them or refuses with a reason, which :func:`unsupported` reports.
"""

from windtunnel.sites._instruments import (
    FEATURES,
    ReadoutRecording,
    ValueRecording,
    ablated,
    ablation_layout,
    record_final_residual,
    record_readout,
    record_values,
    token_keys,
    unsupported,
    value_projections,
)
from windtunnel.sites._protocol import (
    AttentionSite,
    SiteLaw,
    SiteRecording,
    TokenKeys,
    ValueProjection,
    check_law,
    model_gradient_errors,
    routing_law,
)
from windtunnel.sites._record import record_sites

__all__ = [
    "FEATURES",
    "AttentionSite",
    "ReadoutRecording",
    "SiteLaw",
    "SiteRecording",
    "TokenKeys",
    "ValueProjection",
    "ValueRecording",
    "ablated",
    "ablation_layout",
    "check_law",
    "model_gradient_errors",
    "record_final_residual",
    "record_readout",
    "record_sites",
    "record_values",
    "routing_law",
    "token_keys",
    "unsupported",
    "value_projections",
]
