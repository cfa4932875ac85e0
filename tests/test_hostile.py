"""Hostile input through the served page's API (gradio_client, the routes the page uses), on a tiny model.

Each row of the table is one request a visitor or a script could send. Every
one must end with a clear message (or a proper result, for odd but valid
input), never a traceback; afterwards the server still answers and every
weight of the shared model is bitwise the original.
"""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
from gradio_client import Client, handle_file
from safetensors.numpy import save_file

from conftest import make_tiny
from editing import Edit, EditRequest, compute_edit, save_edits
from editing_fixtures import TINY_HPARAMS, changed, snapshot

from app_fixtures import EDIT, QUICK, engine, served  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
HUGE = "word " * 50_000
LINES_100 = "\n".join(f"{SUBJECT} number {i} is in" for i in range(100))


def trace_args(**changes) -> tuple:
    values = {"prompt": PROMPT, "subject": SUBJECT, "answer": "", **QUICK, **changes}
    return tuple(values.values())


def edit_args(**changes) -> tuple:
    return tuple({**EDIT, **changes}.values())


def table(rows: list) -> dict:
    """A Dataframe value as an API client sends it."""
    return {"headers": ["Subject", "Relation prompt ({} = subject)", "New object", "Old object (optional)"],
            "data": rows}


def compare_args(prompt="The Eiffel Tower is in", max_new=4, sample=False, seed=0) -> tuple:
    return (prompt, max_new, sample, seed)


