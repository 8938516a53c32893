"""Instruments that run a model on fixed batches and return data (docs/theory.md §8); they write no files
except where :func:`make_probes` is given a run directory.

One instrument per module: :mod:`~windtunnel.probes.routing` (routing-law statistics, §8.4),
:mod:`~windtunnel.probes.value_update` (the values' realised change against their pull, §8.4),
:mod:`~windtunnel.probes.frame` (key orthogonality, §8.1), :mod:`~windtunnel.probes.focusing`
(attention entropy and focusing, §8.2), :mod:`~windtunnel.probes.states` and
:mod:`~windtunnel.probes.manifold` (the recorded site states and their value manifold, §8.3),
:mod:`~windtunnel.probes.geometry` (the §8.1–§8.3 snapshot composed of the three, and every
published definition of them side by side: ``GEOMETRY_VARIANTS``, ``geometry_variants``),
:mod:`~windtunnel.probes.ablation` (§8.5), :mod:`~windtunnel.probes.calibration` (site loss,
auxiliary loss, calibration in bits), :mod:`~windtunnel.probes.memory` (the HMM memory
analyses: lag response and lag map, memory ladder, history attention, circuit probe) and
:mod:`~windtunnel.probes.schedule` (:func:`make_probes`, the Trainer's telemetry).
Every public name is re-exported here, so ``from windtunnel.probes import X`` works for all.

The instruments know no model class: they read models through :mod:`windtunnel.sites` (attention
sites, and the readout, key map, value projections and ablations each adapter provides or
refuses). What a model lacks is refused with one ValueError naming the instrument and the model
class. Supported today:

=====================  =======  ============  ================
instrument             TinyGPT  Hugging Face  TransformerLens
=====================  =======  ============  ================
routing_law_stats      yes      yes           yes
attention_focusing     yes      yes           yes
collect_states,        yes      yes (with an  yes
manifold                        LM head)
layer_key_orth.        yes      refused       yes
ValueUpdateProbe       yes      yes (no W_V   yes
                                parts)
ablation_table,        yes      yes           yes
hmm_lag_map
calibrate,             yes      yes           yes
hmm_lag_response
geometry_variants      yes      yes (weight-  yes
                                free ones)
=====================  =======  ============  ================
"""

from windtunnel.probes.ablation import AblationTable, ablation_table
from windtunnel.probes.calibration import auxiliary_loss_nats, calibrate, site_loss_nats
from windtunnel.probes.focusing import AttentionFocusing, attention_focusing
from windtunnel.probes.frame import hypothesis_tokens, layer_key_orthogonality
from windtunnel.probes.geometry import GEOMETRY_VARIANTS, GeometrySnapshot, GeometryVariant, geometry_snapshot, geometry_variants
from windtunnel.probes.manifold import manifold_projection, manifold_summary
from windtunnel.probes.memory import (
    CIRCUIT_QUANTITIES,
    MEMORY_WINDOWS,
    hmm_attention_mass,
    hmm_circuit_probe,
    hmm_history_attention,
    hmm_history_attention_by_layer,
    hmm_lag_map,
    hmm_lag_response,
    memory_ladder,
)
from windtunnel.probes.routing import RoutingLawStats, routing_law_stats, routing_law_stats_of_sites
from windtunnel.probes.schedule import make_probes
from windtunnel.probes.states import (
    GeometryStates,
    SiteStates,
    collect_geometry_states,
    collect_states,
    record_patterns,
    value_positions,
)
from windtunnel.probes.value_update import ValueUpdateProbe, ValueUpdateStats

__all__ = [
    "CIRCUIT_QUANTITIES",
    "GEOMETRY_VARIANTS",
    "MEMORY_WINDOWS",
    "AblationTable",
    "AttentionFocusing",
    "GeometrySnapshot",
    "GeometryStates",
    "GeometryVariant",
    "RoutingLawStats",
    "SiteStates",
    "ValueUpdateProbe",
    "ValueUpdateStats",
    "ablation_table",
    "attention_focusing",
    "auxiliary_loss_nats",
    "calibrate",
    "collect_geometry_states",
    "collect_states",
    "geometry_snapshot",
    "geometry_variants",
    "hmm_attention_mass",
    "hmm_circuit_probe",
    "hmm_history_attention",
    "hmm_history_attention_by_layer",
    "hmm_lag_map",
    "hmm_lag_response",
    "hypothesis_tokens",
    "layer_key_orthogonality",
    "make_probes",
    "manifold_projection",
    "manifold_summary",
    "memory_ladder",
    "record_patterns",
    "routing_law_stats",
    "routing_law_stats_of_sites",
    "site_loss_nats",
    "value_positions",
]
