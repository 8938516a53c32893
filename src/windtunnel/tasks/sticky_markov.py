"""The sticky Markov chain of Paper II (docs/theory.md §4.1, §4.3): sampling and the exact Bayes predictor.

A chain y_0 .. y_{T-1} over ``n_symbols`` symbols with circulant transitions is observed through
noisy embeddings x_t = mu_{y_{t-1}} + eps_t (t = 1 .. T-1); the label at input t is y_t. The exact
Bayes predictive p(y_t | x_1..x_t) is the forward filter of an HMM with hidden state z_t = y_{t-1}
and Gaussian emissions, followed by one transition step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch

from windtunnel._checks import (
    Problems,
    check_choice,
    check_generator,
    check_number,
    check_positive_int,
    must,
)
from windtunnel.tasks.filtering import forward_filter

__all__ = [
    "PredictionScores",
    "StickyBatch",
    "StickyFilterResult",
    "StickyMarkov",
    "score_predictions",
    "sticky_bayes_filter",
    "sticky_transition_matrix",
]

Normalization = Literal["reference", "exact"]
DrawOrder = Literal["vectorized", "reference"]
NORMALIZATIONS = ("reference", "exact")
DRAW_ORDERS = ("vectorized", "reference")
LOG2 = math.log(2.0)


@functools.cache
def _multinomial_is_an_exponential_race() -> bool:
    """Whether one-sample ``torch.multinomial`` on the CPU is argmax(p / q), q ~ Exp(1) i.i.d.

    Torch draws a single category that way (q from ``exponential_`` on the generator, one
    variate per category), so the reference draw order can take the variates of a whole chain
    in one call. Checked once per process against ``multinomial`` itself; when it does not hold
    (another torch version), the reference draw falls back to one ``multinomial`` per step.
    """
    p = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.3], dtype=torch.float32)
    one, other = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345)
    draws = [int(torch.multinomial(p, 1, generator=one)) for _ in range(64)]
    q = torch.empty(64, p.numel()).exponential_(1.0, generator=other)
    return draws == (p / q).argmax(-1).tolist() and torch.equal(one.get_state(), other.get_state())


def sticky_transition_matrix(
    n_symbols: int,
    self_prob: float,
    normalization: Normalization = "reference",
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Circulant sticky transition matrix P[i, j] = p(y_t = j | y_{t-1} = i).

    Off-diagonal weights are 1 / d(i, j) with the circular distance
    d(i, j) = min(|i - j|, n - |i - j|). Each row becomes (1 - s) w / sum(w) + s e_i with s =
    ``self_prob``.

    * ``"reference"``: the diagonal weight w_ii = s is still in the row when it is normalised, as
      in the authors' code, so the effective self-transition is s + (1 - s) s / sum(w) (0.3498 for
      n = 8, s = 0.3).
    * ``"exact"``: w_ii = 0, so the self-transition is exactly s.

    The reference code renormalises each row a second time; that is a no-op up to rounding and is
    repeated here so that float32 matrices match the reference bit for bit.

    Shapes: returns [n_symbols, n_symbols]; rows sum to 1.

    Raises:
        ValueError: on a bad ``n_symbols``, ``self_prob`` or ``normalization``.
    """
    problems = Problems("sticky_transition_matrix")
    for text in (
        check_positive_int("sticky_transition_matrix", "n_symbols", n_symbols, minimum=2),
        check_number(
            "sticky_transition_matrix", "self_prob", self_prob, low=0.0, high=1.0, high_open=True
        ),
        check_choice("sticky_transition_matrix", "normalization", normalization, NORMALIZATIONS),
    ):
        if text:
            problems.add_text(text)
    problems.raise_if_any()
    idx = torch.arange(n_symbols)
    diff = (idx[:, None] - idx[None, :]).abs()
    dist = torch.minimum(diff, n_symbols - diff)
    eye = torch.eye(n_symbols, dtype=dtype)
    weights = torch.where(dist > 0, 1.0 / dist.clamp_min(1).to(dtype), torch.zeros((), dtype=dtype))
    if normalization == "reference":
        weights = weights + eye * self_prob
    rows = weights / weights.sum(dim=1, keepdim=True) * (1.0 - self_prob) + eye * self_prob
    return rows / rows.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class PredictionScores:
    """How well a predictive distribution scores a label sequence, averaged over sites.

    Attributes:
        loss_nats: mean cross-entropy -ln p(y_t), nats.
        entropy_nats: mean entropy of the predictive distribution -sum_c p_c ln p_c, nats.
        accuracy: fraction of sites whose argmax equals the label.
    """

    loss_nats: float
    entropy_nats: float
    accuracy: float

    @property
    def loss_bits(self) -> float:
        """Mean cross-entropy in bits."""
        return self.loss_nats / LOG2

    @property
    def entropy_bits(self) -> float:
        """Mean predictive entropy in bits."""
        return self.entropy_nats / LOG2

    def to_dict(self) -> dict[str, float]:
        """Loss and entropy in nats and bits, and accuracy, as plain floats."""
        return {
            "loss_nats": self.loss_nats,
            "loss_bits": self.loss_bits,
            "entropy_nats": self.entropy_nats,
            "entropy_bits": self.entropy_bits,
            "accuracy": self.accuracy,
        }