# (route, arguments, what the message must say) - None: a proper result is expected
CASES = [
    # -- traces --------------------------------------------------------------------------
    ("/trace", trace_args(prompt=""), "prompt is empty"),
    ("/trace", trace_args(prompt="   \n\t "), "prompt is empty"),
    ("/trace", trace_args(prompt=HUGE + PROMPT), "limit text_chars"),
    ("/trace", trace_args(prompt="word " * 50 + PROMPT), "limit trace_tokens"),
    ("/trace", trace_args(prompt=PROMPT + "\x00"), "control characters"),
    ("/trace", trace_args(prompt="\x00"), "control characters"),
    ("/trace", trace_args(subject="Big Ben"), "does not occur in the prompt"),
    ("/trace", trace_args(subject=HUGE), "limit text_chars"),
    ("/trace", trace_args(subject="word " * 40, prompt="word " * 40 + "is in"), "limit"),
    ("/trace", trace_args(answer="Paris " * 5_000), "limit text_chars"),
    ("/trace", trace_args(answer="Paris\x00"), "control characters"),
    ("/trace", trace_args(samples=0), r"(Samples must be between|less than minimum)"),
    ("/trace", trace_args(samples=-5), r"(Samples must be between|less than minimum)"),
    ("/trace", trace_args(samples=10**9), r"(limit samples|greater than maximum)"),
    ("/trace", trace_args(samples="inf"), r"(finite|greater than maximum|number)"),
    ("/trace", trace_args(samples="NaN"), r"(finite|number)"),
    ("/trace", trace_args(samples="ten"), r"number"),
    ("/trace", trace_args(noise=0), r"(Noise must be between|less than minimum)"),
    ("/trace", trace_args(noise=-1), r"(Noise must be between|less than minimum)"),
    ("/trace", trace_args(noise=1e308), r"(Noise must be between|greater than maximum)"),
    ("/trace", trace_args(noise="nan"), r"(finite|number)"),
    ("/trace", trace_args(window=0), r"(Window must be between|less than minimum)"),
    ("/trace", trace_args(window=1000), r"(Window must be between|greater than maximum)"),
    ("/trace", trace_args(window=2.5), r"(whole number|Window)"),
    ("/trace", trace_args(corruption="evil"), r"(Corruption must be one of|not in the list|choices)"),
    ("/trace", trace_args(metric="logit_diff"), "contrast answer"),
    ("/trace", trace_args(metric="__import__('os').system('ls')"), r"(Metric must be one of|not in the list|choices)"),
    ("/trace", trace_args(seed=-1), r"(seed|Seed|less than minimum)"),
    ("/trace", trace_args(seed=2**80), r"(Seed must be between|seed)"),
    ("/trace", trace_args(precision="fp64"), r"(Precision must be one of|not in the list|choices)"),
    ("/trace", trace_args(fast="yes"), "Quick trace must be true or false"),
    ("/trace", trace_args(samples=50, fast=False, prompt="word " * 30 + PROMPT), "limit trace_cost"),
    ("/trace", trace_args(prompt="🦄🦄 is the favourite animal of", subject="🦄🦄"), None),
    ("/trace", trace_args(prompt="<script>alert(1)</script> is located in", subject="<script>alert(1)</script>"),
     None),
    ("/trace", trace_args(prompt="{} {0} %s is located in the city of", subject="{0}"), None),
    ("/trace", trace_args(prompt="\u202eThe Eiffel\u200d Tower is located in", subject="The Eiffel\u200d Tower"),
     None),
    # -- edits -----------------------------------------------------------------------------
    ("/edit", edit_args(relation="The Eiffel Tower is located in"), "placeholder"),
    ("/edit", edit_args(relation="{} and {} are in"), "placeholders"),
    ("/edit", edit_args(relation="{0} is located in"), "placeholder"),
    ("/edit", edit_args(relation="{}"), "only a placeholder"),
    ("/edit", edit_args(target=""), "new object is empty"),
    ("/edit", edit_args(target="Rome " * 5_000), "limit text_chars"),
    ("/edit", edit_args(target="Rome " * 20), "limit object_tokens"),
    ("/edit", edit_args(subject="Eiffel " * 5_000), "limit text_chars"),
    ("/edit", edit_args(subject="The\x00Tower"), "control characters"),
    ("/edit", edit_args(old="rome", target="Rome"), "same as the old one"),
    ("/edit", edit_args(layer=-1), r"(between 0 and 3|less than minimum)"),
    ("/edit", edit_args(layer=10**6), r"(between 0 and 3|greater than maximum)"),
    ("/edit", edit_args(layer="NaN"), r"(finite|number)"),
    ("/edit", edit_args(paraphrases=LINES_100), "limit test_lines"),
    ("/edit", edit_args(neighbours=LINES_100), "limit test_lines"),
    ("/edit", edit_args(neighbours="x" * 10_000), "limit text_chars"),
    ("/edit", edit_args(neighbours="word " * 45), "limit line_tokens"),
    ("/edit", edit_args(max_new_tokens=10**9), r"(limit new_tokens|greater than maximum)"),
    ("/edit", edit_args(max_new_tokens=0), r"(New tokens must be between|less than minimum)"),
    ("/edit", edit_args(seed="abc"), r"number"),
    ("/edit", edit_args(sample="true"), "Sample must be true or false"),
    ("/edit", edit_args(relation="{} is {in} the city of"), None),
    # -- free completions ----------------------------------------------------------------------
    ("/compare", compare_args(prompt=HUGE), "limit text_chars"),
    ("/compare", compare_args(prompt=""), "prompt is empty"),
    ("/compare", compare_args(max_new=10**6), r"(limit new_tokens|greater than maximum)"),
    ("/compare", compare_args(prompt="<img src=x onerror=alert(1)>"), None),
    # -- many facts at once (the table as an API client sends it; the facts' test prompts are server state) ----
    ("/write_batch", (table([["A", "{} is", "B", ""]] * 100), False), r"(limit batch_facts|row)"),
    ("/write_batch", (table([["x" * 5_000, "{} is", "B", ""]]), False), "Row 1: .*limit text_chars"),
    ("/write_batch", (table([["", "", "", ""]]), False), "has no facts"),
    ("/write_batch", (table([["A", "{} is", "B", "b"]]), False), "same as the old one"),
    ("/write_batch", (table([["A", "{} is", "B\x00", ""]]), False), "control characters"),
    ("/write_batch", (table([["A", "{} is", "Rome " * 20, ""]]), False), "limit object_tokens"),
    ("/write_batch", (table([["A", "{} is", "B", ""]]), "yes"), r"(must be true or false|bool)"),
    ("/write_batch", (table([["<script>alert(1)</script>", "{} is located in", "Rome", ""]]), False), None),
    ("/batch_paste", (HUGE, table([["", "", "", ""]])), "longer than a batch"),
    ("/batch_paste", ("A,{} is,B\n" * 50, table([["", "", "", ""]])), "more than the 12"),
    ("/batch_paste", ("[{\"subject\": 1}]", table([["", "", "", ""]])), "Fact 1"),
    # -- presets -----------------------------------------------------------------------------
    ("/preset", (-1,), "preset must be between"),
    ("/preset", (10**9,), "preset must be between"),
    ("/preset", ("a",), r"number"),
    ("/retrace_values", ("The Eiffel Tower", "no placeholder", "Rome"), "placeholder"),
    # -- which layer to edit (the traced fact is session state: the one this client traced last, if any) -------
    ("/which_layer", ("Rome", 0, "", ""), r"(Trace a fact first|between 1 and 4|less than minimum)"),
    ("/which_layer", ("Rome", "all", "", ""), r"(Trace a fact first|must be a number|Expected a `float`)"),
    ("/which_layer", ("x" * 5_000, 1, "", ""), r"(Trace a fact first|limit text_chars)"),
    ("/which_layer", ("Rome", 1, "a\n" * 50, ""), r"(Trace a fact first|limit test_lines)"),
]


