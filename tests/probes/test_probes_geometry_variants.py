"""Every published geometry definition, named (docs/theory.md §8.1–§8.3, §9): each variant on a model
whose answer is known, against the authors' formula written as a plain loop, and ours against
the package's existing definitions."""

import math

import pytest
import torch

from windtunnel import probes
from windtunnel.hooks import record
from windtunnel.models import TinyGPT, TinyGPTConfig
from windtunnel.paper_numbers import paper_number
from windtunnel.reports import paper_table_rows
from windtunnel.tasks import Bijection, HMMFiltering

TASK = Bijection(n_values=6, n_pairs=5)  # vocab 12, seq_len 9, value tokens 6..11


def tiny_model(task=TASK, seed=0, **kw):
    cfg = dict(vocab_size=task.vocab_size, n_positions=task.seq_len, n_layers=2, n_heads=2, d_model=16, d_mlp=32)
    cfg.update(kw)
    return TinyGPT(TinyGPTConfig(**cfg), generator=torch.Generator().manual_seed(seed))


def batch_of(task=TASK, n=24, seed=1):
    return task.sample(n, generator=torch.Generator().manual_seed(seed))


def test_registry_names_every_published_definition_with_one_ours_each():
    variants = probes.GEOMETRY_VARIANTS
    assert list(variants["key_orthogonality"]) == ["hypothesis_abs", "vocabulary_signed", "in_context_abs", "weight_columns_abs"]
    assert list(variants["focusing_ratio"]) == ["sites", "final_position", "all_positions"]
    manifold = variants["value_manifold_pc1_share"]
    assert {f"{w}_{s}_{z}" for w in ("sites", "value_positions") for s in ("final_norm", "pre_final_norm") for z in ("zscored", "raw")} <= set(manifold)
    assert {"head_values_zscored", "head_values_raw"} <= set(manifold)
    for quantity in variants.values():
        assert [name for name, v in quantity.items() if v.ours] == [next(iter(quantity))]  # ours, listed first
        for v in quantity.values():
            assert v.function.__doc__ and ("arXiv" in v.function.__doc__ or "docs/theory.md §" in v.function.__doc__)
    # the numbers of the report's paper table (docs/theory.md §10), each beside the one definition it belongs to
    table = {number.key: reader for reader, number in paper_table_rows("bijection")}
    for quantity, variant, number, key in (("key_orthogonality", "hypothesis_abs", "0.052 vs 0.082 random", "bijection.transformer.key_orthogonality"),
                                           ("value_manifold_pc1_share", "value_positions_pre_final_norm_raw", "84–90 %", "bijection.transformer.value_manifold"),
                                           ("focusing_ratio", "sites", "85–90 %", "bijection.transformer.focusing")):
        assert key in table and number in paper_number(key).paper
        assert [name for name, v in variants[quantity].items() if v.paper and number in v.paper] == [variant]
        assert paper_number(key).cited in variants[quantity][variant].paper  # the table's entry, source included


@torch.no_grad()
def test_exactly_orthogonal_keys_score_zero_under_every_key_variant():
    """One-hot embeddings, no position embedding, and W_K picking coordinates 0..7 (head 0) and 8..15
    (head 1): every pair of layer-0 keys is orthogonal or involves a zero key, in every definition."""
    model = tiny_model()
    model.embed.W_E.copy_(torch.eye(16)[:12])
    model.pos_embed.W_pos.zero_()
    w_k = torch.zeros(2, 16, 8)
    w_k[0, :8] = torch.eye(8)
    w_k[1, 8:] = torch.eye(8)
    model.blocks[0].attn.W_K.copy_(w_k)
    out = probes.geometry_variants(model, TASK, batch_of())["key_orthogonality"]
    for name in ("hypothesis_abs", "vocabulary_signed", "in_context_abs", "weight_columns_abs"):
        assert out[name]["unavailable"] is None
        assert out[name]["value"] == 0.0, name
    random = probes.geometry_variants(tiny_model(), TASK, batch_of())["key_orthogonality"]
    assert all(random[name]["value"] > 0.05 for name in ("hypothesis_abs", "in_context_abs", "weight_columns_abs"))