def score_predictions(log_probs: torch.Tensor, targets: torch.Tensor) -> PredictionScores:
    """Mean cross-entropy, predictive entropy and top-1 accuracy of log-probabilities.

    Shapes: log_probs [..., n_symbols] (natural-log probabilities, or logits: they are
    log-softmaxed first), targets long [...]. Entropy uses 0 ln 0 = 0.

    Raises:
        ValueError: when the shapes do not fit.
    """
    if not isinstance(log_probs, torch.Tensor) or log_probs.shape[:-1] != targets.shape:
        raise ValueError(
            "score_predictions: log_probs must be [..., n_symbols] with leading shape equal to "
            f"targets {list(targets.shape)}; got {list(getattr(log_probs, 'shape', []))}."
        )
    logp = torch.log_softmax(log_probs.double(), dim=-1)
    probs = logp.exp()
    loss = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(probs * torch.where(probs > 0, logp, 0.0)).sum(-1)
    accuracy = (logp.argmax(-1) == targets).double()
    return PredictionScores(
        loss_nats=loss.mean().item(),
        entropy_nats=entropy.mean().item(),
        accuracy=accuracy.mean().item(),
    )


@dataclass(frozen=True)
class StickyFilterResult:
    """The exact Bayes filter of the sticky chain.

    Attributes:
        predictive_probs: p(y_t | x_1..x_t) at each input t, float64 [batch, seq_len - 1, n_symbols].
        filtered_probs: p(y_{t-1} | x_1..x_t), the belief about the symbol that produced x_t,
            float64 [batch, seq_len - 1, n_symbols].
        log_evidence_nats: ln p(x_1..x_{T-1}) up to the Gaussian normaliser, float64 [batch].
    """

    predictive_probs: torch.Tensor
    filtered_probs: torch.Tensor
    log_evidence_nats: torch.Tensor


