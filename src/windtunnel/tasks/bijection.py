"""Bijection elimination: belief accumulation over a fresh random permutation (docs/theory.md §5.1).

Each sequence draws a uniform permutation pi of {0..V-1} and shows L (key, value) pairs with
v = pi(k). At every key the model must predict the key's value. The exact posterior is closed form:
a delta on the value of an already seen key, otherwise uniform over the values not yet used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from windtunnel._checks import Problems, check_choice, check_generator, check_positive_int
from windtunnel.tasks.base import Batch
from windtunnel.tasks.filtering import entropy_bits

__all__ = ["Bijection"]

_FORMATS = ("B", "A")


@dataclass(frozen=True, kw_only=True)
class Bijection:
    """The bijection wind tunnel, a :class:`~windtunnel.tasks.base.Task`.

    Latent: a fresh uniform permutation pi of {0..V-1} per sequence. Keys k_1..k_L are drawn
    without replacement (default) or i.i.d. uniform (``with_replacement=True``, the "sawtooth"
    control), and v_i = pi(k_i).

    Format B (default, ``vocab = 2V``; keys are ids 0..V-1, value v is id V+v)::

        k_1, V+v_1, k_2, V+v_2, ..., k_{L-1}, V+v_{L-1}, k_L          (seq_len = 2L-1)

    Sites are the key positions 2i (i = 0..L-1); the label at key position 2i is v_{i+1}, the value
    of that key, i.e. the NEXT token (the final key's value is a label only). The hypothesis slice
    is the value ids V..2V-1 (``class_offset = V``).

    Format A (``vocab = V``; keys and values share ids 0..V-1)::

        k_1, v_1, ..., k_L, v_L, q                                   (seq_len = 2L+1)

    with q uniform over the context keys. Sites are the key positions 2i (label v_{i+1}) and the
    query position 2L (label pi(q)). The slice is all V ids (``class_offset = 0``).

    Exact posterior at a key site, given the completed pairs O before it: a delta on the known
    value if the key is in O, else uniform over the V - |values(O)| unused values. Without
    replacement this gives H = log2(V - i) bits at key i (0-indexed); with replacement a repeated
    key gives 0 bits. The format-A query is always a delta (0 bits).

    Attributes:
        n_values: V, the size of the key and value alphabets.
        n_pairs: L, the number of (key, value) pairs; at most V without replacement.
        format: "B" (next-token value ids offset by V) or "A" (shared ids plus a query).
        with_replacement: draw keys i.i.d. instead of without replacement.
    """

    n_values: int = 20
    n_pairs: int = 19
    format: str = "B"
    with_replacement: bool = False

    def __post_init__(self) -> None:
        owner = "Bijection"
        problems = Problems(owner)
        for field, minimum in (("n_values", 1), ("n_pairs", 1)):
            text = check_positive_int(owner, field, getattr(self, field), minimum=minimum)
            if text:
                problems.add_text(text)
        text = check_choice(owner, "format", self.format, _FORMATS)
        if text:
            problems.add_text(text)
        if not isinstance(self.with_replacement, bool):
            problems.add("with_replacement", "a bool", self.with_replacement)
        if not problems.items and not self.with_replacement and self.n_pairs > self.n_values:
            problems.add(
                "n_pairs",
                f"<= n_values={self.n_values} when keys are drawn without replacement",
                self.n_pairs,
            )
        problems.raise_if_any()

    # Task protocol -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """2V in format B, V in format A."""
        return 2 * self.n_values if self.format == "B" else self.n_values

    @property
    def seq_len(self) -> int:
        """2L - 1 in format B, 2L + 1 in format A."""
        return 2 * self.n_pairs - 1 if self.format == "B" else 2 * self.n_pairs + 1

    @property
    def n_classes(self) -> int:
        """V: the hypotheses are the values."""
        return self.n_values

    @property
    def class_offset(self) -> int:
        """Token id of value 0: V in format B, 0 in format A."""
        return self.n_values if self.format == "B" else 0

    @property
    def soft_targets(self) -> bool:
        """False: trained on the hard label (its CE minimiser is still the posterior)."""
        return False

    @property
    def sites(self) -> torch.Tensor:
        """long [n_sites]: key positions 2i, plus the query position 2L in format A."""
        keys = torch.arange(0, 2 * self.n_pairs, 2)
        if self.format == "A":
            keys = torch.cat([keys, torch.tensor([2 * self.n_pairs])])
        return keys

    def sample(self, batch_size: int, *, generator: torch.Generator) -> Batch:
        """Draw ``batch_size`` fresh sequences with their exact posteriors.

        Args:
            batch_size: number of sequences B.
            generator: the only source of randomness.

        Returns:
            A :class:`Batch` with tokens long [batch, seq_len], sites long [n_sites], labels long
            [batch, n_sites] (value indices 0..V-1), posterior float64 [batch, n_sites, V] and
            entropy_bits float64 [batch, n_sites].

        Raises:
            ValueError: when ``batch_size`` is not a positive int.
            TypeError: when ``generator`` is not a torch.Generator.
        """
        text = check_positive_int("Bijection.sample", "batch_size", batch_size)
        if text:
            raise ValueError(text)
        check_generator("Bijection.sample", generator, optional=False)
        n_val, n_pair = self.n_values, self.n_pairs
        device = generator.device
        # A uniform permutation per row: argsort of i.i.d. uniforms (ties have probability ~0 and
        # would only bias the order, never break the bijection).
        perm = torch.rand(batch_size, n_val, generator=generator, device=device).argsort(dim=-1)
        if self.with_replacement:
            keys = torch.randint(n_val, (batch_size, n_pair), generator=generator, device=device)
        else:
            keys = torch.rand(batch_size, n_val, generator=generator, device=device).argsort(
                dim=-1
            )[:, :n_pair]
        values = perm.gather(1, keys)  # [batch, L]
        posterior = _key_posteriors(keys, values, n_val)  # [batch, L, V]
        labels = values
        if self.format == "B":
            tokens = torch.empty(batch_size, 2 * n_pair - 1, dtype=torch.long, device=device)
            tokens[:, 0::2] = keys
            tokens[:, 1::2] = n_val + values[:, :-1]
        else:
            pick = torch.randint(n_pair, (batch_size, 1), generator=generator, device=device)
            query = keys.gather(1, pick)  # [batch, 1]
            answer = values.gather(1, pick)  # pi(q)
            tokens = torch.empty(batch_size, 2 * n_pair + 1, dtype=torch.long, device=device)
            tokens[:, 0 : 2 * n_pair : 2] = keys
            tokens[:, 1 : 2 * n_pair : 2] = values
            tokens[:, -1:] = query
            delta = torch.nn.functional.one_hot(answer, n_val).to(torch.float64)
            posterior = torch.cat([posterior, delta], dim=1)
            labels = torch.cat([values, answer], dim=1)
        return Batch(
            tokens=tokens,
            sites=self.sites.to(device),
            labels=labels,
            posterior=posterior,
            entropy_bits=entropy_bits(posterior),
        )


def _key_posteriors(keys: torch.Tensor, values: torch.Tensor, n_values: int) -> torch.Tensor:
    """Closed-form posterior of pi(k_i) given the pairs before i; keys, values long [batch, L]."""
    key_hot = torch.nn.functional.one_hot(keys, n_values)  # [batch, L, V]
    value_hot = torch.nn.functional.one_hot(values, n_values)
    # Exclusive cumulative counts: what was observed strictly before pair i.
    keys_before = key_hot.cumsum(1) - key_hot
    values_before = value_hot.cumsum(1) - value_hot
    seen = keys_before.gather(2, keys.unsqueeze(-1)).squeeze(-1) > 0  # [batch, L]
    unused = (values_before == 0).to(torch.float64)
    uniform = unused / unused.sum(-1, keepdim=True)
    return torch.where(seen.unsqueeze(-1), value_hot.to(torch.float64), uniform)