@torch.no_grad()
def test_key_variants_against_the_authors_formula_in_a_loop():
    """The authors' analysis script: K = E W_K[h] over every vocabulary id (raw embeddings), keys
    normalised, the signed mean of the off-diagonal cosines, then the mean over heads."""
    model = tiny_model(seed=3)
    states = probes.collect_geometry_states(model, TASK, batch_of())
    got = probes.GEOMETRY_VARIANTS["key_orthogonality"]["vocabulary_signed"].function(model, TASK, states)
    for layer, block in enumerate(model.blocks):
        per_head = []
        for h in range(2):
            keys = [model.embed.W_E[x].double() @ block.attn.W_K[h].double() for x in range(12)]
            total = sum(float(keys[x] @ keys[y] / (keys[x].norm() * keys[y].norm())) for x in range(12) for y in range(12) if x != y)
            per_head.append(total / (12 * 11))
        assert got["per_layer"][layer] == pytest.approx(sum(per_head) / 2, abs=1e-12)
    # in context: the recorded layer-0 keys, pairs of value-token positions within each sequence
    batch = batch_of()
    with record(model, names="blocks.0.attn.hook_k") as cache:
        model(batch.tokens)
    k = cache["blocks.0.attn.hook_k"].double()  # [batch, pos, head, d_head]
    in_context = probes.GEOMETRY_VARIANTS["key_orthogonality"]["in_context_abs"].function(model, TASK, states)
    per_head = []
    for h in range(2):
        total, count = 0.0, 0
        for s in range(batch.tokens.shape[0]):
            where = [p for p in range(TASK.seq_len) if int(batch.tokens[s, p]) >= 6]
            for a in where:
                for b in where:
                    if a != b:
                        total += abs(float(k[s, a, h] @ k[s, b, h] / (k[s, a, h].norm() * k[s, b, h].norm())))
                        count += 1
        per_head.append(total / count)
    assert in_context["value"] == pytest.approx(sum(per_head) / 2, abs=1e-12)