def sticky_bayes_filter(
    inputs: torch.Tensor,
    means: torch.Tensor,
    transition: torch.Tensor,
    *,
    noise_std: float = 1.0,
    initial: torch.Tensor | None = None,
) -> StickyFilterResult:
    """Exact Bayes predictive of the sticky chain, batched and in log space, O(T n^2).

    With hidden state z_t = y_{t-1} and phi_t(z) = exp(-||x_t - mu_z||^2 / (2 sigma^2)):

        pi_1 = initial (uniform by default),  beta_t(z) ∝ pi_t(z) phi_t(z),
        p(y_t = c | x_1..x_t) = sum_z beta_t(z) P[z, c],  pi_{t+1} = that predictive.

    Computed in float64 with :func:`windtunnel.tasks.filtering.forward_filter`.

    Shapes: inputs [batch, n_inputs, d_embed], means [n_symbols, d_embed], transition
    [n_symbols, n_symbols], initial [n_symbols] (a distribution over y_0).

    Raises:
        ValueError: when shapes disagree or ``noise_std`` is not positive.
    """
    owner = "sticky_bayes_filter"
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or means.dim() != 2:
        raise ValueError(
            f"{owner}: inputs must be [batch, n_inputs, d_embed] and means [n_symbols, d_embed]; "
            f"got {list(getattr(inputs, 'shape', []))} and {list(means.shape)}."
        )
    n_symbols, d_embed = means.shape
    if inputs.shape[-1] != d_embed or transition.shape != (n_symbols, n_symbols):
        raise ValueError(
            f"{owner}: inputs [..., d_embed={d_embed}] and transition [{n_symbols}, {n_symbols}] "
            f"must match means {list(means.shape)}; got inputs {list(inputs.shape)} and "
            f"transition {list(transition.shape)}."
        )
    text = check_number(owner, "noise_std", noise_std, low=0.0, low_open=True)
    if text:
        raise ValueError(text)
    x = inputs.double()
    mu = means.to(device=x.device, dtype=torch.float64)
    log_trans = transition.to(device=x.device, dtype=torch.float64).log()
    if initial is None:
        log_init = torch.full(
            (n_symbols,), -math.log(n_symbols), dtype=torch.float64, device=x.device
        )
    else:
        log_init = initial.to(device=x.device, dtype=torch.float64).log()
    # ||x_t - mu_z||^2 for every t and z: [batch, n_inputs, n_symbols]
    sq_dist = (x.unsqueeze(-2) - mu).pow(2).sum(-1)
    result = forward_filter(log_init, log_trans, -0.5 * sq_dist / noise_std**2)
    log_pred = torch.logsumexp(result.log_filtered_probs.unsqueeze(-1) + log_trans, dim=-2)
    return StickyFilterResult(
        predictive_probs=log_pred.exp(),
        filtered_probs=result.log_filtered_probs.exp(),
        log_evidence_nats=result.log_evidence_nats,
    )


