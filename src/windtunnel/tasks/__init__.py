"""Wind tunnels: tasks whose Bayes posterior is exact at every prediction site (SPEC §4–§5)."""

from windtunnel.tasks.base import Batch, Task
from windtunnel.tasks.filtering import FilterResult, entropy_bits, forward_filter

__all__ = ["Batch", "FilterResult", "Task", "entropy_bits", "forward_filter"]
