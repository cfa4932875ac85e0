"""Shared by the app tests: a tiny-model engine, quick settings, and a launched page."""

from __future__ import annotations

import socket

import pytest

from editing.presets import load_presets
from webapp import Engine, Limits, build_demo, launch

from conftest import make_tiny
from editing_fixtures import TINY_HPARAMS, private_cache

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
# App.trace(prompt, subject, answer, samples, noise, window, corruption, metric, contrast, seed, precision, fast, visitor)
QUICK = dict(samples=2, noise=3.0, window=2, corruption="gaussian", metric="prob", contrast="", seed=1,
             precision="auto", fast=True)
# App.edit(subject, relation, target, old, layer, method, paraphrases, neighbours, max_new_tokens, sample, seed, visitor)
EDIT = dict(subject="The Eiffel Tower", relation="{} is located in the city of", target="Rome", old="Paris", layer=1,
            method="rome",
            paraphrases="The Eiffel Tower, located in the city of\nThe Eiffel Tower can be found in",
            neighbours="The Louvre is located in the city of\nNotre-Dame is located in the city of",
            max_new_tokens=5, sample=False, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_engine(tmp_path_factory, tokenizer, device, hparams=TINY_HPARAMS) -> Engine:
    """An engine over a tiny random Llama with the shipped presets and fast ROME settings."""
    lm = make_tiny("llama", tokenizer, device)
    return Engine(lm, presets=load_presets().presets, presets_model="test", hparams=hparams,
                  workdir=tmp_path_factory.mktemp("app-files"),
                  limits=Limits(trace_cost=20_000))  # the tiny model has 4 layers: a cost the tests can reach


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer, device):
    """:func:`tiny_engine`, with a private cache for the module."""
    with private_cache(tmp_path_factory.mktemp("app-cache")):
        yield tiny_engine(tmp_path_factory, tokenizer, device)


@pytest.fixture(scope="module")
def served(engine):
    """The page for ``engine``, launched in this process; yields its URL."""
    demo = build_demo(engine)
    port = free_port()
    launch(demo, engine, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
