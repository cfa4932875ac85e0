"""Which GPU kernels traces and edits use: the attention backends and TF32, chosen here and nowhere else.

PyTorch's scaled-dot-product attention may pick cuDNN's kernel on CUDA, and
cuDNN builds a new execution plan for every (batch, length) shape it meets
(about 7 ms of CPU each). A trace meets many shapes, so its first run paid
ten times its steady cost (H200: 12.1 s instead of 1.3 s). On CUDA the
library therefore enables only the backends that need no plan -- FlashAttention,
memory-efficient attention and the math fallback -- for the duration of each
call, and puts the previous settings back afterwards.

Example::

    with kernel_policy(lm.device):              # what trace, trace_reference and predict do
        lm.model(ids)
    with kernel_policy(lm.device, tf32=True):   # float32 weights, TF32 matrix products (CUDA only)
        ...

``$LOCATE_EDIT_ATTENTION`` overrides the backends: a comma-separated list of
``flash``, ``efficient``, ``cudnn`` and ``math`` (tried in PyTorch's order), or
``torch`` for PyTorch's own choice. On the CPU PyTorch chooses, except for
bf16 passes that are differentiated (the preview's backward pass): there the
math backend, since the CPU's flash-attention kernel is slow in bf16 backward
(the Eiffel Tower preview in bf16, one thread: 0.52 s with it, 0.32 s with math).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

log = logging.getLogger(__name__)

ATTENTION_ENV = "LOCATE_EDIT_ATTENTION"
CUDA_ATTENTION = ("flash", "efficient", "math")  # no per-shape plans: a first trace costs about what the next does


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    try:
        return names[name]
    except KeyError:
        raise ValueError(
            f"${ATTENTION_ENV}={os.environ.get(ATTENTION_ENV)!r} names an unknown attention backend {name!r}; "
            f"use a comma-separated list of {', '.join(names)}, or 'torch' for PyTorch's own choice."
        ) from None


def attention_backends(device: torch.device | str) -> tuple[str, ...] | None:
    """The attention backends used on ``device``, or None for PyTorch's own choice (always on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    chosen = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if chosen == "torch":
        return None
    if not chosen:
        return CUDA_ATTENTION
    names = tuple(part.strip() for part in chosen.split(",") if part.strip())
    for name in names:
        _backend_enum(name)
    return names or CUDA_ATTENTION


def uses_tf32(device: torch.device | str, dtype: torch.dtype, tf32: bool) -> bool:
    """Whether float32 matrix products run as TF32: asked for, float32 weights, and a CUDA device."""
    return tf32 and dtype == torch.float32 and torch.device(device).type == "cuda"


def precision_label(device: torch.device | str, dtype: torch.dtype, tf32: bool = False) -> str:
    """What a run computed in, for results and reports: 'float32', 'bfloat16', 'float32 with TF32 matmuls'."""
    name = str(dtype).removeprefix("torch.")
    return f"{name} with TF32 matmuls" if uses_tf32(device, dtype, tf32) else name


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX-512 BF16 instructions).

    There a bf16 matrix product is several times faster than a float32 one;
    on other CPUs (AVX2 only) bf16 is emulated and slower than float32.
    """
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes
        return False


@contextmanager
def kernel_policy(device: torch.device | str, *, tf32: bool = False, dtype: torch.dtype = torch.float32,
                  backward: bool = False) -> Iterator[None]:
    """Use this module's attention backends (and TF32 if asked) on ``device`` for the ``with`` block.

    ``backward``: the block differentiates through attention (on a CPU in
    bf16 that selects the math backend). The previous global settings come
    back on exit, also on exceptions. Keep the block around computation only
    (not around a ``yield`` to a caller).
    """
    backends = attention_backends(device)
    if backends is None and backward and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        backends = ("math",)
    with ExitStack() as stack:
        if backends is not None:
            from torch.nn.attention import sdpa_kernel

            log.debug("attention backends on %s: %s ($%s overrides)", device, ", ".join(backends), ATTENTION_ENV)
            stack.enter_context(sdpa_kernel([_backend_enum(name) for name in backends]))
        if uses_tf32(device, dtype, tf32):
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            stack.callback(torch.set_float32_matmul_precision, before)
        yield


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, torch runs single-threaded for the block (restored on exit, also on errors).

    For the small operations of a preview or one short forward pass: two
    threads wait on each other at every one, and on a busy shared machine a
    thread that is not scheduled stalls the other. On 2 shared cores the
    Eiffel Tower preview took 0.7 s on one thread and 26 s on two; the page's
    top-5 prediction of that prompt 0.16 s on one and 0.3-0.9 s on two.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
