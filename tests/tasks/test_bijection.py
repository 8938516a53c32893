"""Bijection wind tunnel: closed-form posterior against enumeration of all permutations."""

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from windtunnel.tasks import Batch, Bijection, Task


def _enumerated_posterior(n_values, pairs, key):
    """p(pi(key) = v | pi(k) = v for (k, v) in pairs), counting all V! permutations exactly."""
    counts = [0] * n_values
    for perm in itertools.permutations(range(n_values)):
        if all(perm[k] == v for k, v in pairs):
            counts[perm[key]] += 1
    total = sum(counts)
    return [Fraction(c, total) for c in counts]


def _pairs_and_queries(task, batch, row):
    """(observed pairs before the site, queried key) for every site of one sequence."""
    tokens = batch.tokens[row].tolist()
    offset = task.class_offset
    n_pairs = task.n_pairs
    keys = tokens[0 : 2 * n_pairs : 2]
    values = [v - offset for v in tokens[1 : 2 * n_pairs : 2]]
    out = [(list(zip(keys[:i], values[:i])), keys[i]) for i in range(n_pairs)]
    if task.format == "A":
        out.append((list(zip(keys, values)), tokens[-1]))
    return out


@pytest.mark.parametrize("fmt", ["A", "B"])
@pytest.mark.parametrize(
    "with_replacement,n_values,n_pairs",
    [(False, 4, 4), (False, 5, 3), (False, 6, 5), (True, 4, 4), (True, 6, 5), (True, 3, 6)],
)
def test_posterior_equals_enumeration(fmt, with_replacement, n_values, n_pairs):
    task = Bijection(
        n_values=n_values, n_pairs=n_pairs, format=fmt, with_replacement=with_replacement
    )
    batch = task.sample(6, generator=torch.Generator().manual_seed(n_values * 10 + n_pairs))
    for row in range(6):
        for site, (pairs, key) in enumerate(_pairs_and_queries(task, batch, row)):
            expected = torch.tensor(
                [float(f) for f in _enumerated_posterior(n_values, pairs, key)], dtype=torch.float64
            )
            torch.testing.assert_close(batch.posterior[row, site], expected, rtol=0, atol=1e-15)
            # The label is the key's true value, which must be in the support.
            assert batch.posterior[row, site, batch.labels[row, site]] > 0


def test_with_replacement_sawtooth_entropy():
    """With replacement: H = 0 for a repeated key, log2(V - #distinct keys seen) for a new one."""
    task = Bijection(n_values=3, n_pairs=6, with_replacement=True)
    batch = task.sample(50, generator=torch.Generator().manual_seed(0))
    keys = batch.tokens[:, 0::2].tolist()
    for row in range(50):
        for i in range(6):
            before = set(keys[row][:i])
            expected = 0.0 if keys[row][i] in before else math.log2(3 - len(before))
            assert batch.entropy_bits[row, i].item() == pytest.approx(expected, abs=1e-12)