@pytest.fixture(scope="module")
def client(served):
    demo, url = served
    return Client(url, verbose=False)


def assert_clear(message: str) -> None:
    assert "Traceback" not in message and 'File "' not in message, message
    assert len(message) < 2000, message


def check_result(route: str, out) -> None:
    if route == "/write_batch":  # the history table holds the request as data (a Dataframe shows text, not HTML)
        out = [value for i, value in enumerate(out) if i != 1]
    text = json.dumps(out, default=str)
    assert "<script>alert(1)</script>" not in text and "<img src=x" not in text  # escaped in every HTML output
    if route == "/trace":
        assert all(plot["type"] == "plotly" for plot in out[1:4])


@pytest.mark.parametrize("route,args,message", CASES, ids=[f"{i}-{c[0][1:]}" for i, c in enumerate(CASES)])
def test_hostile_input_gets_a_clear_message_and_changes_nothing(served, engine, client, route, args, message):
    saved = snapshot(engine.lm.model)
    if message is None:
        check_result(route, client.predict(*args, api_name=route))
    else:
        with pytest.raises(Exception) as caught:
            client.predict(*args, api_name=route)
        text = str(caught.value)
        assert_clear(text)
        assert __import__("re").search(message, text), text
    assert changed(engine.lm.model, saved) == []
    assert client.predict(api_name="/model_info")["layers"] == engine.lm.n_layers  # the server lives


