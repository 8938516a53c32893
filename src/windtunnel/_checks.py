"""Argument checks and error-text helpers shared by every module.

Every message follows one template, ``<owner>.<field> must be <rule>; got <value>.``, so
errors read alike wherever they are raised. Config classes collect all problems and raise one
:class:`ConfigError` listing them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "ConfigError",
    "Problems",
    "check_choice",
    "check_finite",
    "check_float_tensor",
    "check_generator",
    "check_mask",
    "check_number",
    "check_positive_int",
    "close_matches",
    "describe_tensor",
    "is_integer_tensor",
    "must",
]


class ConfigError(ValueError):
    """Several problems in one configuration, reported together."""

    def __init__(self, owner: str, problems: Sequence[str]) -> None:
        self.owner = owner
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in {owner}:"
        super().__init__("\n  ".join([head, *self.problems]))


def must(owner: str, field: str, rule: str, got: Any) -> str:
    """The one message template: ``owner.field must be rule; got value.``"""
    return f"{owner}.{field} must be {rule}; got {got!r}."


def describe_tensor(x: Any) -> str:
    """Short description of a tensor for error messages: dtype and shape."""
    if isinstance(x, torch.Tensor):
        dtype = str(x.dtype).replace("torch.", "")
        return f"{dtype} {list(x.shape)}"
    return type(x).__name__


def is_integer_tensor(x: Any) -> bool:
    """True for a tensor of an integer dtype (not float, complex or bool)."""
    return isinstance(x, torch.Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


class Problems:
    """Collects problems and raises them together (``ConfigError``) or the single one (``ValueError``)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.items: list[str] = []

    def add(self, field: str, rule: str, got: Any) -> None:
        self.items.append(must(self.owner, field, rule, got))

    def add_text(self, text: str) -> None:
        self.items.append(text)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ValueError(self.items[0])
        if self.items:
            raise ConfigError(self.owner, self.items)


def check_positive_int(owner: str, field: str, value: Any, *, minimum: int = 1) -> str | None:
    """Return a problem text unless ``value`` is an int >= ``minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return must(owner, field, f"an int >= {minimum}", value)
    return None


def check_number(
    owner: str,
    field: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """Return a problem text unless ``value`` is a finite real number in the given interval."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    rule = f"a number in {left}{low}, {high}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return must(owner, field, rule, value)
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        return must(owner, field, rule, value)
    if math.isinf(value) and not (math.isinf(low) or math.isinf(high)):
        return must(owner, field, rule, value)
    return None


def close_matches(word: str, choices: Iterable[str]) -> str:
    """`` did you mean 'x'?`` when a close match exists, else an empty string."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" did you mean {match[0]!r}?" if match else ""


def check_choice(owner: str, field: str, value: Any, choices: Sequence[Any]) -> str | None:
    """Return a problem text unless ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        hint = close_matches(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        return must(owner, field, f"one of {allowed}", value) + hint
    return None


def check_float_tensor(owner: str, name: str, x: Any, *, min_dim: int, shape_text: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < min_dim:
        raise ValueError(
            f"{owner}: {name} must be a floating-point tensor of shape {shape_text}; "
            f"got {describe_tensor(x)}."
        )


def check_finite(owner: str, name: str, x: Any) -> None:
    """Raise ``ValueError`` when the floating tensor ``x`` holds NaN or inf, with the count of each.

    Anything else (a non-tensor, an integer or bool tensor) passes: its type is checked elsewhere.
    """
    if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
        return
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    n_bad = int((~finite).sum())
    n_nan = int(torch.isnan(x).sum())
    entries = "entry" if n_bad == 1 else "entries"
    raise ValueError(
        f"{owner}: {name} must be finite; got {n_bad} non-finite {entries} "
        f"({n_nan} nan, {n_bad - n_nan} inf) in {describe_tensor(x)}."
    )


def check_generator(
    owner: str, generator: Any, *, optional: bool = True, name: str = "generator"
) -> None:
    """Raise ``TypeError`` unless ``generator`` is a ``torch.Generator`` (or None when ``optional``).

    ``owner`` is the callable as the user wrote it (``"TinyGPT.forward"``); the message gives the
    type that was passed instead, since an int seed or a NumPy generator otherwise fails deep
    inside torch with an unrelated error.
    """
    if isinstance(generator, torch.Generator) or (optional and generator is None):
        return
    rule = "a torch.Generator or None" if optional else "a torch.Generator"
    raise TypeError(f"{owner}: {name} must be {rule}; got {type(generator).__name__}.")


def check_mask(owner: str, mask: Any, shape: Sequence[int], shape_text: str) -> torch.Tensor:
    """Check a boolean attention mask (True = may attend) and broadcast it to ``shape``."""
    target = list(shape)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"{owner}: mask must be bool and broadcastable to {shape_text} = {target}; "
            f"got {describe_tensor(mask)}."
        )
    try:
        return mask.expand(*target)
    except RuntimeError:
        raise ValueError(
            f"{owner}: mask must be bool and broadcastable to {shape_text} = {target}; "
            f"got {describe_tensor(mask)}."
        ) from None
