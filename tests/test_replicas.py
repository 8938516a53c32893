"""The replica trainer against separate runs of the same seeds, per-replica clipping against
clip_grad_norm_ on each replica alone, and what it refuses.

Where a group and a separate run could differ. Every operation of a step is the separate run's
operation applied to each replica's slice, so a difference can only come from a kernel that
reduces in another order when its tensor gains the replica axis (R times more elements, or a
batching rule that computes it another way). On the CPU (torch 2.13, MKL) three were found:

* the embeddings' backward. Indexing ``W_E[tokens]`` has ``index_put_`` with accumulation as its
  backward, and on the CPU with more than one thread that takes a parallel path with atomic float
  additions once the gradient holds 32768 elements or more: each row's sum of gradients is then
  rounded in another order than the serial one. A stacked lookup is R times larger than a run's,
  so the group crossed that threshold where the separate run did not: the HMM's embedding
  gradients differed by about 1 ulp (up to 1.5e-8 on entries of 0.13), and the weights drifted
  apart by about 6e-8 in 20 steps. The models now look rows up with ``nn.functional.embedding``
  (``models._layers.embedding_lookup``), whose backward adds each row's gradients in the order of
  the ids whatever the threads; the group's gradients are then the separate runs' bit for bit,
  and so are the weights after any number of steps (the rest of the step is elementwise, or
  reduces one replica's slice in the separate run's order: checked bitwise below).
* the tied readout's weight gradient at 4 to 11 outputs: the batched GEMM sums its products in
  another order than one run's (:func:`test_a_tied_readout_of_4_to_11_outputs_rounds_its_gradient_otherwise_within_the_dot_product_bound`,
  held to a derived bound); the trajectory tests use 16 outputs, where nothing differs.
* the hard-label loss's value (not its gradient). ``cross_entropy``'s batching rule computes the
  per-element losses and takes their ``mean()``, which sums them in another order than
  ``nll_loss``'s own mean reduction: the bijection's logged losses differ in the last bit or two.
  The gradient of a mean is 1/n per term whatever the summation order, so training is unchanged;
  the logged loss is bounded by :func:`reorder_bound`. The HMM's soft-target loss is a
  ``mean()`` in both and comes out bitwise.
"""

import contextlib
import dataclasses

import pytest
import torch
from torch import nn

from windtunnel.models._layers import embedding_lookup
from windtunnel.replicas import ReplicaTrainer, check_replicas
from windtunnel.runs import RunDir
from windtunnel.train import ExperimentConfig, TrainConfig, Trainer

EPS32 = torch.finfo(torch.float32).eps  # 2^-23, the spacing of float32 numbers in [1, 2)

INDEX_PUT_PARALLEL_ELEMENTS = 32768
"""The gradient size (elements) from which the CPU's accumulating ``index_put_`` goes parallel
(PyTorch's ``GRAIN_SIZE``); the HMM test's stacked lookup is above it and a run's below it."""


WEIGHT_DIFFERENCE_AFTER_N_STEPS = 0.0
"""What a replica's weights may differ from its separate run's after N steps: nothing. Its first
step's gradients are the separate run's bit for bit (checked below); the clipping (checked
below against ``clip_grad_norm_``), AdamW (elementwise) and the schedule then make the same
update, so the next step starts from the same weights with the same batch and the same kernels on
the same shapes, and by induction every step is bitwise, whatever N. A bound above 0 would have
to come from a rounding difference in (a); there is none to propagate."""


def reorder_bound(n_terms: int, mean: float) -> float:
    """The largest difference between two float32 means of the same ``n_terms`` non-negative
    terms summed in different orders: each order's sum is within gamma_(n-1) * sum of the exact
    sum, gamma_k = k u / (1 - k u) with u = 2^-24 the unit roundoff (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., §4.2), so the two sums differ by at most
    2 gamma_(n-1) * sum ~ (n - 1) * EPS32 * sum; the division by n rounds once on each side
    (EPS32 * mean between the two). Hence (n - 1) (1 + 1e-3) + 1 < n + 1 ulps of the mean for
    n < 8000: (n + 1) * EPS32 * |mean|. A per-term difference, or anything other than the order
    of the summation, exceeds it at once."""
    return (n_terms + 1) * EPS32 * abs(mean)


