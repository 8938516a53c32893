"""Wind tunnels: tasks whose Bayes posterior is exact at every prediction site (docs/theory.md §4–§5)."""

from windtunnel.tasks.base import Batch, Task, move_tensor
from windtunnel.tasks.bijection import Bijection
from windtunnel.tasks.filtering import FilterResult, entropy_bits, forward_filter
from windtunnel.tasks.hmm import (
    HMMBatch,
    HMMFiltering,
    HMMPosterior,
    hmm_posterior,
    quantise_rows,
    windowed_posterior,
)
from windtunnel.tasks.recall import AssociativeRecall
from windtunnel.tasks.sticky_markov import (
    PredictionScores,
    StickyBatch,
    StickyFilterResult,
    StickyMarkov,
    score_predictions,
    sticky_bayes_filter,
    sticky_transition_matrix,
)

__all__ = [
    "AssociativeRecall",
    "Batch",
    "Bijection",
    "FilterResult",
    "HMMBatch",
    "HMMFiltering",
    "HMMPosterior",
    "PredictionScores",
    "StickyBatch",
    "StickyFilterResult",
    "StickyMarkov",
    "Task",
    "entropy_bits",
    "forward_filter",
    "hmm_posterior",
    "move_tensor",
    "quantise_rows",
    "score_predictions",
    "sticky_bayes_filter",
    "sticky_transition_matrix",
    "windowed_posterior",
]
