"""Associative recall: random-access binding of distinct keys to distinct values (docs/theory.md §5.3).

The prompt stores N (key, value) pairs, then asks for the values of M stored keys after filler.
The posterior at a query is a delta on the stored value, so the metric that matters is accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windtunnel._checks import Problems, check_generator, check_positive_int
from windtunnel.tasks.base import Batch
from windtunnel.tasks.filtering import entropy_bits

__all__ = ["AssociativeRecall"]


@dataclass(frozen=True, kw_only=True)
class AssociativeRecall:
    """The associative-recall wind tunnel, a :class:`~windtunnel.tasks.base.Task`.

    Token ids: ``PAD`` 0, ``STORE`` 1, ``FILLER`` 2, ``QUERY`` 3, ``SEP`` 4 (5..9 unused), keys
    ``10 .. 10 + n_keys - 1``, values ``10 + n_keys .. 10 + n_keys + n_values - 1`` (vocab 522 by
    default). Layout::

        (STORE k_i SEP v_i) x n_pairs, FILLER x n_gap_filler,
        QUERY q_1 PAD, FILLER x n_query_filler, QUERY q_2 PAD, ..., QUERY q_M PAD

    Keys are distinct, values are distinct, and the M queried pairs are distinct stored pairs.
    Sites are the query-key positions (the token after each ``QUERY``); the label there is the
    stored value of that key as an index into the value slice (``class_offset = 10 + n_keys``),
    and the posterior is a delta on it.

    Attributes:
        n_pairs: N stored pairs (64).
        n_queries: M queries (3); at most N.
        n_keys: size of the key vocabulary (256); at least N.
        n_values: size of the value vocabulary (256); at least N.
        n_gap_filler: FILLER tokens between the store and the first query (32).
        n_query_filler: FILLER tokens between consecutive queries (16).
    """

    n_pairs: int = 64
    n_queries: int = 3
    n_keys: int = 256
    n_values: int = 256
    n_gap_filler: int = 32
    n_query_filler: int = 16

    PAD = 0
    STORE = 1
    FILLER = 2
    QUERY = 3
    SEP = 4
    KEY_OFFSET = 10

    def __post_init__(self) -> None:
        owner = "AssociativeRecall"
        problems = Problems(owner)
        for field in ("n_pairs", "n_queries", "n_keys", "n_values"):
            text = check_positive_int(owner, field, getattr(self, field))
            if text:
                problems.add_text(text)
        for field in ("n_gap_filler", "n_query_filler"):
            text = check_positive_int(owner, field, getattr(self, field), minimum=0)
            if text:
                problems.add_text(text)
        if not problems.items:
            for field in ("n_keys", "n_values"):
                if getattr(self, field) < self.n_pairs:
                    problems.add(
                        field,
                        f">= n_pairs={self.n_pairs} (distinct per pair)",
                        getattr(self, field),
                    )
            if self.n_queries > self.n_pairs:
                problems.add("n_queries", f"<= n_pairs={self.n_pairs}", self.n_queries)
        problems.raise_if_any()

    @property
    def value_offset(self) -> int:
        """Id of value 0 (266 by default)."""
        return self.KEY_OFFSET + self.n_keys

    @property
    def vocab_size(self) -> int:
        """10 + n_keys + n_values (522 by default)."""
        return self.value_offset + self.n_values

    @property
    def query_start(self) -> int:
        """Position of the first ``QUERY`` token: 4N + n_gap_filler."""
        return 4 * self.n_pairs + self.n_gap_filler

    @property
    def seq_len(self) -> int:
        """4N + n_gap_filler + 3M + n_query_filler (M - 1) (329 by default)."""
        return self.query_start + 3 * self.n_queries + self.n_query_filler * (self.n_queries - 1)

    @property
    def n_classes(self) -> int:
        """n_values: the hypotheses are the values."""
        return self.n_values

    @property
    def class_offset(self) -> int:
        """The value slice starts at ``value_offset``."""
        return self.value_offset

    @property
    def soft_targets(self) -> bool:
        """False: the posterior is a delta."""
        return False

    @property
    def sites(self) -> torch.Tensor:
        """long [n_queries]: the query-key positions."""
        stride = 3 + self.n_query_filler
        return self.query_start + 1 + stride * torch.arange(self.n_queries)

    def sample(self, batch_size: int, *, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` fresh stores and queries.

        Args:
            batch_size: number of sequences B.
            generator: the only source of randomness.

        Returns:
            A :class:`Batch`: tokens long [batch, seq_len], sites long [n_queries], labels long
            [batch, n_queries] (value indices), a one-hot posterior float64
            [batch, n_queries, n_values] and zero entropy_bits.

        Raises:
            ValueError: when ``batch_size`` is not a positive int.
            TypeError: when ``generator`` is not a torch.Generator.
        """
        text = check_positive_int("AssociativeRecall.sample", "batch_size", batch_size)
        if text:
            raise ValueError(text)
        check_generator("AssociativeRecall.sample", generator, optional=False)
        device = generator.device
        n, m = self.n_pairs, self.n_queries

        def distinct(pool: int, count: int) -> torch.Tensor:
            # The first `count` entries of a uniform random permutation per row.
            u = torch.rand(batch_size, pool, generator=generator, device=device)
            return u.argsort(dim=-1)[:, :count]

        keys = distinct(self.n_keys, n)  # [batch, N]
        values = distinct(self.n_values, n)
        asked = distinct(n, m)  # which stored pairs are queried, [batch, M]
        query_keys = keys.gather(1, asked)
        answers = values.gather(1, asked)

        tokens = torch.full(
            (batch_size, self.seq_len), self.FILLER, dtype=torch.long, device=device
        )
        store = torch.stack(
            [
                torch.full_like(keys, self.STORE),
                keys + self.KEY_OFFSET,
                torch.full_like(keys, self.SEP),
                values + self.value_offset,
            ],
            dim=-1,
        ).reshape(batch_size, 4 * n)  # [batch, 4N]
        tokens[:, : 4 * n] = store
        sites = self.sites.to(device)
        tokens[:, sites - 1] = self.QUERY
        tokens[:, sites] = query_keys + self.KEY_OFFSET
        tokens[:, sites + 1] = self.PAD
        posterior = torch.nn.functional.one_hot(answers, self.n_values).to(torch.float64)
        return Batch(
            tokens=tokens,
            sites=sites,
            labels=answers,
            posterior=posterior,
            entropy_bits=entropy_bits(posterior),
        )
