"""editing.batch: requests from CSV and JSON, a MEMIT batch scored fact by fact, the command line.

Oracles: parsing is checked against the facts written into the texts; the
batch's scores before and after equal :func:`editing.scores.score_edit` of
each fact on the unedited model and with the batch applied; the model is
bitwise unchanged afterwards, also when stopped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny
from editing_fixtures import TINY_STATS, changed, private_cache, snapshot
from editing_fixtures import one_thread  # noqa: F401 - autouse: one torch thread in this module

from editing import EditRequest, applied, load_edits, model_answer, score_edit
from editing.batch import BatchItem, parse_requests, read_requests, write_batch
from editing.hparams import MEMITHyperParams
from tracing.hooks import active_hook_count

TINY_MEMIT = MEMITHyperParams(layers=(1, 2), context_templates=((3, 2),), stats_tokens=512, stats_sample_length=32,
                              clamp_norm_factor=4.0, mom2_update_weight=50.0, v_num_grad_steps=8)
CSV = ("subject,relation prompt,new object,old object\n"
       "The Eiffel Tower,{} is located in the city of,Rome,Paris\n"
       "\n"
       'Michael Jordan,"{} plays the sport of, professionally",golf,basketball\n')


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with private_cache(tmp_path_factory.mktemp("batch-cache")) as path:
        yield path


def test_csv_with_a_header_or_without_and_json_of_every_shape():
    items = parse_requests(CSV)
    assert [it.request for it in items] == [
        EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
        EditRequest("Michael Jordan", "{} plays the sport of, professionally", "golf", "basketball")]
    bare = parse_requests("The Louvre,{} is in,Berlin\n")
    assert bare == [BatchItem(EditRequest("The Louvre", "{} is in", "Berlin"))]
    plain = json.dumps([{"subject": "A", "prompt": "{} is in", "target": "B", "neighbours": ["C is in"]}])
    assert parse_requests(plain)[0] == BatchItem(EditRequest("A", "{} is in", "B"), (), ("C is in",))
    case = {"requested_rewrite": {"subject": "X", "prompt": "{} speaks", "target_new": {"str": "Y"},
                                  "target_true": {"str": "Z"}}, "paraphrase_prompts": ["p"],
            "neighborhood_prompts": ["n"]}
    assert parse_requests(json.dumps([case]))[0] == BatchItem(EditRequest("X", "{} speaks", "Y", "Z"), ("p",), ("n",))
    preset = {"subject": "S", "rewrite_prompt": "{} is a", "counterfactual": "cat", "attribute": "dog",
              "paraphrases": ["q"], "neighbours": []}
    assert parse_requests(json.dumps({"presets": [preset]}))[0].request == EditRequest("S", "{} is a", "cat", "dog")
    assert parse_requests("  \n") == []


@pytest.mark.parametrize("text, message", [
    ("subject,prompt\nA,{} is", "no target column"),
    ("A,{} is in", "Row 1"),
    ("A,is in,B", "Fact 1.*no {} placeholder"),
    ("[{\"subject\": \"A\"}]", "Fact 1 lacks"),
    ("[1, 2]", "Fact 1 is not an object"),
    ("[{]", "not valid JSON"),
    ("A,{} is,B\nC,{} is,D\nE,{} is,F", "3 facts are more than the 2"),
])
def test_bad_requests_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_requests(text, max_items=2)


def test_a_file_too_large_is_refused_unread(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("A,{} is,B\n" * 1000)
    with pytest.raises(ValueError, match="at most"):
        read_requests(path, max_bytes=1000)
    assert len(read_requests(path, max_bytes=100_000)) == 1000
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        read_requests(tmp_path / "bin.csv")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scores_before_and_after_are_each_facts_own(cache, tokenizer, device, family):
    lm = make_tiny(family, tokenizer, device)
    saved = snapshot(lm.model)
    items = parse_requests(CSV)
    items[0] = BatchItem(items[0].request, ("{} can be found in the city of",),
                         ("The Louvre is located in the city of", "Michael Jordan is a"))
    stages = []
    result = write_batch(lm, items, hparams=TINY_MEMIT, stats_spec=TINY_STATS,
                         progress=lambda stage, f: stages.append(stage))
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    assert result.edit.method == "memit" and result.edit.layers == (1, 2) and len(result.edit.requests) == 2
    assert result.neighbours_left_out == 1  # names Michael Jordan, a subject of the batch
    for i, item in enumerate(result.items):
        args = dict(paraphrases=item.paraphrases, neighbours=result.before[i].prompts[1 + len(item.paraphrases):])
        expected = score_edit(lm, item.request, **args)
        np.testing.assert_allclose(result.before[i].logp_new, expected.logp_new, atol=1e-5)
        with applied(lm, [result.edit]):
            expected = score_edit(lm, item.request, **args)
        np.testing.assert_allclose(result.after[i].logp_old, expected.logp_old, atol=1e-5)
    rows = result.rows()
    assert [r["subject"] for r in rows] == ["The Eiffel Tower", "Michael Jordan"]
    assert rows[0]["p_new_after"] == pytest.approx(float(result.after[0].prob_new[0]))
    assert set(stages) >= {"answer", "before", "optimising", "update", "after", "health"}
    assert result.health is not None and result.health.layers == (1, 2)
    record = result.to_dict()
    assert record["facts"] == 2 and json.dumps(record)
    s = result.summary("after")
    assert 0 <= s["ES"] <= 1 and not np.isnan(s["PS"]) and not np.isnan(s["NS"])


def test_stopping_leaves_the_model_untouched_and_bad_facts_fail_before_work(cache, tokenizer, device):
    lm = make_tiny("llama", tokenizer, device)
    saved = snapshot(lm.model)

    def stop(stage, fraction):
        if stage == "optimising":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_batch(lm, parse_requests(CSV), hparams=TINY_MEMIT, stats_spec=TINY_STATS, progress=stop)
    assert changed(lm.model, saved) == [] and active_hook_count(lm.model) == 0
    seen = []
    with pytest.raises(ValueError, match="repeats the subject and prompt"):
        write_batch(lm, parse_requests(CSV + "The Eiffel Tower,{} is located in the city of,Oslo\n"),
                    hparams=TINY_MEMIT, stats_spec=TINY_STATS, progress=lambda s, f: seen.append(s))
    answer = model_answer(lm, "The Louvre is in")
    with pytest.raises(ValueError, match="already answers"):
        write_batch(lm, [EditRequest("The Louvre", "{} is in", answer)], hparams=TINY_MEMIT, stats_spec=TINY_STATS,
                    progress=lambda s, f: seen.append(s))
    assert "optimising" not in seen


def test_command_line_writes_a_batch_file(cache, tokenizer, tmp_path, capsys):
    from editing.batch.__main__ import main

    folder = tmp_path / "tiny"
    lm = make_tiny("llama", tokenizer, torch.device("cpu"))
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "facts.csv").write_text(CSV)
    hp = tmp_path / "memit.json"
    hp.write_text(json.dumps({**TINY_MEMIT.to_dict(), "stats_tokens": 256}))
    out = tmp_path / "batch.safetensors"
    assert main(["--requests", str(tmp_path / "facts.csv"), "--model", str(folder), "--hparams", str(hp),
                 "--save", str(out), "--no-health"]) == 0
    text = capsys.readouterr().out
    assert "2 facts in one MEMIT edit at layers 1, 2" in text and "p(new) before" in text
    (edit,) = load_edits(out)
    assert len(edit.requests) == 2
    assert main(["--requests", str(tmp_path / "missing.csv"), "--model", str(folder)]) == 2
    assert "error:" in capsys.readouterr().err