def test_with_replacement_the_posterior_averaged_over_the_current_key_is_uniform():
    """With replacement, a predictor that does not match the current key against the earlier
    ones can do no better than uniform (RESULTS.md, the position control with replacement): for
    every history of pairs, the exact posterior averaged over the i.i.d. uniform current key is
    1/V for every value. Every consistent history of up to 3 pairs, V = 4."""
    from windtunnel.tasks.bijection import _key_posteriors

    n_val = 4
    for n_hist in range(4):
        for hist_keys in itertools.product(range(n_val), repeat=n_hist):
            distinct = list(dict.fromkeys(hist_keys))
            for used in itertools.permutations(range(n_val), len(distinct)):
                value_of = dict(zip(distinct, used))
                # one row per current key k; the current value only matters for a repeated key
                keys = torch.tensor([[*hist_keys, k] for k in range(n_val)])
                values = torch.tensor([[value_of[h] for h in hist_keys] + [value_of.get(k, 0)] for k in range(n_val)])
                posterior = _key_posteriors(keys, values, n_val)[:, -1]  # [V current keys, V values]
                torch.testing.assert_close(posterior.mean(0), torch.full((n_val,), 1 / n_val, dtype=torch.float64),
                                           rtol=0, atol=1e-15)
                if n_hist:  # while the current key alone is not: a repeat is a delta
                    assert posterior.max() == 1.0


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_layout_and_labels(fmt):
    task = Bijection(n_values=13, n_pairs=11, format=fmt)
    batch = task.sample(64, generator=torch.Generator().manual_seed(3))
    assert isinstance(task, Task)
    assert isinstance(batch, Batch)
    n_sites = 11 + (fmt == "A")
    assert batch.tokens.shape == (64, task.seq_len)
    assert task.seq_len == (21 if fmt == "B" else 23)
    assert task.vocab_size == (26 if fmt == "B" else 13)
    assert batch.sites.tolist() == list(range(0, 22, 2))[:11] + ([22] if fmt == "A" else [])
    assert batch.labels.shape == (64, n_sites)
    assert batch.posterior.shape == (64, n_sites, 13)
    assert batch.posterior.dtype == torch.float64
    torch.testing.assert_close(
        batch.posterior.sum(-1), torch.ones(64, n_sites, dtype=torch.float64)
    )
    assert batch.tokens.min() >= 0 and batch.tokens.max() < task.vocab_size
    keys = batch.tokens[:, 0:22:2]
    # Keys drawn without replacement are distinct.
    assert all(len(set(row.tolist())) == 11 for row in keys)
    if fmt == "A":
        # The query is one of the context keys, and its answer is that key's value.
        for row in range(64):
            query = batch.tokens[row, -1].item()
            position = keys[row].tolist().index(query)
            assert batch.labels[row, -1] == batch.tokens[row, 2 * position + 1]
        assert torch.all(batch.entropy_bits[:, -1] == 0)
    # Without replacement, H = log2(V - i) at key i, in every sequence.
    expected = torch.tensor([math.log2(13 - i) for i in range(11)], dtype=torch.float64)
    torch.testing.assert_close(batch.entropy_bits[:, :11], expected.expand(64, 11))


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_labels_are_next_tokens_not_copies(fmt):
    """The copy-label bug (docs/theory.md §5.1, §11.1) puts a value's label at its own position."""
    task = Bijection(n_values=20, n_pairs=19, format=fmt)
    batch = task.sample(256, generator=torch.Generator().manual_seed(1))
    label_ids = batch.labels + task.class_offset  # [batch, n_sites] as token ids
    own = batch.tokens[:, batch.sites]
    if fmt == "B":
        # Keys and values have disjoint ids: no label may equal the token at its own position.
        assert not torch.any(label_ids == own)
    else:
        # Shared ids: a label may equal its own token only at a fixed point pi(k) = k; sites
        # must be key positions (even), never value positions.
        assert torch.all(batch.sites[: task.n_pairs] % 2 == 0)
    # Next-token convention: wherever the next token exists, it is the label.
    inside = batch.sites + 1 < task.seq_len
    assert torch.equal(label_ids[:, inside], batch.tokens[:, batch.sites[inside] + 1])
    # ... and the last key of format B is supervised although its value is never shown.
    if fmt == "B":
        assert batch.sites[-1] == task.seq_len - 1


def test_uniform_permutations():
    # Every value is equally likely at every key: the value counts are near-uniform.
    task = Bijection(n_values=4, n_pairs=4)
    batch = task.sample(8000, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(batch.labels[:, 0], minlength=4).double() / 8000
    torch.testing.assert_close(
        counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02, rtol=0
    )


@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(["A", "B"]))
def test_generator_determinism(seed, fmt):
    task = Bijection(n_values=7, n_pairs=5, format=fmt)
    first = task.sample(8, generator=torch.Generator().manual_seed(seed))
    second = task.sample(8, generator=torch.Generator().manual_seed(seed))
    for name in ("tokens", "sites", "labels", "posterior", "entropy_bits"):
        assert torch.equal(getattr(first, name), getattr(second, name))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_values": 0}, r"Bijection\.n_values must be an int >= 1"),
        ({"n_values": 2.5}, r"Bijection\.n_values"),
        ({"n_pairs": 0}, r"Bijection\.n_pairs must be an int >= 1"),
        ({"n_values": 5, "n_pairs": 6}, r"Bijection\.n_pairs must be <= n_values=5"),
        ({"format": "C"}, r"Bijection\.format must be one of 'B', 'A'"),
        ({"with_replacement": 1}, r"Bijection\.with_replacement must be a bool"),
        ({"n_values": 0, "format": "b"}, r"2 problems in Bijection"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bijection(**kwargs)


def test_batch_size_error():
    with pytest.raises(ValueError, match=r"Bijection\.sample\.batch_size must be an int >= 1"):
        Bijection().sample(0, generator=torch.Generator())
