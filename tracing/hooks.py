"""The one way this project touches a model's forward pass.

Example::

    def double(module, args, output):
        return replace_main(output, 2 * main_tensor(output))

    with hooks(model, Hook("transformer.h.3.mlp", double)):
        model(input_ids)          # the MLP output of block 3 is doubled
    # every hook is gone here, also if the forward pass raised

A :class:`Hook` names a module by its dotted path. A forward hook receives
``(module, args, output)`` and may return a replacement output; a pre-hook
(``pre=True``) receives ``(module, args, kwargs)`` and may return replacement
``(args, kwargs)``. Modules whose output is a tuple (attention, some blocks)
carry their state in element 0: use :func:`main_tensor` and
:func:`replace_main` to read and replace it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .models import get_module


@dataclass(frozen=True)
class Hook:
    """A function to run on one module's forward pass, named by dotted path."""

    module: str
    fn: Callable
    pre: bool = False  # run before forward with (module, args, kwargs) instead of after


@contextmanager
def hooks(model: nn.Module, *specs: Hook) -> Iterator[None]:
    """Register hooks for the duration of a ``with`` block; always remove them all."""
    handles = []
    try:
        for spec in specs:
            module = get_module(model, spec.module)
            if spec.pre:
                handles.append(module.register_forward_pre_hook(spec.fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(spec.fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def main_tensor(output) -> torch.Tensor:
    """The state tensor of a module output: the output itself, or element 0 of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def replace_main(output, tensor: torch.Tensor):
    """The module output with its state tensor replaced (tuples keep their other elements)."""
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what was needed is recorded; see :func:`until_stopped`."""


def until_stopped(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when a hook ended it early with :class:`StopForward`."""
    try:
        return fn(*args, **kwargs)
    except StopForward:
        return None


def active_hook_count(model: nn.Module) -> int:
    """How many forward hooks and pre-hooks are registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