@pytest.fixture(scope="module")
def files(tmp_path_factory, engine, tokenizer, device):
    """Edit files a visitor could upload: broken, foreign, oversized, made for another model."""
    folder = tmp_path_factory.mktemp("uploads")
    lm = engine.lm
    good = compute_edit(lm, EditRequest(SUBJECT, "{} is located in the city of", "Rome", "Paris"),
                        hparams=TINY_HPARAMS)
    twin = make_tiny("llama", tokenizer, device, seed=3)  # the same shapes, other weights
    made = {}
    made["empty"] = folder / "empty.safetensors"
    made["empty"].write_bytes(b"")
    made["random"] = folder / "random.safetensors"
    made["random"].write_bytes(os.urandom(4096))
    made["pickle"] = folder / "pickle.safetensors"
    made["pickle"].write_bytes(pickle.dumps({"u": [1.0, 2.0]}))
    made["pt"] = folder / "edits.pt"
    made["pt"].write_bytes(pickle.dumps([]))
    made["absurd_header"] = folder / "absurd.safetensors"
    made["absurd_header"].write_bytes((2**62).to_bytes(8, "little") + b"{}")
    made["other_format"] = folder / "weights.safetensors"
    save_file({"weight": np.zeros(3, np.float32)}, str(made["other_format"]))
    wrong_shape = Edit(request=good.request, layer=1, module=good.module, u=np.ones(7, np.float32),
                       v=np.ones(5, np.float32), key=np.ones(7, np.float32), value=np.ones(5, np.float32),
                       fingerprint=lm.fingerprint)
    made["wrong_shape"] = save_edits([wrong_shape], folder / "shape.safetensors")
    with __import__("editing_fixtures").private_cache(folder / "twin-cache"):
        other = compute_edit(twin, good.request, hparams=TINY_HPARAMS)
    made["other_model"] = save_edits([other], folder / "other.safetensors")
    made["too_many"] = save_edits([good] * 25, folder / "many.safetensors")
    header = {"format": "locate-edit/rome-edits", "version": "1", "edits": json.dumps([good.metadata()] * 300)}
    made["header_claims"] = folder / "claims.safetensors"
    save_file({f"edit0.{n}": getattr(good, n) for n in ("u", "v", "key", "value")}, str(made["header_claims"]),
              metadata=header)
    bad_request = {**good.metadata(), "request": {**good.request.to_dict(), "target": "Rome " * 100}}
    made["long_request"] = folder / "request.safetensors"
    save_file({f"edit0.{n}": getattr(good, n) for n in ("u", "v", "key", "value")}, str(made["long_request"]),
              metadata={**header, "edits": json.dumps([bad_request])})
    made["big"] = folder / "big.safetensors"
    with open(made["big"], "wb") as f:  # sparse: 50 MB on paper, over the 40 MB import limit
        f.truncate(50_000_000)
    made["good"] = save_edits([good], folder / "good.safetensors")
    return made


UPLOADS = [
    ("empty", r"(not a readable edits file|only 0 bytes)"),
    ("random", "not a readable edits file"),
    ("pickle", "not a readable edits file"),
    ("pt", r"(pickle files are never loaded|Invalid file type)"),  # Gradio's file-type check comes first
    ("absurd_header", "header is longer than the file"),
    ("other_format", "not a locate-edit edits file"),
    ("wrong_shape", "another model"),
    ("other_model", "was made for"),
    ("too_many", "at most 20 are accepted"),
    ("header_claims", "at most 20 are accepted"),
    ("long_request", "limit"),
    ("big", r"(40,000,000 bytes|maximum file size of 40000000)"),  # the client checks first; see the raw upload
]


@pytest.mark.parametrize("name,message", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_hostile_uploads_are_refused_with_the_reason(engine, client, files, name, message):
    saved = snapshot(engine.lm.model)
    with pytest.raises(Exception) as caught:
        client.predict(handle_file(str(files[name])), api_name="/import_edits")
    text = str(caught.value)
    assert_clear(text)
    assert __import__("re").search(message, text), text
    assert changed(engine.lm.model, saved) == []
    history, *_ = client.predict(handle_file(str(files["good"])), api_name="/import_edits")
    assert len(history["data"]) >= 1  # the server lives, and a good file still imports
    client.predict(api_name="/reset")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_an_oversized_upload_is_refused_while_it_arrives(served, engine):
    """200 MB streamed straight to the upload route (no client-side check): refused, never held in memory."""
    assert engine.limits.import_bytes < 200 << 20
    import httpx

    demo, url = served
    boundary = "locateeditboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.safetensors\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        chunk = b"\0" * (1 << 20)
        for _ in range(200):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before = _rss_mb()
    response = httpx.post(f"{url}gradio_api/upload", content=body(), timeout=120,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "maximum allowed size" in response.text, response.text
    assert _rss_mb() - before < 100  # the upload was never held in memory (it would add 200 MB)
