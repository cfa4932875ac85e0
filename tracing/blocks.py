"""Calling a model's blocks directly: from any layer, on a suffix of positions.

Both engines need to rerun only part of a model: tracing restores a state at
layer l and token t, so layers below l and positions before t are the
corrupted run's; ROME optimises a vector added at layer l*, so the layers
below l* never change. Instead of knowing each family's block signature, we
record what the model itself passes each block (masks, rotary position
embeddings, position ids, cache) for a given prefix length, and replay it with
other hidden states and a :class:`PrefixCache` that supplies the earlier
positions' keys and values.

Example::

    calls, first_input = capture_calls(lm, ids, start=3)     # tokens 3.. after a cached 0..2
    cache = PrefixCache({j: (k[:, :, :3], v[:, :, :3]) for j, (k, v) in enumerate(kv)})
    hidden = first_input                                        # (rows, tokens - 3, d_model)
    for j in range(lm.n_layers):
        hidden = calls[j](lm.block(j), hidden, cache)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .hooks import Hook, hooks, main_tensor
from .models import LoadedModel, returned_cache, with_cache


class PrefixCache:
    """A stand-in for a transformers ``Cache`` in direct block calls.

    ``update`` returns the layer's fixed prefix keys/values (rows, kv_heads,
    prefix, head_dim) followed by the new ones. ``rows`` gathers prefix rows
    per batch row (e.g. the corrupted copy each restored row belongs to);
    ``record=True`` keeps each layer's new keys and values in ``recorded``.
    """

    def __init__(
        self,
        prefix: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        rows: torch.Tensor | None = None,
        record: bool = False,
    ):
        self.prefix = prefix if isinstance(prefix, Mapping) else dict(enumerate(prefix))
        self.rows, self.record = rows, record
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows_on: dict[torch.device, torch.Tensor] = {}  # ``rows`` on each device a layer's prefix sits on

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.record:
            self.recorded[layer_idx] = (key, value)
        past = self.prefix.get(layer_idx)
        if past is None or past[0].shape[-2] == 0:
            return key, value
        past_k, past_v = past
        if self.rows is not None:
            rows = self._rows_on.get(past_k.device)
            if rows is None:  # a sharded model's layers sit on several devices: rows go to each once
                rows = self._rows_on.setdefault(past_k.device, self.rows.to(past_k.device))
            past_k, past_v = past_k[rows], past_v[rows]
        return torch.cat([past_k, key], dim=-2), torch.cat([past_v, value], dim=-2)


def is_cache(value) -> bool:
    """Whether a block argument is a key/value cache (transformers' or ours)."""
    from transformers.cache_utils import Cache

    return isinstance(value, (Cache, PrefixCache))


@dataclass(frozen=True)
class BlockCall:
    """The arguments a model passed one block, minus the hidden states, ready to replay."""

    args: tuple
    kwargs: dict

    def __call__(self, block: torch.nn.Module, hidden: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Run ``block`` on ``hidden`` (rows, positions, d_model); batch-1 arguments are broadcast to the rows."""
        rows = hidden.shape[0]

        def fit(value):
            if is_cache(value):
                return cache
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == 1 and rows != 1:
                return value.expand(rows, *value.shape[1:])
            if isinstance(value, tuple):
                return tuple(fit(v) for v in value)
            return value

        args = tuple(fit(a) for a in self.args)
        kwargs = {k: fit(v) for k, v in self.kwargs.items() if k != "hidden_states"}
        return main_tensor(block(hidden, *args, **kwargs))


def record_calls(lm: LoadedModel, first_layer: int = 0) -> tuple[list[Hook], dict[int, BlockCall], list[torch.Tensor]]:
    """Pre-hooks that record each block's call from ``first_layer`` on, and block ``first_layer``'s input.

    Returns (hooks to register, layer -> BlockCall filled during the forward
    pass, a list that receives block ``first_layer``'s input).
    """
    calls: dict[int, BlockCall] = {}
    first: list[torch.Tensor] = []

    def recorder(layer):
        def record(module, args, kwargs):
            if layer == first_layer:
                first.append(args[0] if args else kwargs["hidden_states"])
            calls[layer] = BlockCall(tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return record

    specs = [Hook(lm.module_name("hidden", j), recorder(j), pre=True) for j in range(first_layer, lm.n_layers)]
    return specs, calls, first


def capture_calls(lm: LoadedModel, ids: Sequence[int], start: int) -> tuple[list[BlockCall], torch.Tensor]:
    """What each block receives when the model runs tokens[start:] after a cached tokens[:start].

    Returns one :class:`BlockCall` per layer and block 0's input (1, tokens - start, d_model).
    """
    base = lm.model.base_model  # no unembedding: only the blocks' arguments matter here
    device = lm.device
    with torch.inference_mode():
        past = None
        if start > 0:
            past = returned_cache(base(torch.tensor([ids[:start]], device=device), use_cache=True))
        specs, calls, first = record_calls(lm)
        with hooks(lm.model, *specs):
            base(torch.tensor([ids[start:]], device=device), use_cache=True, **with_cache(base, past))
    return [calls[j] for j in range(lm.n_layers)], first[0]
