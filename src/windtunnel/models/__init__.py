"""Models for the wind tunnels (SPEC §6.1): TinyGPT, the position-wise MLP control and the LSTM.

Every model maps tokens [batch, seq_len] to logits [batch, seq_len, n_outputs], takes a keyword
``generator`` for its initialisation (None: zero weights, for loading a state dict) and exposes
named hook points (``windtunnel.hooks``).
"""

from windtunnel.models.lstm import LSTMConfig, LSTMLayer, LSTMModel
from windtunnel.models.mlp import MLPBlock, PositionwiseMLP, PositionwiseMLPConfig
from windtunnel.models.tinygpt import TinyGPT, TinyGPTConfig, TransformerBlock

__all__ = [
    "LSTMConfig",
    "LSTMLayer",
    "LSTMModel",
    "MLPBlock",
    "PositionwiseMLP",
    "PositionwiseMLPConfig",
    "TinyGPT",
    "TinyGPTConfig",
    "TransformerBlock",
]
