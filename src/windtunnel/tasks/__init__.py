"""Wind tunnels: tasks whose Bayes posterior is exact at every prediction site (SPEC §4–§5)."""

from windtunnel.tasks.base import Batch, Task
from windtunnel.tasks.filtering import FilterResult, entropy_bits, forward_filter
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
    "Batch",
    "FilterResult",
    "PredictionScores",
    "StickyBatch",
    "StickyFilterResult",
    "StickyMarkov",
    "Task",
    "entropy_bits",
    "forward_filter",
    "score_predictions",
    "sticky_bayes_filter",
    "sticky_transition_matrix",
]
