"""The replica trainer: per-replica clipping against clip_grad_norm_ on each replica alone, and
what it refuses. (The comparison of a group with separate runs is still to come: issue 19.)"""

import dataclasses

import pytest
import torch
from torch import nn

from windtunnel.replicas import ReplicaTrainer, check_replicas
from windtunnel.train import ExperimentConfig, TrainConfig


def _bijection(seed=0, **model):
    return ExperimentConfig(
        task_name="bijection", task=dict(n_values=8, n_pairs=7), model=dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64, **model),
        train=TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=3, eval_size=16, eval_batch_size=8,
                          log_every=2, checkpoint_every=3, device="cpu", seed=seed),
    )


def test_each_replica_is_clipped_as_clip_grad_norm_clips_it_alone():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5, 7), (3, 11), (3, 4, 4, 2)]
    stacked = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in stacked:
        p.grad = torch.randn(p.shape, generator=gen) * torch.tensor([0.1, 1.0, 10.0]).reshape(-1, *[1] * (p.dim() - 1))
    alone = [[nn.Parameter(torch.zeros(s[1:])) for s in shapes] for _ in range(3)]
    for r, params in enumerate(alone):
        for p, q in zip(params, stacked):
            p.grad = q.grad[r].clone()
    norms = ReplicaTrainer._clip(stacked, 1.0)
    for r, params in enumerate(alone):
        norm = nn.utils.clip_grad_norm_(params, 1.0)
        assert torch.equal(norm, norms[r])
        for p, q in zip(params, stacked):
            assert torch.equal(p.grad, q.grad[r])
    assert norms[0] < 1.0 < norms[2]  # one replica left alone, one clipped


def test_what_a_replica_group_refuses():
    with pytest.raises(ValueError, match=r"differ only in train\.seed; experiment 1 also differs from experiment 0 in train\.lr\.$"):
        check_replicas([_bijection(0), dataclasses.replace(_bijection(1), train=dataclasses.replace(_bijection(1).train, lr=1e-3))])
    with pytest.raises(ValueError, match=r"own train\.seed; got seeds \[0, 0\]"):
        check_replicas([_bijection(0), _bijection(0)])
    with pytest.raises(ValueError, match=r"model\.dropout must be 0 .*got dropout=0\.1\.$"):
        check_replicas([_bijection(0, dropout=0.1), _bijection(1, dropout=0.1)])
    lstm = dataclasses.replace(_bijection(0), model_name="lstm", model=dict(n_layers=1, d_model=16))
    with pytest.raises(ValueError, match=r"model 'lstm' does not train as a replica group"):
        check_replicas([lstm])
    with pytest.raises(ValueError, match=r"run_dirs must hold one directory \(or None\) per replica, 2; got 1\.$"):
        ReplicaTrainer([_bijection(0), _bijection(1)], ["a"])