@dataclass(frozen=True)
class StickyBatch:
    """Sequences of the sticky chain with the exact Bayes predictive at every input.

    Attributes:
        inputs: x_t = mu_{y_{t-1}} + noise, float32 [batch, seq_len - 1, d_embed].
        targets: y_t, the label at input t, long [batch, seq_len - 1].
        previous: y_{t-1}, the symbol that produced x_t, long [batch, seq_len - 1].
        posterior: p(y_t | x_1..x_t), float64 [batch, seq_len - 1, n_symbols].
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    previous: torch.Tensor
    posterior: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class StickyMarkov:
    """Sticky Markov chain with Gaussian-embedded observations (docs/theory.md §4.1).

    Attributes:
        n_symbols: alphabet size n (8 in the paper).
        self_prob: nominal self-transition probability s (0.3).
        normalization: ``"reference"`` keeps the authors' normalisation (effective
            self-transition 0.3498 at n = 8, s = 0.3); ``"exact"`` gives exactly ``self_prob``.
        d_embed: dimension of the symbol means and inputs (20).
        noise_std: standard deviation of the isotropic Gaussian input noise (1.0).
        embed_seed: seed of the generator that draws the means mu ~ N(0, I), the same for every
            run seed (0).
        seq_len: chain length T; a sequence has T - 1 inputs (2000, so 1999 inputs).

    Raises:
        ValueError: naming every bad field at once.
    """

    n_symbols: int = 8
    self_prob: float = 0.3
    normalization: Normalization = "reference"
    d_embed: int = 20
    noise_std: float = 1.0
    embed_seed: int = 0
    seq_len: int = 2000

    _owner: ClassVar[str] = "StickyMarkov"

    def __post_init__(self) -> None:
        owner = self._owner
        problems = Problems(owner)
        for text in (
            check_positive_int(owner, "n_symbols", self.n_symbols, minimum=2),
            check_number(owner, "self_prob", self.self_prob, low=0.0, high=1.0, high_open=True),
            check_choice(owner, "normalization", self.normalization, NORMALIZATIONS),
            check_positive_int(owner, "d_embed", self.d_embed),
            check_number(owner, "noise_std", self.noise_std, low=0.0, low_open=True),
            check_positive_int(owner, "embed_seed", self.embed_seed, minimum=0),
            check_positive_int(owner, "seq_len", self.seq_len, minimum=2),
        ):
            if text:
                problems.add_text(text)
        problems.raise_if_any()

    @property
    def n_inputs(self) -> int:
        """Inputs (and labels) per sequence: seq_len - 1."""
        return self.seq_len - 1

    @cached_property
    def transition(self) -> torch.Tensor:
        """P[i, j] = p(y_t = j | y_{t-1} = i), float64 [n_symbols, n_symbols]."""
        return sticky_transition_matrix(self.n_symbols, self.self_prob, self.normalization)

    @cached_property
    def means(self) -> torch.Tensor:
        """Symbol means mu, float32 [n_symbols, d_embed], drawn on the CPU from ``embed_seed``.

        This is the reference draw: torch.randn(n_symbols, d_embed) right after seeding with
        ``embed_seed``, here through a private generator.
        """
        generator = torch.Generator().manual_seed(self.embed_seed)
        return torch.randn(self.n_symbols, self.d_embed, generator=generator)

    @cached_property
    def stationary(self) -> torch.Tensor:
        """Stationary distribution pi with pi P = pi, float64 [n_symbols] (uniform: P is circulant)."""
        eigvals, eigvecs = torch.linalg.eig(self.transition.T)
        vec = eigvecs[:, torch.argmin((eigvals - 1).abs())].real
        return vec / vec.sum()

    def conditional_entropy_nats(self) -> float:
        """H_min = H(Y_t | Y_{t-1}) = -sum_i pi_i sum_j P_ij ln P_ij, nats (1.8292 at the defaults).

        The authors average the row entropies, which equals this because pi is uniform. It is a
        lower bound on the Bayes risk, not the Bayes risk itself (docs/theory.md §4.3).
        """
        p = self.transition
        row_entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
        return float((self.stationary * row_entropy).sum())

    def conditional_entropy_bits(self) -> float:
        """H(Y_t | Y_{t-1}) in bits."""
        return self.conditional_entropy_nats() / LOG2

    def bayes_filter(self, inputs: torch.Tensor) -> StickyFilterResult:
        """The exact Bayes filter of this chain on ``inputs`` [batch, n_inputs, d_embed].

        y_0 is drawn uniformly, which is also the stationary distribution of the circulant P.
        """
        return sticky_bayes_filter(inputs, self.means, self.transition, noise_std=self.noise_std)

    def bayes_scores(self, batch: StickyBatch) -> PredictionScores:
        """Loss, entropy and accuracy of the exact Bayes predictor on ``batch``."""
        return score_predictions(batch.posterior.log(), batch.targets)

    def sample(
        self, batch_size: int, *, generator: torch.Generator, draw_order: DrawOrder = "vectorized"
    ) -> StickyBatch:
        """Draw ``batch_size`` chains with their exact Bayes predictive.

        ``draw_order="vectorized"`` draws y_0 for the whole batch, then one uniform per sequence
        and step (inverse-CDF transitions), then all noise at once. ``draw_order="reference"``
        reproduces the authors' global-RNG stream with ``generator`` in its place, one sequence
        after another: ``randint(n, (1,))`` for y_0, one ``multinomial(P[y], 1)`` per step with a
        float32 P, then ``randn(T - 1, d_embed)`` for the noise. A CPU generator seeded s then
        yields exactly the reference data of ``torch.manual_seed(s)``. (On the CPU the
        multinomial draws of a sequence are taken in one call, with the same random numbers and
        results; see :func:`_multinomial_is_an_exponential_race`.)

        Shapes: see :class:`StickyBatch`.

        Raises:
            ValueError: on a bad ``batch_size`` or ``draw_order``.
            TypeError: when ``generator`` is not a torch.Generator.
        """
        problems = Problems(f"{self._owner}.sample")
        for text in (
            check_positive_int(f"{self._owner}.sample", "batch_size", batch_size),
            check_choice(f"{self._owner}.sample", "draw_order", draw_order, DRAW_ORDERS),
        ):
            if text:
                problems.add_text(text)
        problems.raise_if_any()
        check_generator(f"{self._owner}.sample", generator, optional=False)
        return self._with_posterior(*self._draw(batch_size, generator, draw_order))

    def sample_each(
        self, generators: Sequence[torch.Generator], *, draw_order: DrawOrder = "vectorized"
    ) -> StickyBatch:
        """One chain per generator, as ``sample(1, generator=g)`` for each g, stacked.

        The exact posteriors of all chains come from one batched filter pass.

        Raises:
            ValueError: when ``generators`` is empty or ``draw_order`` is bad.
            TypeError: when an element of ``generators`` is not a torch.Generator.
        """
        owner = f"{self._owner}.sample_each"
        text = check_choice(owner, "draw_order", draw_order, DRAW_ORDERS)
        if text or not generators:
            raise ValueError(
                text
                or must(owner, "generators", "a non-empty sequence of torch.Generator", generators)
            )
        for i, g in enumerate(generators):
            check_generator(owner, g, optional=False, name=f"generators[{i}]")
        draws = [self._draw(1, g, draw_order) for g in generators]
        return self._with_posterior(
            torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
        )

    def _draw(
        self, batch_size: int, generator: torch.Generator, draw_order: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Symbols y_0..y_{T-1} [batch, seq_len] and standard-normal noise [batch, n_inputs, d_embed]."""
        device = generator.device
        if draw_order == "reference":
            chains, noise = [], []
            p32 = sticky_transition_matrix(
                self.n_symbols, self.self_prob, self.normalization, dtype=torch.float32
            ).to(device)
            race = device.type == "cpu" and _multinomial_is_an_exponential_race()
            for _ in range(batch_size):
                chain = [
                    int(torch.randint(self.n_symbols, (1,), generator=generator, device=device))
                ]
                if race:
                    # the draws of all steps at once: every step's multinomial takes n_symbols
                    # Exp(1) variates q and returns argmax P[y] / q, whatever y is, so the next
                    # symbol after each possible y is known before the chain is walked
                    q = torch.empty(self.seq_len - 1, self.n_symbols, device=device)
                    q.exponential_(1.0, generator=generator)
                    following = (p32.unsqueeze(0) / q.unsqueeze(1)).argmax(-1).tolist()
                    for row in following:  # [step][previous symbol] -> next symbol
                        chain.append(row[chain[-1]])
                else:
                    for _ in range(self.seq_len - 1):
                        chain.append(int(torch.multinomial(p32[chain[-1]], 1, generator=generator)))
                chains.append(chain)
                noise.append(
                    torch.randn(self.n_inputs, self.d_embed, generator=generator, device=device)
                )
            return torch.tensor(chains, device=device), torch.stack(noise)
        cdf = self.transition.to(device).cumsum(-1)
        cdf[:, -1] = 1.0  # guard against rounding: a uniform draw must land in some bin
        current = torch.randint(self.n_symbols, (batch_size,), generator=generator, device=device)
        uniforms = torch.rand(
            batch_size, self.seq_len - 1, generator=generator, device=device, dtype=torch.float64
        ).T.contiguous()  # [seq_len - 1, batch]: one contiguous row per step
        steps = [current]
        for t in range(self.seq_len - 1):
            current = torch.searchsorted(
                cdf[current], uniforms[t].unsqueeze(-1), right=True
            ).squeeze(-1)
            steps.append(current.clamp_max(self.n_symbols - 1))
        noise = torch.randn(
            batch_size, self.n_inputs, self.d_embed, generator=generator, device=device
        )
        return torch.stack(steps, dim=1), noise

    def _with_posterior(self, symbols: torch.Tensor, noise: torch.Tensor) -> StickyBatch:
        previous, targets = symbols[:, :-1], symbols[:, 1:]
        inputs = self.means.to(noise.device)[previous] + noise * self.noise_std
        posterior = self.bayes_filter(inputs).predictive_probs
        return StickyBatch(inputs=inputs, targets=targets, previous=previous, posterior=posterior)
