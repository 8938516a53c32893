"""Associative recall: token ids, layout, distinctness and the stored-value label."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from windtunnel.tasks import AssociativeRecall, Task


def _check_batch(task, batch):
    """Parse every sequence by hand and check it against the layout of docs/theory.md §5.3."""
    n, m = task.n_pairs, task.n_queries
    assert batch.tokens.shape[1] == task.seq_len
    assert batch.labels.shape == (batch.tokens.shape[0], m)
    assert batch.posterior.shape == (batch.tokens.shape[0], m, task.n_values)
    assert torch.all(batch.entropy_bits == 0)
    for row in batch.tokens.tolist():
        store = {}
        for i in range(n):
            marker, key, sep, value = row[4 * i : 4 * i + 4]
            assert (marker, sep) == (1, 4)
            assert 10 <= key < 10 + task.n_keys
            assert 10 + task.n_keys <= value < task.vocab_size
            store[key] = value
        assert len(store) == n  # keys distinct
        assert len(set(store.values())) == n  # values distinct
        rest = row[4 * n :]
        expected_rest = [2] * task.n_gap_filler
        for q in range(m):
            if q:
                expected_rest += [2] * task.n_query_filler
            expected_rest += [3, None, 0]
        assert len(rest) == len(expected_rest)
        assert all(e is None or r == e for r, e in zip(rest, expected_rest))
    for b, row in enumerate(batch.tokens.tolist()):
        store = {row[4 * i + 1]: row[4 * i + 3] for i in range(n)}
        queried = [row[s] for s in batch.sites.tolist()]
        assert len(set(queried)) == m
        for q, key in enumerate(queried):
            assert row[batch.sites[q] - 1] == 3  # the site is the token after QUERY
            assert key in store  # the queried key is in context
            value_id = store[key]
            assert batch.labels[b, q] + task.class_offset == value_id
            assert batch.posterior[b, q].argmax() + task.class_offset == value_id
            assert batch.posterior[b, q].sum() == 1 and batch.posterior[b, q].max() == 1


def test_default_sizes_and_ids():
    task = AssociativeRecall()
    assert isinstance(task, Task)
    assert task.vocab_size == 522
    assert (task.class_offset, task.n_classes) == (266, 256)
    # 64 * 4 + 32 + 3 * 3 + 2 * 16 = 329
    assert task.seq_len == 329
    assert task.sites.tolist() == [289, 308, 327]
    batch = task.sample(16, generator=torch.Generator().manual_seed(0))
    _check_batch(task, batch)


@given(
    n_pairs=st.integers(1, 6),
    extra_keys=st.integers(0, 3),
    extra_values=st.integers(0, 3),
    gap=st.integers(0, 3),
    query_gap=st.integers(0, 2),
    data=st.data(),
)
@settings(max_examples=25)
def test_small_sizes(n_pairs, extra_keys, extra_values, gap, query_gap, data):
    n_queries = data.draw(st.integers(1, n_pairs))
    task = AssociativeRecall(
        n_pairs=n_pairs,
        n_queries=n_queries,
        n_keys=n_pairs + extra_keys,
        n_values=n_pairs + extra_values,
        n_gap_filler=gap,
        n_query_filler=query_gap,
    )
    batch = task.sample(5, generator=torch.Generator().manual_seed(n_pairs))
    _check_batch(task, batch)


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_generator_determinism(seed):
    task = AssociativeRecall(n_pairs=8, n_queries=2, n_keys=16, n_values=12)
    first = task.sample(4, generator=torch.Generator().manual_seed(seed))
    second = task.sample(4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.labels, second.labels)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_pairs": 0}, r"AssociativeRecall\.n_pairs must be an int >= 1"),
        ({"n_queries": 0}, r"AssociativeRecall\.n_queries must be an int >= 1"),
        ({"n_keys": 0}, r"AssociativeRecall\.n_keys must be an int >= 1"),
        ({"n_values": "256"}, r"AssociativeRecall\.n_values must be an int >= 1"),
        ({"n_gap_filler": -1}, r"AssociativeRecall\.n_gap_filler must be an int >= 0"),
        ({"n_query_filler": -2}, r"AssociativeRecall\.n_query_filler must be an int >= 0"),
        ({"n_keys": 63}, r"AssociativeRecall\.n_keys must be >= n_pairs=64"),
        ({"n_values": 10}, r"AssociativeRecall\.n_values must be >= n_pairs=64"),
        ({"n_pairs": 2, "n_queries": 3}, r"AssociativeRecall\.n_queries must be <= n_pairs=2"),
        ({"n_keys": 10, "n_values": 10}, r"2 problems in AssociativeRecall"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AssociativeRecall(**kwargs)


def test_batch_size_error():
    with pytest.raises(ValueError, match=r"AssociativeRecall\.sample\.batch_size must be an int"):
        AssociativeRecall().sample(-3, generator=torch.Generator())
