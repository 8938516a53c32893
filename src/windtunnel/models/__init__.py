"""Models for the wind tunnels (docs/theory.md §4.2, §4.5, §6.1): TinyGPT, the position-wise MLP control,
the LSTM, Hugging Face causal LMs (GPT-2, Llama, GPT-NeoX, ...; transformers imported only when
one is built), and the single attention head and deep transformer of the Paper II sticky chain.

The token models map tokens [batch, seq_len] to logits [batch, seq_len, n_outputs], take a
keyword ``generator`` for their initialisation (None: zero weights, for loading a state dict);
our own expose named hook points (``windtunnel.hooks``). The sticky-chain models read continuous inputs.
"""

from windtunnel.models.hf import HFCausalLM, HFCausalLMConfig
from windtunnel.models.lstm import LSTMConfig, LSTMLayer, LSTMModel
from windtunnel.models.mlp import MLPBlock, PositionwiseMLP, PositionwiseMLPConfig
from windtunnel.models.single_head import (
    PARAMETER_NAMES,
    SingleHeadAttention,
    SingleHeadConfig,
    SingleHeadForward,
    SingleHeadGradients,
    single_head_gradients,
    single_head_law_residual,
    single_head_output,
    single_head_routing_telemetry,
    single_head_telemetry,
)
from windtunnel.models.sticky_transformer import StickyTransformer, StickyTransformerConfig
from windtunnel.models.tinygpt import TinyGPT, TinyGPTConfig, TransformerBlock

__all__ = [
    "HFCausalLM",
    "HFCausalLMConfig",
    "LSTMConfig",
    "LSTMLayer",
    "LSTMModel",
    "MLPBlock",
    "PARAMETER_NAMES",
    "PositionwiseMLP",
    "PositionwiseMLPConfig",
    "SingleHeadAttention",
    "SingleHeadConfig",
    "SingleHeadForward",
    "SingleHeadGradients",
    "StickyTransformer",
    "StickyTransformerConfig",
    "TinyGPT",
    "TinyGPTConfig",
    "TransformerBlock",
    "single_head_gradients",
    "single_head_law_residual",
    "single_head_output",
    "single_head_routing_telemetry",
    "single_head_telemetry",
]
