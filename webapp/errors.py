"""How the page shows errors: a message in the page (``gr.Error``) that says what to do, never a traceback.

Example::

    @user_errors
    def trace(self, prompt, ...):      # a ValueError("The prompt is empty.") becomes that message in the page
        ...
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from .engine import Stopped

log = logging.getLogger("locate-edit.app")


def user_errors(fn: Callable) -> Callable:
    """Show errors as a message in the page (gr.Error), never a traceback; a stopped request ends quietly.

    ValueError/LookupError (bad input, a refused request, a deadline) carry
    their fix in the message and are shown as they are; anything else is
    logged with its traceback and summarised.
    """

    def convert(exc: BaseException) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, (ValueError, LookupError)):
            return gr.Error(str(exc), print_exception=False)
        log.exception("Unexpected error in %s", fn.__name__)
        return gr.Error(
            f"Something went wrong ({type(exc).__name__}: {str(exc)[:300]}). "
            "The model was restored to its original weights; please try again.",
            print_exception=False,
        )

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Stopped:
                return
            except Exception as exc:  # noqa: BLE001 - converted for the page
                raise convert(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Stopped:
            return None
        except Exception as exc:  # noqa: BLE001 - converted for the page
            raise convert(exc) from None

    return wrapper
