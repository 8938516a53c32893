"""HMM filtering: accumulation and transport through a fresh HMM read from the prompt (docs/theory.md §5.2).

Each sequence gets a fresh hidden Markov model on a 0.01 grid, written into the prompt as a token
header, followed by its observations. At every observation the model must report the filtered state
posterior p(s_t | o_1:t), computed exactly by the shared forward filter (the HMM wind tunnel of
arXiv 2512.22471).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from windtunnel._checks import (
    Problems,
    check_generator,
    check_number,
    check_positive_int,
    describe_tensor,
    must,
)
from windtunnel.tasks.base import Batch, move_tensor
from windtunnel.tasks.filtering import (
    _min_positive,
    _probability_filter,
    entropy_bits,
    forward_filter,
)

__all__ = [
    "HMMBatch",
    "HMMFiltering",
    "HMMPosterior",
    "hmm_posterior",
    "quantise_rows",
    "windowed_posterior",
]


@dataclass(frozen=True)
class HMMPosterior:
    """Exact beliefs of an HMM with a uniform initial state, conditioned as named.

    :func:`hmm_posterior` returns the three as views of its buffers: ``predicted_probs[:, 1:]``
    and ``next_state_probs[:, :-1]`` are the same memory (predicted_t+1 = next_state_t). Clone
    before writing into either.

    Attributes:
        filtered_probs: p(s_t | o_1:t), float64 [batch, n_steps, n_states]. The training target.
        predicted_probs: p(s_t | o_1:t-1), float64 [batch, n_steps, n_states]; uniform at t = 1
            (no transition before o_1).
        next_state_probs: p(s_t+1 | o_1:t) = filtered_t^T T, float64 [batch, n_steps, n_states]
            (docs/theory.md §5.2's "predicted belief").
    """

    filtered_probs: torch.Tensor
    predicted_probs: torch.Tensor
    next_state_probs: torch.Tensor


@dataclass(frozen=True)
class HMMBatch(Batch):
    """A :class:`Batch` of HMM sequences that also carries the latents and all beliefs.

    ``posterior`` is ``filtered_probs`` at the read positions; ``labels`` are the true states.

    Attributes:
        transition_cents: T in integer cents, long [batch, n_states, n_states]; rows sum to 100,
            T[i, j] = 100 p(s_t+1 = j | s_t = i).
        emission_cents: E in integer cents, long [batch, n_states, n_symbols]; rows sum to 100,
            E[i, o] = 100 p(o_t = o | s_t = i).
        states: s_1..s_K, long [batch, n_steps].
        observations: o_1..o_K as symbols 0..n_symbols-1, long [batch, n_steps].
        predicted_probs: p(s_t | o_1:t-1), float64 [batch, n_steps, n_states].
        next_state_probs: p(s_t+1 | o_1:t), float64 [batch, n_steps, n_states].
    """

    transition_cents: torch.Tensor
    emission_cents: torch.Tensor
    states: torch.Tensor
    observations: torch.Tensor
    predicted_probs: torch.Tensor
    next_state_probs: torch.Tensor

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> HMMBatch:
        """The same batch, every tensor on ``device`` (``non_blocking``: as :meth:`Batch.to`)."""
        moved = {f.name: move_tensor(getattr(self, f.name), device, non_blocking) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **moved)


@dataclass(frozen=True, kw_only=True)
class HMMFiltering:
    """The HMM filtering wind tunnel, a :class:`~windtunnel.tasks.base.Task` with soft targets.

    Generator (per sequence): every row of T [S, S] and E [S, O] is drawn from Dirichlet(1),
    floored at ``floor``, renormalised, and quantised to the ``grid`` by :func:`quantise_rows`.
    s_1 is uniform, o_t ~ E[s_t], s_t+1 ~ T[s_t]. Posteriors use the quantised matrices.

    Tokens (defaults: S = O = 5, vocab 105, 53-token header, seq_len 53 + 2K):

    * probability p on the grid: id ``round((p - floor) / grid)``, so 0.05..1.00 -> 0..95 for the
      default floor 0.05 and grid 0.01 (``n_prob_tokens`` ids);
    * markers ``[TRANS] [EMIT] [SEP] [OBS]``: the next four ids (96..99 by default);
    * symbols 0..O-1: ids ``n_prob_tokens + 4 + o`` (100..104 by default).

    Layout: ``[TRANS] T row-major [EMIT] E row-major [SEP]`` (S^2 + SO + 3 tokens), then
    ``[OBS] o_1 ... [OBS] o_K``. The read position for step t (0-indexed) is the symbol token at
    S^2 + SO + 4 + 2t (54 + 2t by default). ``n_steps`` only appends steps, so tasks with
    different K share the token format (length generalisation).

    Sites are the read positions; labels are the true states s_t; the hypothesis slice is the
    model's S state logits (``class_offset = 0``: the HMM models use a separate ``Linear(d, S)``
    head, not the token vocabulary).

    Attributes:
        n_states: S.
        n_symbols: O.
        n_steps: K, observations per sequence.
        floor: smallest probability; floor * max(S, O) must be <= 1.
        grid: the probability quantum; 1 and floor must be multiples of it.
    """

    n_states: int = 5
    n_symbols: int = 5
    n_steps: int = 20
    floor: float = 0.05
    grid: float = 0.01

    def __post_init__(self) -> None:
        owner = "HMMFiltering"
        problems = Problems(owner)
        for field in ("n_states", "n_symbols", "n_steps"):
            text = check_positive_int(owner, field, getattr(self, field))
            if text:
                problems.add_text(text)
        for field in ("floor", "grid"):
            text = check_number(
                owner, field, getattr(self, field), low=0.0, high=1.0, low_open=True
            )
            if text:
                problems.add_text(text)
        if not problems.items:
            if not _is_integer(1.0 / self.grid):
                problems.add("grid", "1/n for an integer n", self.grid)
            elif not _is_integer(self.floor / self.grid):
                problems.add("floor", f"a multiple of grid={self.grid}", self.floor)
            width = max(self.n_states, self.n_symbols)
            if self.floor * width > 1.0 + 1e-12:
                problems.add(
                    "floor",
                    f"<= 1/max(n_states, n_symbols) = 1/{width} so that rows can sum to 1",
                    self.floor,
                )
        problems.raise_if_any()

    # Derived sizes ---------------------------------------------------------------------------

    @property
    def units(self) -> int:
        """Grid units in probability 1 (100 by default): rows sum to this in integers."""
        return round(1.0 / self.grid)

    @property
    def floor_units(self) -> int:
        """The floor in grid units (5 by default)."""
        return round(self.floor / self.grid)

    @property
    def n_prob_tokens(self) -> int:
        """Probability ids floor..1 on the grid (96 by default)."""
        return self.units - self.floor_units + 1

    @property
    def trans_id(self) -> int:
        """Id of ``[TRANS]`` (96 by default); ``[EMIT]``, ``[SEP]``, ``[OBS]`` follow."""
        return self.n_prob_tokens

    @property
    def emit_id(self) -> int:
        """Id of ``[EMIT]``."""
        return self.n_prob_tokens + 1

    @property
    def sep_id(self) -> int:
        """Id of ``[SEP]``."""
        return self.n_prob_tokens + 2

    @property
    def obs_id(self) -> int:
        """Id of ``[OBS]``."""
        return self.n_prob_tokens + 3

    @property
    def symbol_offset(self) -> int:
        """Id of symbol 0 (100 by default)."""
        return self.n_prob_tokens + 4

    @property
    def header_len(self) -> int:
        """S^2 + SO + 3 (53 by default)."""
        return self.n_states**2 + self.n_states * self.n_symbols + 3

    @property
    def step_layout(self) -> tuple[int, int]:
        """(header_len, 2): a fixed header, then 2 tokens ([OBS], symbol) per step; the layout
        ``TrainConfig.position_shift`` moves along the position table."""
        return self.header_len, 2

    # Task protocol ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """``symbol_offset + O`` (105 by default)."""
        return self.symbol_offset + self.n_symbols

    @property
    def seq_len(self) -> int:
        """header_len + 2K."""
        return self.header_len + 2 * self.n_steps

    @property
    def n_classes(self) -> int:
        """S: the hypotheses are the hidden states."""
        return self.n_states

    @property
    def class_offset(self) -> int:
        """0: the slice is the model's S state logits."""
        return 0

    @property
    def soft_targets(self) -> bool:
        """True: train on the filtered posterior (soft-label CE)."""
        return True

    @property
    def sites(self) -> torch.Tensor:
        """long [n_steps]: read positions header_len + 1 + 2t."""
        return self.header_len + 1 + 2 * torch.arange(self.n_steps)

    # Sampling --------------------------------------------------------------------------------

    def sample_parameters(
        self, batch_size: int, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh quantised (transition_cents, emission_cents), long [batch, S, S] and [batch, S, O].

        Dirichlet(1, ..., 1) rows are normalised Exponential(1) draws, -log(1 - U) with U uniform
        on [0, 1) from ``generator``; then floor, renormalise and :func:`quantise_rows`.

        Raises:
            ValueError: when ``batch_size`` is not a positive int.
            TypeError: when ``generator`` is not a torch.Generator.
        """
        text = check_positive_int("HMMFiltering.sample", "batch_size", batch_size)
        if text:
            raise ValueError(text)
        check_generator("HMMFiltering.sample_parameters", generator, optional=False)
        n_s, n_o = self.n_states, self.n_symbols
        device = generator.device

        def rows(width: int) -> torch.Tensor:
            u = torch.rand(
                batch_size, n_s, width, generator=generator, device=device, dtype=torch.float64
            )
            draws = -torch.log1p(-u)
            probs = draws / draws.sum(-1, keepdim=True)
            probs = probs.clamp_min(self.floor)
            probs = probs / probs.sum(-1, keepdim=True)
            return quantise_rows(probs, floor=self.floor, grid=self.grid)

        transition = rows(n_s)
        emission = rows(n_o)
        return transition, emission

    def sample(self, batch_size: int, *, generator: torch.Generator) -> HMMBatch:
        """Draw ``batch_size`` fresh HMMs, their paths, tokens and exact beliefs.

        Args:
            batch_size: number of sequences B.
            generator: the only source of randomness.

        Returns:
            An :class:`HMMBatch`: tokens long [batch, seq_len], sites long [n_steps], labels (the
            true states) long [batch, n_steps], posterior = filtered_probs float64
            [batch, n_steps, n_states], entropy_bits float64 [batch, n_steps], plus latents and
            the predicted beliefs.

        Raises:
            ValueError: when ``batch_size`` is not a positive int.
            TypeError: when ``generator`` is not a torch.Generator.
        """
        check_generator("HMMFiltering.sample", generator, optional=False)
        transition, emission = self.sample_parameters(batch_size, generator=generator)
        device = transition.device
        units = self.units
        # Categorical draws in integers: with r uniform on {0..units-1}, the index of the first
        # cumulative sum exceeding r has probability cents[j] / units exactly.
        trans_cum = transition.cumsum(-1)
        emit_cum = emission.cumsum(-1)
        batch_idx = torch.arange(batch_size, device=device)

        def draw(cum_rows: torch.Tensor) -> torch.Tensor:
            r = torch.randint(units, (batch_size, 1), generator=generator, device=device)
            return (cum_rows <= r).sum(-1)

        states = torch.empty(batch_size, self.n_steps, dtype=torch.long, device=device)
        observations = torch.empty_like(states)
        state = torch.randint(self.n_states, (batch_size,), generator=generator, device=device)
        for t in range(self.n_steps):  # time is sequential; the batch is vectorised
            if t > 0:
                state = draw(trans_cum[batch_idx, state])
            states[:, t] = state
            observations[:, t] = draw(emit_cum[batch_idx, state])

        beliefs = hmm_posterior(transition, emission, observations, units=units)
        tokens = self.encode(transition, emission, observations)
        return HMMBatch(
            tokens=tokens,
            sites=self.sites.to(device),
            labels=states,
            posterior=beliefs.filtered_probs,
            entropy_bits=entropy_bits(beliefs.filtered_probs),
            transition_cents=transition,
            emission_cents=emission,
            states=states,
            observations=observations,
            predicted_probs=beliefs.predicted_probs,
            next_state_probs=beliefs.next_state_probs,
        )

    def auxiliary_targets(self, batch: HMMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted belief p(s_t | o_1:t-1) at the ``[OBS]`` token before each o_t.

        An optional second training target (``TrainConfig.aux_loss_weight``): it supervises the
        transport half of the filter update, α_{t-1}ᵀ T, at the position just before the
        observation arrives. At t = 1 the target is uniform (no transition before o_1). Scoring is
        unchanged: evaluation reads only the read positions.

        Returns:
            (positions long [K], the ``[OBS]`` tokens at ``sites - 1``; targets float64
            [batch, K, S], ``batch.predicted_probs``).
        """
        return batch.sites - 1, batch.predicted_probs

    def encode(
        self,
        transition_cents: torch.Tensor,
        emission_cents: torch.Tensor,
        observations: torch.Tensor,
    ) -> torch.Tensor:
        """Token ids long [batch, header_len + 2 * n_obs] for the given HMMs and observations.

        Shapes: transition_cents [batch, S, S], emission_cents [batch, S, O] in grid units,
        observations [batch, n_obs] (any n_obs; the layout is the same for every K).
        """
        batch = observations.shape[0]
        device = observations.device

        def marker(token_id: int) -> torch.Tensor:
            return torch.full((batch, 1), token_id, dtype=torch.long, device=device)

        obs = torch.stack(
            [
                torch.full_like(observations, self.obs_id),
                observations + self.symbol_offset,
            ],
            dim=-1,
        ).reshape(batch, -1)  # [batch, 2 * n_obs]: OBS o_1 OBS o_2 ...
        return torch.cat(
            [
                marker(self.trans_id),
                transition_cents.reshape(batch, -1) - self.floor_units,
                marker(self.emit_id),
                emission_cents.reshape(batch, -1) - self.floor_units,
                marker(self.sep_id),
                obs,
            ],
            dim=1,
        )


def hmm_posterior(
    transition_cents: torch.Tensor,
    emission_cents: torch.Tensor,
    observations: torch.Tensor,
    *,
    units: int = 100,
) -> HMMPosterior:
    """Exact beliefs of categorical HMMs with a uniform initial state, by the shared forward filter.

    filtered_1 ∝ pi_0 ⊙ E[:, o_1] with pi_0 uniform (no transition before o_1);
    filtered_t ∝ (filtered_{t-1}^T T) ⊙ E[:, o_t]; next_state_t = filtered_t^T T.

    Shapes: transition_cents [batch, S, S], emission_cents [batch, S, O] (integers or floats in
    grid units; rows sum to ``units``), observations long [batch, n_steps] in 0..O-1.

    The grid probabilities need no logs: the recursion runs in probability space (the filter
    module's ``_probability_filter``, one pass for all three beliefs, block by block over the
    batch), zero cents included: a zero probability is exact there. Only where some positive
    belief would fall below the smallest normal float64 (2.2e-308, far beyond what grid HMMs of
    moderate length reach) does it run in log space instead (:func:`forward_filter`); both agree
    with path enumeration to rounding.

    Returns:
        An :class:`HMMPosterior` with float64 [batch, n_steps, S] tensors. They are permuted views
        of time-major buffers (not contiguous), and ``predicted_probs`` and ``next_state_probs``
        share one buffer (offset by a step): clone before writing into either.

    Raises:
        ValueError: naming the argument whose shape, dtype or symbol range does not fit.
    """
    _check_hmm("hmm_posterior", transition_cents, emission_cents, observations)
    batch, n_states = transition_cents.shape[:2]
    n_steps = observations.shape[-1]
    # Time-major, batch-last layouts for the recursion, which reads its blocks of sequences from
    # these views as it goes: T as [from, to, batch], E as [symbol, state, batch], and
    # lik[t, s, b] = E[b, s, o_bt] / units, [n_steps, S, batch], gathered block by block.
    lik = torch.empty(n_steps, n_states, batch, dtype=torch.float64, device=observations.device)
    if transition_cents.is_floating_point() or emission_cents.is_floating_point():
        smallest = min(_min_positive(transition_cents), _min_positive(emission_cents)) / units
    else:  # integer cents: the smallest positive one is at least 1 (negative ones are declined)
        lowest = min(transition_cents.min().item(), emission_cents.min().item())
        smallest = 1 / units if lowest >= 0 else -1.0
    result = _probability_filter(
        torch.tensor(1.0 / n_states, dtype=torch.float64, device=lik.device),
        transition_cents.permute(1, 2, 0),
        lik,
        n_predicted=n_steps + 1,
        with_norms=False,
        min_factor=smallest,
        emission=emission_cents.permute(2, 1, 0),
        observations=observations.T,
        divisor=units,
    )
    if result is None:  # beliefs below the smallest normal float64: the exact log-space recursion
        trans_probs = transition_cents.to(torch.float64) / units  # [batch, S, S]
        emit_probs = emission_cents.to(torch.float64) / units  # [batch, S, O]
        return _log_space_posterior(trans_probs, emit_probs, observations)
    # [n_steps (+ 1), S, batch] -> [batch, n_steps, S], permuted views. Row t + 1 of the
    # predicted beliefs, filtered_t @ T, is both predicted_{t+1} and next_state_t.
    predicted = result.predicted_probs.permute(2, 0, 1)
    return HMMPosterior(
        filtered_probs=result.filtered_probs.permute(2, 0, 1),
        predicted_probs=predicted[:, :n_steps],
        next_state_probs=predicted[:, 1:],
    )


def _log_space_posterior(
    trans_probs: torch.Tensor, emit_probs: torch.Tensor, observations: torch.Tensor
) -> HMMPosterior:
    """:func:`hmm_posterior` by :func:`forward_filter` on logs, for zero or extreme probabilities.

    Shapes: trans_probs float64 [batch, S, S], emit_probs float64 [batch, S, O], observations
    long [batch, n_steps].
    """
    n_states = trans_probs.shape[-1]
    log_t = trans_probs.log()
    # log p(o_t | s) for each t: gather the observed column of E, [batch, n_steps, S].
    index = observations.unsqueeze(-2).expand(*observations.shape[:-1], n_states, -1)
    log_lik = emit_probs.log().gather(-1, index).transpose(-1, -2)
    log_init = torch.full(
        (n_states,), -math.log(n_states), dtype=torch.float64, device=log_t.device
    )
    result = forward_filter(log_init, log_t, log_lik)
    filtered = result.log_filtered_probs.exp()
    return HMMPosterior(
        filtered_probs=filtered,
        predicted_probs=result.log_predicted_probs.exp(),
        # p(s_t+1 | o_1:t) = sum_s p(s_t = s | o_1:t) T[s, :]; [batch, n_steps, S] @ [batch, S, S]
        next_state_probs=filtered @ trans_probs,
    )


def windowed_posterior(
    transition_cents: torch.Tensor,
    emission_cents: torch.Tensor,
    observations: torch.Tensor,
    *,
    window: int,
    units: int = 100,
    transported: bool = False,
) -> torch.Tensor:
    """Filtered beliefs of a filter that remembers only the last ``window`` observations.

    At step t the belief is the exact filter run on o_{t-window+1} .. o_t from a uniform state
    (no transition before the window's first observation), so ``window = 1`` is the
    current-observation-only posterior (normalised column E[:, o_t]) and ``window >= n_steps`` is
    the exact filter. With ``transported=True`` the forgotten state is one step further back:
    the window starts from uᵀT (u uniform), the belief of a filter that knows T and that the
    chain has moved but has forgotten where it was. ``window = 1, transported=True`` is then
    (uᵀT) ⊙ E[:, o_t], normalised: a memoryless filter, near which our small CPU models
    plateau (RESULTS.md). Steps t <= window see the whole prefix and get the exact filter in both
    modes. A ladder of reference points between the uniform floor and the exact
    posterior: the entropy MAE of the window-w beliefs says how much inference horizon a model's
    calibration corresponds to (RESULTS.md: on K = 20 HMMs, w = 1, 2, 3, 4 give about 0.16,
    0.047, 0.014 and 0.005 bits).

    Shapes: as :func:`hmm_posterior`: transition_cents [batch, S, S], emission_cents [batch, S, O],
    observations long [batch, n_steps].

    Returns:
        float64 [batch, n_steps, S].

    Raises:
        ValueError: when ``window`` is not a positive int, or as :func:`hmm_posterior`.
    """
    owner = "windowed_posterior"
    text = check_positive_int(owner, "window", window)
    if text:
        raise ValueError(text)
    if not isinstance(transported, bool):
        raise ValueError(f"{owner}: transported must be a bool; got {transported!r}.")
    _check_hmm(owner, transition_cents, emission_cents, observations)
    # Steps t <= window see the whole prefix: the exact filter (a contiguous copy, no aliasing).
    exact = hmm_posterior(transition_cents, emission_cents, observations, units=units)
    beliefs = exact.filtered_probs.contiguous()
    batch, n_steps = observations.shape
    if window >= n_steps:
        return beliefs
    # Every later step: one filter per (sequence, window end), batched.
    windows = observations.unfold(1, window, 1)[:, 1:]  # [batch, n_windows, window]
    n_windows = windows.shape[1]
    if transported:
        # A w-step recursion in probability space from uᵀT; windows are short, so the per-step
        # normalisation is all the rescaling needed.
        trans = transition_cents.to(torch.float64) / units  # [batch, S, S]
        emit_t = emission_cents.to(torch.float64).transpose(1, 2) / units  # [batch, O, S]
        last = trans.mean(1, keepdim=True).expand(-1, n_windows, -1)  # uᵀT [batch, n_windows, S]
        for j in range(window):
            if j > 0:
                last = last @ trans
            last = last * torch.gather(emit_t, 1, windows[..., j, None].expand(-1, -1, emit_t.shape[-1]))
            last = last / last.sum(-1, keepdim=True)
    else:
        def repeat(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(n_windows, dim=0)

        last = hmm_posterior(
            repeat(transition_cents), repeat(emission_cents), windows.reshape(-1, window), units=units
        ).filtered_probs[:, -1]
    beliefs[:, window:] = last.reshape(batch, n_windows, -1)
    return beliefs


def quantise_rows(probs: torch.Tensor, *, floor: float = 0.05, grid: float = 0.01) -> torch.Tensor:
    """Quantise probability rows to integer grid units that sum exactly to 1/grid (docs/theory.md §5.2).

    Rule: u = round(p / grid); raise entries below floor/grid to floor/grid; then, while a row sums
    to less than 1/grid add 1 to its smallest entry, and while it sums to more subtract 1 from its
    largest entry (first index on ties in both cases). All arithmetic after the rounding is in
    integers, so row sums are exact.

    Shapes: probs float [..., width], rows summing to 1, with floor * width <= 1.

    Returns:
        long [..., width], every entry in floor/grid .. 1/grid and every row summing to 1/grid.

    Raises:
        ValueError: when ``probs`` is not a floating tensor or floor * width > 1.
    """
    owner = "quantise_rows"
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() or probs.dim() < 1:
        raise ValueError(
            f"{owner}: probs must be a floating-point tensor of shape [..., width]; "
            f"got {describe_tensor(probs)}."
        )
    if floor * probs.shape[-1] > 1.0 + 1e-12:
        raise ValueError(
            must(
                owner, "floor", f"<= 1/width = 1/{probs.shape[-1]} so that rows can sum to 1", floor
            )
        )
    units = round(1.0 / grid)
    floor_units = round(floor / grid)
    cents = torch.round(probs.to(torch.float64) * units).to(torch.long).clamp_min(floor_units)
    width = cents.shape[-1]
    flat = cents.reshape(-1, width).clone()
    # Each pass fixes one unit per row that still needs it; deviations are at most ~width units.
    while True:
        total = flat.sum(-1)
        low = total < units
        high = total > units
        if not (low.any() or high.any()):
            break
        rows = torch.arange(flat.shape[0], device=flat.device)
        step = low.long() - high.long()
        # argmin/argmax return the first index on ties.
        column = torch.where(low, flat.argmin(-1), flat.argmax(-1))
        flat[rows, column] += step
    return flat.reshape(cents.shape)


def _check_hmm(owner: str, transition: Any, emission: Any, observations: Any) -> None:
    """Raise ValueError unless the shapes are [batch, S, S], [batch, S, O], long [batch, K]."""
    if (
        not isinstance(transition, torch.Tensor)
        or transition.dim() != 3
        or (transition.shape[-1] != transition.shape[-2])
    ):
        raise ValueError(
            f"{owner}: transition_cents must be a tensor of shape [batch, n_states, n_states]; "
            f"got {describe_tensor(transition)}."
        )
    batch, n_states = transition.shape[:2]
    if (
        not isinstance(emission, torch.Tensor)
        or emission.dim() != 3
        or (tuple(emission.shape[:2]) != (batch, n_states))
    ):
        raise ValueError(
            f"{owner}: emission_cents must be a tensor of shape [batch, n_states, n_symbols] = "
            f"[{batch}, {n_states}, n_symbols]; got {describe_tensor(emission)}."
        )
    n_symbols = emission.shape[-1]
    if (
        not isinstance(observations, torch.Tensor)
        or observations.dtype != torch.long
        or observations.dim() != 2
        or observations.shape[0] != batch
        or (observations.numel() and (observations.min() < 0 or observations.max() >= n_symbols))
    ):
        raise ValueError(
            f"{owner}: observations must be a long tensor of shape [batch, n_steps] = "
            f"[{batch}, n_steps] with symbols in 0..{n_symbols - 1}; "
            f"got {describe_tensor(observations)}."
        )


def _is_integer(x: float) -> bool:
    return abs(x - round(x)) < 1e-9
