"""Named activation taps (``HookPoint``) and recording of activations and their gradients.

A ``HookPoint`` is an identity module placed wherever a tensor is worth reading. Its name is its
module path in the root model (``blocks.0.attn.hook_pattern``), set once by the root model via
:func:`name_hook_points`. :func:`record` runs a model while storing the tensors that pass through
chosen hook points, and on request the gradient of the loss with respect to each of them, stored
as ``<name>_grad``. Outside a ``record`` block a hook point is a bare identity: no hooks are
registered and no tensor is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Union

import torch
from torch import nn

from windtunnel._checks import close_matches

__all__ = [
    "ActivationCache",
    "HookPoint",
    "NameFilter",
    "eval_mode",
    "hook_points",
    "name_hook_points",
    "record",
]

NameFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
"""Which hook points to record: None (all), one exact name, an iterable of exact names, or a
predicate on the name."""


class HookPoint(nn.Module):
    """An identity module used as a named tap on a tensor (TransformerLens style).

    ``forward(x)`` returns ``x`` itself, so inserting a hook point changes no value and no
    gradient. :func:`record` attaches temporary hooks to it.

    Attributes:
        name: the module path of this hook point in its root model, e.g.
            ``"blocks.0.attn.hook_z"``; None until the root model calls :func:`name_hook_points`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def name_hook_points(root: nn.Module) -> None:
    """Name every hook point under ``root`` by its module path; called once by a root model.

    Raises:
        ValueError: when a hook point already carries a different name, i.e. it was named by
            another root model (a hook point has exactly one name).
    """
    for path, module in root.named_modules():
        if isinstance(module, HookPoint):
            if module.name is not None and module.name != path:
                raise ValueError(
                    f"name_hook_points: hook point {path!r} is already named {module.name!r} by "
                    "another root model; a hook point has exactly one name."
                )
            module.name = path


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """All hook points under ``model`` by name (module path if unnamed), in module order."""
    found: dict[str, HookPoint] = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            found[module.name if module.name is not None else path] = module
    return found


class ActivationCache(Mapping[str, torch.Tensor]):
    """Recorded tensors by hook name; gradients under ``<name>_grad``.

    A read-only mapping filled by :func:`record`. Looking up a missing name raises ``KeyError``
    that suggests the closest recorded name.
    """

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}

    def _put(self, name: str, value: torch.Tensor) -> None:
        if name in self._store:
            raise RuntimeError(
                f"record: {name!r} was recorded twice; run one forward (and one backward) pass "
                "per record() block, or record each pass into its own cache."
            )
        self._store[name] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._store[name]
        except KeyError:
            hint = close_matches(name, self._store) if isinstance(name, str) else ""
            raise KeyError(f"{name!r} is not in the cache.{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({list(self._store)})"


def _selected(points: dict[str, HookPoint], names: NameFilter) -> list[str]:
    if names is None:
        return list(points)
    if callable(names):
        return [name for name in points if names(name)]
    wanted = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in wanted if name not in points]
    if unknown:
        hints = "".join(close_matches(name, points) for name in unknown)
        raise ValueError(
            f"record.names must name hook points of the model; got unknown {unknown!r}.{hints}"
        )
    return [name for name in points if name in set(wanted)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode (no dropout), then restore its training flag,
    also when the block raises. Usually paired with :func:`record`::

        with eval_mode(model), record(model, names="blocks.0.attn.hook_pattern") as cache:
            model(tokens)
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def record(
    model: nn.Module,
    *,
    names: NameFilter = None,
    grads: bool = False,
    detach: bool = True,
) -> Iterator[ActivationCache]:
    """Record the tensors at chosen hook points, and optionally their gradients.

    Inside the block, each forward pass stores ``cache[name] = x`` for every selected hook point.
    With ``grads=True``, the backward pass of any loss built from that forward also stores
    ``cache[name + "_grad"] = dL/dx``, the total gradient at the hook (summed over every use of
    ``x`` downstream). Backward may run inside the block or after it. Leaving the block removes
    every hook; the cache stays usable.

    Example::

        with record(model, names=lambda n: n.endswith("attn.hook_z"), grads=True) as cache:
            loss = loss_fn(model(tokens))
            loss.backward()
        u = cache["blocks.0.attn.hook_z_grad"]  # [batch, pos, head, d_head]

    Args:
        model: the module to run; hook names are those set by its root model (module paths
            relative to ``model`` for unnamed hook points).
        names: None for every hook point, an exact name, an iterable of exact names, or a
            predicate ``name -> bool``.
        grads: also record the gradient at each selected hook point.
        detach: store detached tensors (default). With False the stored activations keep their
            autograd graph.

    Raises:
        ValueError: when ``names`` lists a name that is not a hook point of ``model``; when
            ``grads=True`` and grad mode is disabled (``torch.no_grad()``, inference mode) at entry
            or during a recorded forward pass; or when a selected tensor does not require grad
            (nothing upstream of it requires grad) so its gradient cannot exist.
        RuntimeError: when one name is recorded twice (two forward passes in one block).
    """
    if grads and not torch.is_grad_enabled():
        raise ValueError(
            "record: grads=True needs grad mode, but it is disabled (torch.no_grad() or "
            "inference mode); record gradients outside no_grad, or pass grads=False."
        )
    points = hook_points(model)
    cache = ActivationCache()
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            cache._put(name, output.detach() if detach else output)
            if not grads:
                return
            if not torch.is_grad_enabled():
                raise ValueError(
                    f"record: grads=True but {name!r} ran with grad mode disabled "
                    "(torch.no_grad() or inference mode); its gradient cannot be recorded."
                )
            if not output.requires_grad:
                raise ValueError(
                    f"record: grads=True but the tensor at {name!r} does not require grad "
                    "(nothing upstream of it requires grad); its gradient cannot be recorded."
                )

            def grad_hook(grad: torch.Tensor) -> None:
                cache._put(name + "_grad", grad.detach() if detach else grad)

            output.register_hook(grad_hook)

        return forward_hook

    try:
        for name in _selected(points, names):
            handles.append(points[name].register_forward_hook(make_hook(name)))
        yield cache
    finally:
        for handle in handles:
            handle.remove()
