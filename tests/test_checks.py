"""The shared argument checks of ``windtunnel._checks``: their messages, and one TypeError for every
``generator=`` that is not a ``torch.Generator``, at every public entry point that takes one."""

import importlib
import inspect
import pkgutil
import re
import typing

import numpy as np
import pytest
import torch

import windtunnel
from windtunnel._checks import check_finite, check_generator
from windtunnel.dynamics import verify_law
from windtunnel.geometry import ValueManifoldPCA, linear_probe_r2, summarize_value_manifold
from windtunnel.metrics import trivial_floors
from windtunnel.models import (
    LSTMConfig,
    LSTMLayer,
    LSTMModel,
    MLPBlock,
    PositionwiseMLP,
    PositionwiseMLPConfig,
    SingleHeadAttention,
    SingleHeadConfig,
    StickyTransformer,
    StickyTransformerConfig,
    TinyGPT,
    TinyGPTConfig,
    TransformerBlock,
)
from windtunnel.models.hf import HFCausalLM, HFCausalLMConfig
from windtunnel.tasks import AssociativeRecall, Bijection, HMMFiltering, StickyMarkov


def _gen():
    return torch.Generator().manual_seed(0)


GPT = TinyGPTConfig(vocab_size=5, n_positions=4, n_layers=1, n_heads=1, d_model=4, d_mlp=8)
MLP = PositionwiseMLPConfig(vocab_size=5, n_positions=4, n_layers=1, d_model=4, d_mlp=8)
LSTM = LSTMConfig(vocab_size=5, n_layers=1, d_model=4)
HF = HFCausalLMConfig(architecture="llama", vocab_size=5, n_positions=4, n_layers=1, n_heads=2, d_model=8, d_mlp=16)
STICKY = StickyTransformerConfig(d_x=3, d_model=8, n_layers=1, n_heads=2, d_mlp=16, n_classes=3)
TOKENS = torch.zeros(1, 4, dtype=torch.long)
RESID = torch.zeros(1, 4, 4)
STATES = torch.linspace(0, 1, 40, dtype=torch.float64).reshape(20, 2) ** torch.tensor([1.0, 2.0], dtype=torch.float64)
ENTROPY = torch.linspace(0, 1, 20, dtype=torch.float64)

# (owner in the message, field, None allowed, call): ``call(g)`` hands ``g`` to that entry point only.
ENTRY_POINTS = [
    ("Bijection.sample", "generator", False, lambda g: Bijection(n_values=4, n_pairs=3).sample(2, generator=g)),
    ("HMMFiltering.sample", "generator", False, lambda g: HMMFiltering(n_steps=3).sample(2, generator=g)),
    ("HMMFiltering.sample_parameters", "generator", False,
     lambda g: HMMFiltering(n_steps=3).sample_parameters(2, generator=g)),
    ("AssociativeRecall.sample", "generator", False, lambda g: AssociativeRecall().sample(2, generator=g)),
    ("StickyMarkov.sample", "generator", False, lambda g: StickyMarkov(seq_len=5).sample(2, generator=g)),
    ("StickyMarkov.sample_each", "generators[1]", False, lambda g: StickyMarkov(seq_len=5).sample_each([_gen(), g])),
    ("TinyGPT", "generator", True, lambda g: TinyGPT(GPT, generator=g)),
    ("TinyGPT.reset_parameters", "generator", False, lambda g: TinyGPT(GPT, generator=None).reset_parameters(g)),
    ("TinyGPT.forward", "generator", True, lambda g: TinyGPT(GPT, generator=None)(TOKENS, generator=g)),
    ("TransformerBlock", "generator", True, lambda g: TransformerBlock(GPT, generator=g)),
    ("TransformerBlock.reset_parameters", "generator", False,
     lambda g: TransformerBlock(GPT, generator=None).reset_parameters(g)),
    ("TransformerBlock.forward", "generator", True, lambda g: TransformerBlock(GPT, generator=None)(RESID, generator=g)),
    ("PositionwiseMLP", "generator", True, lambda g: PositionwiseMLP(MLP, generator=g)),
    ("PositionwiseMLP.reset_parameters", "generator", False,
     lambda g: PositionwiseMLP(MLP, generator=None).reset_parameters(g)),
    ("PositionwiseMLP.forward", "generator", True, lambda g: PositionwiseMLP(MLP, generator=None)(TOKENS, generator=g)),
    ("MLPBlock", "generator", True, lambda g: MLPBlock(MLP, generator=g)),
    ("MLPBlock.reset_parameters", "generator", False, lambda g: MLPBlock(MLP, generator=None).reset_parameters(g)),
    ("MLPBlock.forward", "generator", True, lambda g: MLPBlock(MLP, generator=None)(RESID, generator=g)),
    ("LSTMModel", "generator", True, lambda g: LSTMModel(LSTM, generator=g)),
    ("LSTMModel.reset_parameters", "generator", False, lambda g: LSTMModel(LSTM, generator=None).reset_parameters(g)),
    ("LSTMModel.forward", "generator", True, lambda g: LSTMModel(LSTM, generator=None)(TOKENS, generator=g)),
    ("LSTMLayer", "generator", True, lambda g: LSTMLayer(4, generator=g)),
    ("LSTMLayer.reset_parameters", "generator", False, lambda g: LSTMLayer(4, generator=None).reset_parameters(g)),
    ("HFCausalLM", "generator", True, lambda g: HFCausalLM(HF, generator=g)),
    ("HFCausalLM.reset_parameters", "generator", False, lambda g: HFCausalLM(HF, generator=None).reset_parameters(g)),
    ("HFCausalLM.forward", "generator", True, lambda g: HFCausalLM(HF, generator=None)(TOKENS, generator=g)),
    ("StickyTransformer", "generator", False, lambda g: StickyTransformer(STICKY, generator=g)),
    ("StickyTransformer.reset_parameters", "generator", False,
     lambda g: StickyTransformer(STICKY, generator=_gen()).reset_parameters(g)),
    ("StickyTransformer.forward", "generator", True,
     lambda g: StickyTransformer(STICKY, generator=_gen())(torch.zeros(1, 4, 3), generator=g)),
    ("SingleHeadAttention.reset_parameters", "generator", False,
     lambda g: SingleHeadAttention(SingleHeadConfig(d_x=3, d_k=2, d_v=2, n_classes=2)).reset_parameters(g)),
    ("ValueManifoldPCA.fit", "generator", True, lambda g: ValueManifoldPCA().fit(STATES, ENTROPY, generator=g)),
    ("summarize_value_manifold", "generator", True, lambda g: summarize_value_manifold(STATES, ENTROPY, generator=g)),
    ("linear_probe_r2", "generator", False, lambda g: linear_probe_r2(STATES, ENTROPY, generator=g)),
    ("trivial_floors", "generator", False,
     lambda g: trivial_floors(Bijection(n_values=4, n_pairs=3), generator=g, n_sequences=4, batch_size=4)),
    ("verify_law", "generator", False, lambda g: verify_law(1, generator=g)),
]
NOT_GENERATORS = {"int": 0, "numpy": np.random.default_rng(0), "str": "0", "tensor": torch.tensor(0)}


