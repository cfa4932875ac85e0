"""The CUDA kernel policy during traces (run with ``--device cuda``; skipped elsewhere).

On CUDA, traces run without cuDNN's attention (it plans every new shape) and,
for ``precision="tf32"``, with TF32 matrix products; both settings are the
process's, so they must come back afterwards, also when a trace fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracing import TraceConfig, trace, trace_reference
from tracing.backends import CUDA_ATTENTION, kernel_policy
from tracing.hooks import Hook, hooks

from conftest import make_tiny

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


@pytest.fixture
def cuda_llama(tokenizer, device):
    if device.type != "cuda":
        pytest.skip("CUDA kernel policy: run with --device cuda")
    return make_tiny("llama", tokenizer, device)


def _seen(lm):
    """A hook on block 0 that records (cuDNN attention enabled, float32 matmul precision) each time it runs."""
    seen = []
    spec = Hook(lm.module_name("hidden", 0), lambda m, a, o: seen.append(
        (torch.backends.cuda.cudnn_sdp_enabled(), torch.get_float32_matmul_precision())))
    return seen, spec


def test_traces_run_without_cudnn_attention_and_restore_the_settings(cuda_llama):
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.get_float32_matmul_precision())
    seen, spec = _seen(cuda_llama)
    with hooks(cuda_llama.model, spec):
        r = trace(cuda_llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=2))[0]
        trace_reference(cuda_llama, PROMPT, SUBJECT, kinds=("mlp",), config=TraceConfig(samples=1, tokens=(9,)))
    assert seen and all(not cudnn and precision == before[2] for cudnn, precision in seen)
    assert r.settings["attention"] == ",".join(CUDA_ATTENTION) and r.settings["device"].startswith("cuda")
    after = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
             torch.get_float32_matmul_precision())
    assert after == before


def test_tf32_only_inside_a_tf32_trace(cuda_llama):
    before = torch.get_float32_matmul_precision()
    seen, spec = _seen(cuda_llama)
    with hooks(cuda_llama.model, spec):
        exact = trace(cuda_llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=2))[0]
        n = len(seen)
        tf32 = trace(cuda_llama, PROMPT, SUBJECT, kinds=("hidden",), config=TraceConfig(samples=2, precision="tf32"))[0]
    assert {p for _, p in seen[:n]} == {before} and {p for _, p in seen[n:]} == {"high"}
    assert torch.get_float32_matmul_precision() == before
    assert tf32.settings["dtype"] == "float32 with TF32 matmuls"
    assert np.max(np.abs(exact.scores - tf32.scores)) < 0.02 * max(exact.high_score, 1e-3) + 1e-3


def test_settings_come_back_when_a_trace_fails(cuda_llama):
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.get_float32_matmul_precision())

    def boom(module, args, output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with kernel_policy(cuda_llama.device, tf32=True), hooks(cuda_llama.model, Hook(cuda_llama.spec.embed, boom)):
            cuda_llama.model(torch.tensor([[1, 2, 3]], device=cuda_llama.device))
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.get_float32_matmul_precision()) == before


def test_gpu_plan_puts_kinds_and_tokens_in_few_passes(cuda_llama):
    results = trace(cuda_llama, PROMPT, SUBJECT, config=TraceConfig(samples=3))
    assert {r.settings["batching"] for r in results} == {"all"}
    assert results[-1].settings["passes"] <= 3  # one per token bucket, not one per kind and token (27)
