"""``windtunnel inspect``: the routing law, attention focusing and key geometry of every head of a
model you already have, on a text of yours (arXiv 2512.22473; the instruments of docs and README).

One forward and backward pass of the next-token cross-entropy over the text, recorded through
:func:`windtunnel.sites.record_sites`, gives per head:

* the routing law (arXiv 2512.22473, the advantage dL/ds_ij = a_ij (b_ij - E_{a_i}[b])): the
  statistics of :func:`windtunnel.probes.routing_law_stats` (advantage, positive-advantage mass,
  ‖dL/ds‖, responsibilities, value pull) with the closed form checked against an autograd rebuild
  and against the model's own gradients at q, k, v;
* attention focusing (arXiv 2512.22471): the entropy in bits of each query row at every position
  after the first, per head and layer, and (H(first layer) - H(last layer)) / H(first layer);
* key geometry in context: for each key-value head, the mean |cos| between the keys of distinct
  positions of the text (as the softmax saw them, after any rotary embedding, so position is part
  of what they encode), their participation ratio (effective dimension, 1 to d_head) and mean
  norm. This is the in-context variant of key orthogonality: a model with no windtunnel key map
  (any Hugging Face architecture) has no context-free token keys to compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from windtunnel.geometry import attention_entropy, mean_abs_cosine, participation_ratio, random_abs_cosine
from windtunnel.probes import RoutingLawStats, routing_law_stats_of_sites
from windtunnel.probes._common import _device
from windtunnel.probes.routing import recorded_backward
from windtunnel.runs import write_json_atomic

__all__ = ["Inspection", "inspect_model_dir", "inspect_tokens"]

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_tokens` measured. Per-head tensors are [layer, head] (query heads);
    key statistics are per key-value head, [layer, kv_head], with ``kv_head_of`` mapping each query
    head to its key-value head.

    Attributes:
        model_class: the inspected model's class name.
        n_tokens: the text's length in tokens (after truncation).
        routing: the routing-law statistics (loss_nats is the mean next-token cross-entropy).
        head_entropy_bits: attention entropy per head, averaged over query positions 1..T-1.
        layer_entropy_bits: [layer], the heads averaged after the per-row entropies.
        focusing_ratio: (H(first layer) - H(last layer)) / H(first layer).
        key_abs_cos: mean |cos| between the keys of distinct positions, [layer, kv_head].
        key_participation_ratio: (Σλ)² / Σλ² of the centred keys' covariance, [layer, kv_head].
        key_norm_mean: mean ‖k‖, [layer, kv_head].
        key_random_abs_cos: E|cos| of two random directions in R^d_head (the baseline of key_abs_cos).
        kv_head_of: per layer, the key-value head of each query head.
    """

    model_class: str
    n_tokens: int
    routing: RoutingLawStats
    head_entropy_bits: torch.Tensor
    layer_entropy_bits: torch.Tensor
    focusing_ratio: float
    key_abs_cos: list[torch.Tensor]
    key_participation_ratio: list[torch.Tensor]
    key_norm_mean: list[torch.Tensor]
    key_random_abs_cos: float
    kv_head_of: list[tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``layers`` (one row per layer) and ``heads`` (one row per query head)."""
        r = self.routing
        layers, heads = [], []
        for layer, kv_of in enumerate(self.kv_head_of):
            layers.append(
                {
                    "layer": layer,
                    "n_heads": len(kv_of),
                    "n_kv_heads": int(self.key_abs_cos[layer].numel()),
                    "attn_entropy_bits": _num(self.layer_entropy_bits[layer]),
                    "law_check_rel_error": _num(r.law_rel_error[layer]),
                    "model_grad_rel_error": _num(r.model_grad_rel_error[layer]),
                }
            )
            for head, kv in enumerate(kv_of):
                row: dict[str, Any] = {"layer": layer, "head": head, "kv_head": kv}
                for name in RoutingLawStats._PER_HEAD:
                    row[name] = _num(getattr(r, name)[layer, head])
                row["attn_entropy_bits"] = _num(self.head_entropy_bits[layer, head])
                row["key_abs_cos"] = _num(self.key_abs_cos[layer][kv])
                row["key_participation_ratio"] = _num(self.key_participation_ratio[layer][kv])
                row["key_norm_mean"] = _num(self.key_norm_mean[layer][kv])
                heads.append(row)
        return {
            "model_class": self.model_class,
            "n_tokens": self.n_tokens,
            "loss_nats": _num(r.loss_nats),
            "focusing_ratio": _num(self.focusing_ratio),
            "key_random_abs_cos": self.key_random_abs_cos,
            "layers": layers,
            "heads": heads,
        }


def _num(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def inspect_tokens(model: nn.Module, tokens: torch.Tensor) -> Inspection:
    """Routing law, attention focusing and in-context key geometry of every head on ``tokens``.

    One forward pass (eval mode) and one backward pass of the mean next-token cross-entropy
    (positions 0..T-2 predict 1..T-1), recorded by :func:`windtunnel.sites.record_sites`; the
    model's parameter gradients are restored afterwards. Works on every model with an
    attention-site adapter whose output is logits or has ``.logits``.

    Shapes: tokens long [batch, T] with T >= 3 (or [T], taken as one sequence).

    Raises:
        ValueError: when tokens is not a long tensor [batch, T >= 3]; naming the model class
            when it has no attention sites, or as :func:`windtunnel.sites.record_sites`.
    """
    owner = "inspect_tokens"
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() not in (1, 2):
        raise ValueError(f"{owner}: tokens must be a long tensor [batch, T] or [T]; got {tokens!r:.80}.")
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.shape[1] < 3:
        raise ValueError(f"{owner}: the text must be at least 3 tokens long; got {tokens.shape[1]}.")
    tokens = tokens.to(_device(model))
    recording, loss_nats = recorded_backward(
        owner, model, tokens,
        lambda logits: torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()),
    )
    sites = recording.sites
    routing = routing_law_stats_of_sites(sites, loss_nats=loss_nats)
    positions = torch.arange(1, tokens.shape[1], device=sites[0].pattern.device)
    entropy = attention_entropy([site.pattern.double() for site in sites], positions)
    key_cos, key_pr, key_norm = [], [], []
    for site in sites:
        keys = site.k.double().permute(2, 0, 1, 3).flatten(1, 2)  # [kv_head, batch * pos, d_head]
        key_cos.append(mean_abs_cosine(keys).cpu())
        key_pr.append(torch.stack([participation_ratio(k) for k in keys]).cpu())
        key_norm.append(keys.norm(dim=-1).mean(-1).cpu())
    return Inspection(
        model_class=type(model).__name__,
        n_tokens=int(tokens.shape[1]),
        routing=routing,
        head_entropy_bits=entropy.head_entropy_bits.float().cpu(),
        layer_entropy_bits=entropy.layer_entropy_bits.float().cpu(),
        focusing_ratio=float(entropy.focusing_ratio),
        key_abs_cos=key_cos,
        key_participation_ratio=key_pr,
        key_norm_mean=key_norm,
        key_random_abs_cos=random_abs_cosine(int(sites[0].k.shape[-1])),
        kv_head_of=[tuple(site.kv_head_of) for site in sites],
    )


def inspect_model_dir(
    model_dir: str | Path, text_file: str | Path, *, out: str | Path, max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """Inspect a local Hugging Face model directory on a UTF-8 text file; write ``OUT/inspect.json``
    and the HTML report ``OUT/inspect.html``.

    The model and tokenizer load with :func:`windtunnel.models.hf.load_local_causal_lm` (no hub
    access, no code from the directory, safetensors weights only). The text is tokenized with the
    directory's tokenizer and cut to the first ``max_tokens`` tokens (and to the model's position
    limit).

    Returns:
        the JSON written, with ``paths`` {"json", "html"} added.

    Raises:
        ValueError: naming the file when the text is not UTF-8 or too short; as
            :func:`windtunnel.models.hf.load_local_causal_lm` and :func:`inspect_tokens`.
    """
    from windtunnel.models.hf import load_local_causal_lm
    from windtunnel.reports.inspection import build_inspection_report

    owner = "inspect_model_dir"
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 3:
        raise ValueError(f"{owner}: max_tokens must be an int >= 3; got {max_tokens!r}.")
    text_file = Path(text_file)
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{owner}: {text_file} must be UTF-8 text; {error}.") from None
    model, tokenizer = load_local_causal_lm(model_dir)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # [1, T]
    limit = max_tokens
    n_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(n_positions, int) and n_positions > 0:
        limit = min(limit, n_positions)
    n_text = int(ids.shape[1])
    if n_text < 3:
        raise ValueError(f"{owner}: {text_file} gives {n_text} tokens; at least 3 are needed.")
    result = inspect_tokens(model, ids[:, :limit].long()).to_dict()
    result = {
        "model_dir": str(model_dir),
        "model_type": str(getattr(model.config, "model_type", "?")),
        "text_file": str(text_file),
        "n_text_tokens": n_text,
        "max_tokens": limit,
        **result,
    }
    out = Path(out)
    json_path = write_json_atomic(out / "inspect.json", result)
    html_path = build_inspection_report(result, out / "inspect.html")
    return {**result, "paths": {"json": str(json_path), "html": str(html_path)}}
