"""Causal tracing of factual recall (Meng et al., 2022): models, hooks, traces and plots.

Example::

    from tracing import load_model, trace, TraceConfig
    lm = load_model()
    hidden, mlp, attn = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    previews = estimate(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")  # a second's preview
"""

from .hooks import Hook, hooks
from .models import ARCHITECTURES, ArchSpec, LoadedModel
from .loading import describe_placement, load_model, wrap_model
from .result import KINDS, TraceConfig, TraceResult
from .tokens import EncodedPrompt, continuation_ids, encode_prompt
from .reference import trace_reference
from .trace import iter_trace, predict, trace
from .preview import estimate, preview_verdict

__all__ = [
    "ARCHITECTURES", "ArchSpec", "EncodedPrompt", "Hook", "KINDS", "LoadedModel", "TraceConfig", "TraceResult",
    "continuation_ids", "describe_placement", "encode_prompt", "estimate", "hooks", "iter_trace", "load_model", "predict",
    "preview_verdict", "trace", "trace_reference", "wrap_model",
]
