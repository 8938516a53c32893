"""The papers' numbers, typed once (docs/theory.md §10): every report and reproduction reads them here.

Each :class:`PaperNumber` is one number as a paper (or the authors' public code) states it, with
its source in a form a reader can look up: the arXiv identifier and version, and the section and
table where the paper states it ("arXiv 2512.23752v1, §4.2, Table 2"), or the file of the authors' public repository
(github.com/vishalmisra/bayesian-wind-tunnel) that states it. ``windtunnel report`` shows the
wind-tunnel rows beside the run's own numbers, ``windtunnel reproduce bijection|hmm|recall``
writes them into comparison.json/.md, and the geometry probes attach them to the definition they
belong to (docs/theory.md §8.9). :data:`STICKY_REFERENCE` holds the Paper II sticky-chain
reference numbers that ``windtunnel reproduce em-vs-sgd`` compares with.

Nothing here imports the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PAPER_I", "PAPER_II", "PAPER_III", "PAPER_NUMBERS", "REPOSITORY", "STICKY_REFERENCE", "PaperNumber", "paper_number", "paper_numbers"]

PAPER_I = "arXiv 2512.22471"
"""The Bayesian Geometry of Transformer Attention (Paper I); v1 and v3 report different numbers."""
PAPER_II = "arXiv 2512.22473"
"""Gradient Dynamics of Attention (Paper II)."""
PAPER_III = "arXiv 2512.23752"
"""Geometric Scaling of Bayesian Inference in LLMs (Paper III); sections and tables are v1's (Table 1: value
manifolds; Table 2: the three signatures per model, with the wind-tunnel reference row)."""
REPOSITORY = "github.com/vishalmisra/bayesian-wind-tunnel"
"""The authors' public code for the three papers."""


@dataclass(frozen=True)
class PaperNumber:
    """One published number.

    Attributes:
        key: unique name, ``task.model.quantity`` (``"bijection.transformer.entropy_mae"``).
        task: ``"bijection"``, ``"hmm"``, ``"recall"`` or ``"llm"`` (Paper III's pretrained models).
        model: ``"transformer"``, ``"lstm"``, ``"mlp"``; ``"llm"`` for Paper III.
        quantity: what is measured, in words ("entropy MAE, K = 20 (bits)").
        paper: the number as the source states it ("0.052 vs 0.082 random").
        source: where it is stated: paper and version (and table), or the authors' repository file.
        value: the number as a float where it is one number (for tables and plots), else None.
        low, high: the band the text states for ``quantity``, in the units the package measures it
            in (a share or ratio as a fraction: "84–90 %" is 0.84 and 0.90), for plots: both for a
            range, low = high for a single number that is not ``value`` (one read against a
            baseline, "0.052 vs 0.082 random"), one of them for a bound ("> 80 %" is low = 0.80,
            "< 0.1" is high = 0.1); None where the text states no band (a list, a mix of
            quantities). Where ``value`` is also given it lies inside the band.

    Raises:
        ValueError: when a bound is not a finite number, low > high, or value lies outside the band.
    """

    key: str
    task: str
    model: str
    quantity: str
    paper: str
    source: str
    value: float | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        for name in ("value", "low", "high"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf"))):
                raise ValueError(f"PaperNumber {self.key!r}: {name} must be a finite number or None; got {v!r}.")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"PaperNumber {self.key!r}: low must be <= high; got low={self.low!r}, high={self.high!r}.")
        if self.value is not None and ((self.low is not None and self.value < self.low) or (self.high is not None and self.value > self.high)):
            raise ValueError(f"PaperNumber {self.key!r}: value must lie in the band [{self.low!r}, {self.high!r}]; got {self.value!r}.")

    @property
    def cited(self) -> str:
        """The number with its source in parentheses: ``"0.007 (arXiv 2512.22471v3)"``."""
        return f"{self.paper} ({self.source})"


def _n(key: str, quantity: str, paper: str, source: str, value: float | None = None, *,
       low: float | None = None, high: float | None = None) -> PaperNumber:
    task, model, _ = key.split(".")
    return PaperNumber(key, task, model, quantity, paper, source, value, low, high)


_README = f"{REPOSITORY}, README.md"
_REPRODUCE = f"{REPOSITORY}, REPRODUCE.md"
_FOLLOW_UP = f"{REPOSITORY}, experiments/jlens (the authors' follow-up)"

PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    # Bijection elimination, V = 20 (docs/theory.md §5.1, §10)
    _n("bijection.transformer.entropy_mae", "entropy MAE (bits)", "0.007", f"{PAPER_I}v3; {_README}", 0.007),
    _n("bijection.transformer.entropy_mae_v1", "entropy MAE (bits)", "3e-3", f"{PAPER_I}v1", 3e-3),
    _n("bijection.transformer.entropy_mae_retrain", "entropy MAE (bits)", "0.0067; 0.0008 (format-B retrain)", _FOLLOW_UP),
    _n("bijection.transformer.key_orthogonality", "layer-0 key orthogonality (mean |cos|)", "0.052 vs 0.082 random", f"{PAPER_I}v3",
       low=0.052, high=0.052),
    _n("bijection.transformer.key_orthogonality_target", "layer-0 key orthogonality (mean |cos|)", "< 0.1", _REPRODUCE, high=0.1),
    _n("bijection.transformer.value_manifold", "value-manifold PC1 share", "PC1 84–90 %, PC1+PC2 88–95 %",
       f"{PAPER_III}v1, §2, Table 1, recalling {PAPER_I}", low=0.84, high=0.90),
    _n("bijection.transformer.value_manifold_target", "value-manifold PC1 share", "PC1 > 80 % with a strong entropy correlation", _REPRODUCE,
       low=0.80),
    _n("bijection.transformer.focusing", "attention focusing ratio", "85–90 %", f"{PAPER_III}v1, §4.4, Table 2, recalling {PAPER_I}",
       low=0.85, high=0.90),
    _n("bijection.transformer.weight_columns", "W_K column orthogonality (mean |cos|)", "0.09–0.12 vs 0.40–0.45 at init",
       f"{PAPER_III}v1, §2, §6.1, recalling {PAPER_I}", low=0.09, high=0.12),
    _n("bijection.transformer.bypass", "bypass any single layer: MAE ratio", "> 10×", f"{PAPER_I}v1", low=10.0),
    _n("bijection.transformer.dissociation", "frame settles before precision", "frame by steps 300–500; MAE improves > 10× after", _FOLLOW_UP),
    _n("bijection.lstm.entropy_mae", "entropy MAE (bits)", "0.009", f"{PAPER_I}v3; {_README}", 0.009),
    _n("bijection.lstm.entropy_mae_retrain", "entropy MAE (bits)", "0.009–0.018", _FOLLOW_UP, low=0.009, high=0.018),
    _n("bijection.mlp.entropy_mae", "entropy MAE (bits)", "1.107 = the uniform floor (position-wise MLP; the paper's 1.85 is another model)",
       _FOLLOW_UP, 1.107),
    # HMM filtering, 5 states x 5 symbols, trained at K = 20 (docs/theory.md §5.2, §10)
    _n("hmm.transformer.entropy_mae", "entropy MAE, K = 20 (bits)", "7.5e-5", f"{PAPER_I}v1; {_README}", 7.5e-5),
    _n("hmm.transformer.entropy_mae_k30", "entropy MAE, K = 30 (bits)", "0.012", f"{PAPER_I}v1; {_README}", 0.012),
    _n("hmm.transformer.entropy_mae_k50", "entropy MAE, K = 50 (bits)", "0.029", f"{PAPER_I}v1; {_README}", 0.029),
    _n("hmm.transformer.focusing", "attention focusing ratio", "85–90 %", f"{PAPER_III}v1, §4.4, Table 2, recalling {PAPER_I}",
       low=0.85, high=0.90),
    _n("hmm.lstm.entropy_mae", "entropy MAE (bits)", "0.411", f"{PAPER_I}v3", 0.411),
    _n("hmm.mlp.entropy_mae", "entropy MAE (bits)", "0.40", f"{PAPER_I}v3", 0.40),
    # Associative recall, 64 pairs (docs/theory.md §5.3)
    _n("recall.transformer.accuracy", "accuracy (64 pairs)", "100 %", f"{PAPER_I}v3", 1.0),
    _n("recall.lstm.accuracy", "accuracy (64 pairs)", "0.5 %", f"{PAPER_I}v3", 0.005),
    # Paper III: pretrained language models (docs/theory.md §9)
    _n("llm.llm.value_manifold", "value PC1+PC2 share", "PC1+PC2 51–99.7 %", f"{PAPER_III}v1, Table 1", low=0.51, high=0.997),
    _n("llm.llm.key_orthogonality", "W_K column orthogonality (mean |cos|)", "0.034–0.18", f"{PAPER_III}v1, §4.2, Table 2", low=0.034, high=0.18),
    _n("llm.llm.focusing", "attention focusing ratio", "82 %, 86 %, 31 %", f"{PAPER_III}v1, Table 2"),
)
"""Every published number the package compares with, one entry each."""

_BY_KEY = {n.key: n for n in PAPER_NUMBERS}
assert len(_BY_KEY) == len(PAPER_NUMBERS), "paper number keys must be unique"


def paper_number(key: str) -> PaperNumber:
    """The entry named ``key``.

    Raises:
        KeyError: naming the key and the known keys.
    """
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"paper_number: no entry {key!r}; known: {sorted(_BY_KEY)}") from None


def paper_numbers(task: str, model: str | None = None) -> list[PaperNumber]:
    """The entries of ``task`` (and ``model``, when given), in table order."""
    return [n for n in PAPER_NUMBERS if n.task == task and (model is None or n.model == model)]


STICKY_REFERENCE = {
    "sgd": {
        "final_loss": (2.0310, 0.0214),
        "final_entropy": (2.0612, 0.0161),
        "final_accuracy": (0.202, 0.029),
        "per_seed": [2.0647, 2.0037, 2.0166, 2.0256, 2.0443],
    },
    "two_timescale": {
        "final_loss": (1.9319, 0.0258),
        "final_entropy": (1.9525, 0.0343),
        "final_accuracy": (0.264, 0.018),
        "per_seed": [1.9802, 1.9113, 1.9088, 1.9254, 1.9339],
        "steps_to_sgd_mean_final": (458, 164),
        "speedup_vs_sgd": 2.2,
        "steps_to_own_sgd_final_mean": 421,
        "speedup_per_seed": 2.4,
        "ttest_t": -20.6,
    },
    "em": {"final_loss": (1.9027, 0.0129), "final_accuracy": (0.292, None)},
    "claims": f"'EM converges 2.3x faster' ({_README}); '430 vs 1000 steps' ({_REPRODUCE})",
    "h_min_nats": 1.8292,
    "expected_bayes_loss_nats": 1.836,
}
"""Paper II's sticky-chain experiment (docs/theory.md §4.4, §3.3): the authors' script
(experiments/paper2_gradient in the authors' repository) rerun on CPU, 5 seeds x 1000 steps, mean
and standard deviation per arm; ``em`` is ours; ``claims`` is what the authors state."""