@pytest.mark.parametrize("value", NOT_GENERATORS.values(), ids=NOT_GENERATORS.keys())
@pytest.mark.parametrize(("owner", "field", "optional", "call"), ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_a_generator_that_is_not_a_torch_generator_is_refused(owner, field, optional, call, value):
    rule = "a torch.Generator or None" if optional else "a torch.Generator"
    expected = f"{owner}: {field} must be {rule}; got {type(value).__name__}."
    with pytest.raises(TypeError, match=f"^{re.escape(expected)}$"):
        call(value)


@pytest.mark.parametrize(("owner", "field", "optional", "call"), ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_a_torch_generator_is_accepted_and_none_only_where_optional(owner, field, optional, call):
    call(_gen())
    if optional:
        call(None)
    else:
        with pytest.raises(TypeError, match=re.escape(f"{owner}: {field} must be a torch.Generator; got NoneType.")):
            call(None)


def _public_generator_takers():
    """Owner names ("f", "Class", "Class.method") of every public callable of tasks, models,
    dynamics, geometry and metrics with a ``generator`` or ``generators`` parameter."""
    found = set()
    packages = ("windtunnel.tasks", "windtunnel.models", "windtunnel.geometry")
    names = ["windtunnel.dynamics", "windtunnel.metrics"]
    for package in packages:
        module = importlib.import_module(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]
    for name in names:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj):
                if getattr(obj, "_is_protocol", False) or typing.Protocol in obj.__mro__:
                    continue
                methods = [("__init__", obj.__init__)] + [
                    (n, f) for n, f in vars(obj).items() if not n.startswith("_") and inspect.isfunction(f)
                ]
                for method, func in methods:
                    if {"generator", "generators"} & set(inspect.signature(func).parameters):
                        found.add(obj.__name__ if method == "__init__" else f"{obj.__name__}.{method}")
            elif inspect.isfunction(obj) and {"generator", "generators"} & set(inspect.signature(obj).parameters):
                found.add(obj.__name__)
    return found


def test_every_public_generator_argument_is_covered():
    assert windtunnel  # the package imports
    assert _public_generator_takers() == {e[0] for e in ENTRY_POINTS}


def test_check_generator_message():
    check_generator("f", _gen())
    check_generator("f", None)
    with pytest.raises(TypeError, match=r"^f: generator must be a torch.Generator; got NoneType\.$"):
        check_generator("f", None, optional=False)
    with pytest.raises(TypeError, match=r"^f: g\[2\] must be a torch.Generator or None; got Generator\.$"):
        check_generator("f", np.random.default_rng(0), name="g[2]")


def test_check_finite_counts_nan_and_inf():
    check_finite("f", "x", torch.ones(3))
    check_finite("f", "x", torch.tensor([1, 2]))  # integer tensors and non-tensors are left to the type checks
    check_finite("f", "x", [float("nan")])
    x = torch.tensor([[1.0, float("nan"), float("inf")], [float("-inf"), 0.0, 2.0]])
    with pytest.raises(ValueError, match=re.escape("f: x must be finite; got 3 non-finite entries (1 nan, 2 inf) in float32 [2, 3].")):
        check_finite("f", "x", x)
    with pytest.raises(ValueError, match=re.escape("got 1 non-finite entry (1 nan, 0 inf)")):
        check_finite("f", "x", torch.tensor([float("nan")], dtype=torch.float64))