@contextlib.contextmanager
def torch_threads(n):
    """``n`` torch threads inside, and deterministic algorithms off (the suite turns them on:
    tests/conftest.py), as a user's run has them. Deterministic mode makes the CPU's
    accumulating ``index_put_`` serial, which would hide the difference the module docstring
    describes. The first steps are compared on two threads, as a 2-core machine runs by default:
    the parallel path exists only with more than one. The trajectories train on one: on a
    2-core machine shared with other work, two threads made these tiny steps 15 times slower."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(steps, seed, **extra):
    return TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=5, eval_size=16, eval_batch_size=8,
                       log_every=1, checkpoint_every=5, device="cpu", seed=seed, **extra)


def _bijection(seed=0, steps=6, model_name="transformer", **model):
    model = model or dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64)
    return ExperimentConfig(task_name="bijection", task=dict(n_values=8, n_pairs=7), model_name=model_name, model=model,
                            train=_train(steps, seed))


def _hmm(seed=0, steps=6):
    """The HMM with the auxiliary belief loss and the position shift (the recipes'
    hmm-4l-aux-shift settings on a 2L/32 model): K = 10 steps, positions up to K = 15."""
    return ExperimentConfig(task_name="hmm", task=dict(n_steps=10), eval_lengths=(15,),
                            model=dict(n_layers=2, n_heads=2, d_model=32, d_mlp=64, norm="layernorm", head_bias=True),
                            train=_train(steps, seed, aux_loss_weight=1.0, position_shift=True))


def _separate_first_step(experiment):
    """A separate run's first step as ``Trainer.fit`` takes it, up to the clipping: (loss, aux
    loss or None, {name: gradient})."""
    trainer = Trainer(experiment)
    cfg = trainer.config
    task = trainer._draw_task()
    batch = task.sample(cfg.batch_size, generator=trainer.data_generator)
    shifted = {"position_ids": trainer._shifted_position_ids(batch.tokens.shape)} if cfg.position_shift else {}
    loss, aux, _ = trainer._losses(batch, task, shifted)
    (loss if aux is None else loss + cfg.aux_loss_weight * aux).backward()
    return loss, aux, {name: p.grad for name, p in trainer.model.named_parameters()}


def _assert_first_step_gradients_are_the_separate_runs(experiments):
    with torch_threads(2):
        _compare_first_steps(experiments)


def _compare_first_steps(experiments):
    group = ReplicaTrainer(experiments)
    params, buffers, _ = group._stack()
    loss, aux = group._backward(params, buffers, {})
    terms = experiments[0].train.batch_size * group.task.sample(1, generator=torch.Generator().manual_seed(0)).sites.numel()
    for r, experiment in enumerate(experiments):
        alone_loss, alone_aux, grads = _separate_first_step(experiment)
        assert set(grads) == set(params)
        for name, grad in grads.items():
            assert torch.equal(params[name].grad[r], grad), (r, name, (params[name].grad[r] - grad).abs().max())
        assert abs(float(loss[r].detach()) - float(alone_loss.detach())) <= reorder_bound(terms, float(alone_loss.detach()))
        if alone_aux is not None:
            assert torch.equal(aux[r], alone_aux)


def _fit_group_and_alone(experiments, tmp_path, stop_at=None):
    """The group, then each seed alone, trained (to ``stop_at``) on one thread; their run
    directories (group, alone), in the order of ``experiments``."""
    group_dirs = [tmp_path / "group" / f"seed{e.train.seed}" for e in experiments]
    alone_dirs = [tmp_path / "alone" / f"seed{e.train.seed}" for e in experiments]
    with torch_threads(1):
        ReplicaTrainer(experiments, group_dirs).fit(stop_at=stop_at)
        for experiment, path in zip(experiments, alone_dirs):
            Trainer(experiment, path).fit(stop_at=stop_at)
    return group_dirs, alone_dirs


def _assert_same_run(group_dir, alone_dir, n_terms):
    """The two run directories hold the same checkpoint bit for bit (weights, AdamW state,
    generators, step) and the same logs, but for ``elapsed_s`` and the training losses, which
    may differ by :func:`reorder_bound` of a mean of ``n_terms`` (None: bitwise)."""
    ours, theirs = RunDir(group_dir).load_checkpoint(), RunDir(alone_dir).load_checkpoint()
    assert ours["step"] == theirs["step"]
    for name, value in theirs["model"].items():
        difference = (ours["model"][name] - value).abs().max()
        assert difference <= WEIGHT_DIFFERENCE_AFTER_N_STEPS and torch.equal(ours["model"][name], value), (name, difference)
    for key, state in theirs["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(ours["optimizer"]["state"][key][field], value), (key, field)
    assert torch.equal(ours["data_generator"], theirs["data_generator"])
    if n_terms is None:
        assert ours["last_loss"] == theirs["last_loss"]
    else:
        assert abs(ours["last_loss"] - theirs["last_loss"]) <= reorder_bound(n_terms, theirs["last_loss"])
    rows, expected = RunDir(group_dir).metrics(), RunDir(alone_dir).metrics()
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in expected]
    for row, want in zip(rows, expected):
        if want["split"] == "train" and n_terms is not None:
            assert abs(row["loss_nats"] - want["loss_nats"]) <= reorder_bound(n_terms, want["loss_nats"]), row
            row, want = dict(row, loss_nats=None), dict(want, loss_nats=None)
        assert {k: v for k, v in row.items() if k != "elapsed_s"} == {k: v for k, v in want.items() if k != "elapsed_s"}


def test_bijection_replicas_are_the_separate_runs(tmp_path):
    """3 seeds, 2L/32: the first step's gradients bitwise, 15 steps' weights, AdamW state and
    evaluations bitwise, the logged losses within the summation-order bound."""
    experiments = [_bijection(seed, steps=15) for seed in (0, 1, 2)]
    _assert_first_step_gradients_are_the_separate_runs(experiments)
    group_dirs, alone_dirs = _fit_group_and_alone(experiments, tmp_path)
    terms = 8 * 7  # batch x sites: the mean the cross entropy takes
    for ours, theirs in zip(group_dirs, alone_dirs):
        _assert_same_run(ours, theirs, terms)


def test_hmm_replicas_with_aux_loss_and_position_shift_are_the_separate_runs(tmp_path):
    """3 seeds, 2L/32, auxiliary loss and position shift: the stacked embedding gradient is past
    the parallel threshold (a run's is not), where indexing's backward rounded otherwise (module
    docstring; with 3 replicas on 2 threads the middle one's rows are split between the threads,
    whose atomic additions then reach them out of order); the first step's gradients bitwise,
    then 10 steps bitwise, losses included."""
    experiments = [_hmm(seed, steps=10) for seed in (3, 4, 5)]
    seq_len, d_model = experiments[0].build_task().seq_len, experiments[0].model["d_model"]
    one_run = experiments[0].train.batch_size * seq_len * d_model
    assert one_run < INDEX_PUT_PARALLEL_ELEMENTS <= len(experiments) * one_run
    _assert_first_step_gradients_are_the_separate_runs(experiments)
    group_dirs, alone_dirs = _fit_group_and_alone(experiments, tmp_path)
    for ours, theirs in zip(group_dirs, alone_dirs):
        _assert_same_run(ours, theirs, None)


def test_the_mlp_trains_as_a_replica_group(tmp_path):
    experiments = [_bijection(seed, steps=10, model_name="mlp", n_layers=1, d_model=16, d_mlp=32) for seed in (0, 5)]
    _assert_first_step_gradients_are_the_separate_runs(experiments)
    group_dirs, alone_dirs = _fit_group_and_alone(experiments, tmp_path)
    for ours, theirs in zip(group_dirs, alone_dirs):
        _assert_same_run(ours, theirs, 8 * 7)


def dot_product_bound(n_terms: int, abs_products: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The largest difference between two float32 evaluations of sums of ``n_terms`` products
    with sum of |products| ``abs_products``, each then added to the same other term (the total
    ``value``): each evaluation is within gamma_n * sum |x_i y_i| of the exact dot product
    (Higham, §3.1, eq. 3.5; blocked, vectorised or fused multiply-add kernels included), so the two
    differ by at most 2 gamma_n S = n EPS32 S / (1 - n u) < (n + 1) EPS32 S for n < 8000; the
    final addition rounds once on each side (EPS32 |value|)."""
    return (n_terms + 1) * EPS32 * abs_products + EPS32 * value.abs()


def test_a_tied_readout_of_4_to_11_outputs_rounds_its_gradient_otherwise_within_the_dot_product_bound():
    """The second kernel that rounds otherwise (found on torch 2.13's CPU build with MKL). For a
    tied readout logits = x W_E^T with 4 to 11 outputs (the bijection's vocabulary at n_values
    2 to 5), W_E's gradient from the readout, sum over the batch's positions of
    dlogits[i, v] x[i, d], is computed by another GEMM kernel for the batched [R, ...] operands
    than for one run's, which sums the products in another order (checked alone: bitwise for
    12 or more outputs, and for an untied readout at any width). So on this model the first
    step's W_E gradient is held to :func:`dot_product_bound` of its n = batch x seq_len products,
    and every other parameter's gradient is bitwise. Over many steps such differences are
    carried forward by training and no bitwise claim is made (the replicas module docstring);
    the tests above keep 16 outputs, where the whole trajectory is bitwise."""
    experiments = [_bijection(seed, model_name="transformer", n_layers=1, n_heads=2, d_model=16, d_mlp=32) for seed in (0, 1)]
    experiments = [dataclasses.replace(e, task=dict(n_values=5, n_pairs=4)) for e in experiments]
    assert experiments[0].build_task().vocab_size == 10 and experiments[0].model_config().tie_embeddings
    with torch_threads(1):
        group = ReplicaTrainer(experiments)
        params, buffers, _ = group._stack()
        group._backward(params, buffers, {})
        for r, experiment in enumerate(experiments):
            trainer = Trainer(experiment)
            seen = {}

            def keep(key):
                def hook(module, args, out):
                    out.retain_grad()
                    seen[key] = out
                return hook

            trainer.model.ln_final.register_forward_hook(keep("x"))
            trainer.model.register_forward_hook(keep("logits"))
            batch = trainer.task.sample(8, generator=trainer.data_generator)
            loss, _, _ = trainer._losses(batch, trainer.task, {})
            loss.backward()
            x, dlogits = seen["x"].detach().flatten(0, 1), seen["logits"].grad.flatten(0, 1)  # [n, d_model], [n, vocab]
            abs_products = dlogits.abs().T @ x.abs()  # [vocab, d_model]: sum_i |dlogits[i, v] x[i, d]|
            for name, p in trainer.model.named_parameters():
                ours = params[name].grad[r]
                if name == "embed.W_E":
                    bound = dot_product_bound(x.shape[0], abs_products, p.grad)
                    assert ((ours - p.grad).abs() <= bound).all(), (ours - p.grad).abs().max()
                else:
                    assert torch.equal(ours, p.grad), name


def test_a_replicas_run_directory_resumes_alone(tmp_path):
    """The group stops at step 5 (its checkpoint holds the weights and AdamW state copied back);
    one replica continues alone with ``Trainer.resume`` to step 12, as does a separate run
    stopped at step 5: the same run."""
    experiments = [_hmm(seed, steps=12) for seed in (0, 1)]
    group_dirs, alone_dirs = _fit_group_and_alone(experiments, tmp_path, stop_at=5)
    for path in (group_dirs[1], alone_dirs[1]):
        trainer = Trainer.resume(path)
        assert trainer.step == 5
        with torch_threads(1):
            trainer.fit()
    _assert_same_run(group_dirs[1], alone_dirs[1], None)
    assert RunDir(group_dirs[1]).load_checkpoint()["step"] == 12


def test_embedding_lookup_adds_each_rows_gradients_in_id_order_on_two_threads():
    """Past the parallel threshold the lookup's gradient is the serial loop's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    n_ids, d = 8000, 32  # 256,000 gradient elements >= INDEX_PUT_PARALLEL_ELEMENTS
    ids = torch.randint(0, 50, (n_ids,), generator=gen)
    upstream = torch.randn(n_ids, d, generator=gen)
    table = torch.zeros(50, d, requires_grad=True)
    with torch_threads(2):
        embedding_lookup(table, ids).backward(upstream)
    serial = torch.zeros(50, d)
    for i in range(n_ids):
        serial[ids[i]] += upstream[i]
    assert n_ids * d >= INDEX_PUT_PARALLEL_ELEMENTS
    assert torch.equal(table.grad, serial)
    assert torch.equal(embedding_lookup(table, ids.reshape(80, 100)), table.detach()[ids.reshape(80, 100)])


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
        check_replicas([_bijection(0, n_layers=2, n_heads=2, d_model=32, d_mlp=64, dropout=0.1),
                        _bijection(1, n_layers=2, n_heads=2, d_model=32, d_mlp=64, dropout=0.1)])
    lstm = dataclasses.replace(_bijection(0), model_name="lstm", model=dict(n_layers=1, d_model=16))
    with pytest.raises(ValueError, match=r"model 'lstm' does not train as a replica group"):
        check_replicas([lstm])
    with pytest.raises(ValueError, match=r"run_dirs must hold one directory \(or None\) per replica, 2; got 1\.$"):
        ReplicaTrainer([_bijection(0), _bijection(1)], ["a"])