@torch.no_grad()
def test_figure_script_manifold_against_a_loop():
    """The authors' figure script: the last block's output at the value positions 1, 3, ..., labelled
    log2(V - number of values seen before it), plain centred PCA; PC1 share = λ_max / Σλ."""
    model, batch = tiny_model(seed=5), batch_of(n=40)
    states = probes.collect_geometry_states(model, TASK, batch)
    got = probes.GEOMETRY_VARIANTS["value_manifold_pc1_share"]["value_positions_pre_final_norm_raw"].function(model, TASK, states)
    with record(model, names="blocks.1.hook_resid_post") as cache:
        model(batch.tokens)
    rows, labels = [], []
    for s in range(40):
        for t in range(1, TASK.seq_len, 2):
            rows.append(cache["blocks.1.hook_resid_post"][s, t].double())
            labels.append(math.log2(6 - (t - 1) // 2))
    x = torch.stack(rows)
    xc = x - x.mean(0)
    eig = torch.linalg.eigvalsh(xc.T @ xc / (len(rows) - 1))
    assert got["n_samples"] == len(rows) == 40 * 4
    assert got["value"] == pytest.approx(float(eig[-1] / eig.sum()), abs=1e-10)
    # the labels the variant used are the ones the script computes
    positions, index = probes.value_positions(batch.tokens, batch.sites, probes.hypothesis_tokens(TASK))
    assert positions.tolist() == [1, 3, 5, 7]
    assert torch.allclose(batch.entropy_bits[:, index].double().flatten(), torch.tensor(labels, dtype=torch.float64))


@torch.no_grad()
def test_ours_are_the_existing_definitions_exactly():
    model, batch = tiny_model(seed=2), batch_of()
    out = probes.geometry_variants(model, TASK, batch)
    ko = probes.layer_key_orthogonality(model, probes.hypothesis_tokens(TASK))
    assert out["key_orthogonality"]["hypothesis_abs"]["per_layer"] == [float(k.mean_abs_cosine) for k in ko]
    states = probes.collect_states(model, TASK, batch)
    assert out["value_manifold_pc1_share"]["sites_final_norm_zscored"]["value"] == probes.manifold_summary(states).pc1_share
    assert out["focusing_ratio"]["sites"]["value"] == probes.attention_focusing(model, TASK, batch).focusing_ratio


@torch.no_grad()
def test_uniform_attention_has_entropy_log2_allowed_keys_and_no_focusing():
    """W_Q = 0 makes every score 0, so every row is uniform over its t + 1 allowed keys."""
    model = tiny_model()
    for block in model.blocks:
        block.attn.W_Q.zero_()
    out = probes.geometry_variants(model, TASK, batch_of())["focusing_ratio"]
    rows = {"sites": TASK.sites, "final_position": torch.tensor([TASK.seq_len - 1]), "all_positions": torch.arange(1, TASK.seq_len)}
    for name, r in rows.items():
        expected = float(torch.log2(r.double() + 1).mean())
        assert out[name]["layer_entropy_bits"] == pytest.approx([expected, expected], abs=1e-6)
        assert out[name]["value"] == pytest.approx(0.0, abs=1e-6)


def test_hmm_and_hugging_face_report_the_reason_instead_of_crashing():
    hmm = HMMFiltering(n_steps=3)
    model = tiny_model(task=hmm, n_out=hmm.n_classes, tie_embeddings=False)
    out = probes.geometry_variants(model, hmm, hmm.sample(8, generator=torch.Generator().manual_seed(0)))
    assert "no hypothesis tokens" in out["key_orthogonality"]["hypothesis_abs"]["unavailable"]
    assert out["key_orthogonality"]["hypothesis_abs"]["value"] is None
    assert out["key_orthogonality"]["weight_columns_abs"]["value"] is not None
    assert "no value positions" in out["value_manifold_pc1_share"]["value_positions_final_norm_raw"]["unavailable"]
    assert out["focusing_ratio"]["sites"]["value"] is not None
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=12, n_positions=9, n_embd=16, n_layer=2, n_head=2, n_inner=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gpt2 = transformers.GPT2LMHeadModel(config).eval()
    out = probes.geometry_variants(gpt2, TASK, batch_of())
    for name in ("hypothesis_abs", "vocabulary_signed", "weight_columns_abs"):
        assert "AttentionInterface" in out["key_orthogonality"][name]["unavailable"]
    assert out["key_orthogonality"]["in_context_abs"]["value"] > 0
    assert "final norm" in out["value_manifold_pc1_share"]["sites_pre_final_norm_raw"]["unavailable"]
    assert out["value_manifold_pc1_share"]["head_values_zscored"]["value"] > 0


def _site_states(entropy_bits, features):
    """GeometryStates whose final-norm residual at the sites 0, 2, ..., 2(n_sites - 1) is ``features``
    [batch, n_sites, d]; the fields the sites/final-norm variants do not read are placeholders."""
    batch, n_sites, d = features.shape
    seq_len = 2 * n_sites
    sites = torch.arange(0, seq_len, 2)
    readout = torch.zeros(batch, seq_len, d, dtype=torch.float64)
    readout[:, sites] = features
    return probes.GeometryStates(
        tokens=torch.zeros(batch, seq_len, dtype=torch.long), entropy_bits=entropy_bits, sites=sites, readout=readout,
        final_residual=None, final_residual_missing="constructed", patterns=torch.zeros(1, batch, 1, seq_len, seq_len),
        k=torch.zeros(1, batch, seq_len, 1, 2), last_values=torch.zeros(batch, seq_len, 1, 2))


def _constructed(pc1_follows: str, seed: int = 0):
    """400 sequences x 5 sites; entropy falls with the site index i (5 - i) plus noise that is
    independent of everything else, so it varies within each position. The 4 features are one
    common signal plus small independent noise: the position (10 i) or the entropy (10 H)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(5, dtype=torch.float64).expand(400, 5)
    entropy = 5.0 - i + 0.3 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    signal = 10 * (i if pc1_follows == "position" else entropy)
    features = signal[..., None] + 0.1 * torch.randn(400, 5, 4, generator=g, dtype=torch.float64)
    return entropy, features


def test_a_pc1_that_follows_position_has_no_entropy_ordering_within_positions():
    entropy, features = _constructed("position")
    for name in ("sites_final_norm_zscored", "sites_final_norm_raw"):
        out = probes.GEOMETRY_VARIANTS["value_manifold_pc1_share"][name].function(None, TASK, _site_states(entropy, features))
        assert out["value"] > 0.95
        assert out["spearman"] > 0.9  # ordered by entropy only because entropy falls with position
        assert out["spearman_position"] < -0.95  # PC1 is oriented by entropy, which falls with position
        assert abs(out["partial_pearson_given_position"]) < 0.1  # within a position PC1 is noise; n = 2,000
        assert out["partial_undefined"] is None
    # the same states with PC1 following the entropy itself: the within-position correlation is high
    entropy, features = _constructed("entropy")
    out = probes.GEOMETRY_VARIANTS["value_manifold_pc1_share"]["sites_final_norm_zscored"].function(None, TASK, _site_states(entropy, features))
    assert out["partial_pearson_given_position"] > 0.95
    assert out["spearman_position"] < -0.9 and out["spearman"] > 0.99


def test_the_partial_is_none_with_the_reason_when_entropy_is_a_function_of_position():
    entropy, features = _constructed("entropy")
    exact = (5.0 - torch.arange(5, dtype=torch.float64)).expand(400, 5)  # H = 5 - i exactly
    out = probes.GEOMETRY_VARIANTS["value_manifold_pc1_share"]["sites_final_norm_zscored"].function(None, TASK, _site_states(exact, features))
    assert out["partial_pearson_given_position"] is None
    assert "entropy is a function of position" in out["partial_undefined"]
    assert out["spearman_position"] == pytest.approx(-out["spearman"], abs=1e-12)  # the ranks of H are those of -position
    # the same up to the last bit of some labels (float64 rounding, as in the task's entropy labels): still undefined
    rounded = exact.clone()
    rounded[::3] = torch.nextafter(rounded[::3], torch.full_like(rounded[::3], math.inf))
    out = probes.GEOMETRY_VARIANTS["value_manifold_pc1_share"]["sites_final_norm_zscored"].function(None, TASK, _site_states(rounded, features))
    assert out["partial_pearson_given_position"] is None and "entropy is a function of position" in out["partial_undefined"]
    # PC1 a function of position while the entropy is not: undefined too, for the other reason
    i = torch.arange(5, dtype=torch.float64).expand(400, 5)
    out = probes.GEOMETRY_VARIANTS["value_manifold_pc1_share"]["sites_final_norm_zscored"].function(
        None, TASK, _site_states(entropy, torch.stack([i, 2 * i], -1)))
    assert out["partial_pearson_given_position"] is None and "PC1 is a function of position" in out["partial_undefined"]


@torch.no_grad()
def test_every_manifold_variant_reports_its_position_control_on_a_tinygpt():
    """Without replacement H = log2(V - i) at key site i, so every variant's partial is undefined and
    its Spearman with position is minus its Spearman with entropy; with replacement the entropy varies
    within positions and every number is finite."""
    for with_replacement in (False, True):
        task = Bijection(n_values=6, n_pairs=5, with_replacement=with_replacement)
        out = probes.geometry_variants(tiny_model(task, seed=4), task, batch_of(task, n=48))["value_manifold_pc1_share"]
        assert len(out) == 10
        for name, v in out.items():
            assert v["unavailable"] is None, name
            assert math.isfinite(v["spearman"]) and math.isfinite(v["spearman_position"]), name
            if with_replacement:
                assert math.isfinite(v["partial_pearson_given_position"]) and v["partial_undefined"] is None, name
            else:
                assert v["partial_pearson_given_position"] is None and "function of position" in v["partial_undefined"], name
                assert v["spearman_position"] == pytest.approx(-v["spearman"], abs=1e-12), name
