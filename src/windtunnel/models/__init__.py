"""Models: the single attention head of Paper II and the deep sticky-chain transformer."""

from windtunnel.models.single_head import (
    PARAMETER_NAMES,
    SingleHeadAttention,
    SingleHeadConfig,
    SingleHeadForward,
    SingleHeadGradients,
    single_head_gradients,
    single_head_output,
)
from windtunnel.models.sticky_transformer import StickyTransformer, StickyTransformerConfig

__all__ = [
    "PARAMETER_NAMES",
    "SingleHeadAttention",
    "SingleHeadConfig",
    "SingleHeadForward",
    "SingleHeadGradients",
    "StickyTransformer",
    "StickyTransformerConfig",
    "single_head_gradients",
    "single_head_output",
]
