"""The page over ``tracing`` and ``editing``: a serving engine, limits, handlers, rendering and layout.

Modules, in reading order:

* :mod:`webapp.limits` - every bound on a request, checked before the model is touched (no Gradio);
* :mod:`webapp.engine` - the one shared model, its queue, lock, deadlines and memo (no Gradio);
* :mod:`webapp.render` - library results as HTML (no Gradio);
* :mod:`webapp.handlers` - the events: check, call one library function through the engine, render;
* :mod:`webapp.layout` - the header, one function per tab, the wiring, and ``launch``.

Example::

    from webapp import build_demo, create_engine, launch
    engine = create_engine()
    launch(build_demo(engine), engine, host="127.0.0.1", port=7860)
"""

from .engine import Engine, Visitor, create_engine
from .limits import Limits, Refused

__all__ = ["Engine", "Limits", "Refused", "Visitor", "build_demo", "create_engine", "launch"]


def __getattr__(name: str):
    if name in ("build_demo", "launch"):  # imported on use: the engine and limits work without Gradio
        from . import layout

        return getattr(layout, name)
    raise AttributeError(f"module 'webapp' has no attribute {name!r}")
