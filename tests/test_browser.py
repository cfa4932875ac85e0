"""The page in a real browser: headless Chromium (Debian package) driven by Playwright, the real model.

Starts ``python app.py`` as a visitor would, clicks a preset, runs its trace
(watching its progress) and waits for the three heatmaps, applies the preset's
edit, checks that the rewrite prompt's generation now contains the new object
(and did not before), undoes it, pastes two more presets into the batch table,
opens the shipped averages ("Across many facts") and one of their facts, and
saves screenshots. The trace is the quick one (the subject's and the last
token's rows) to keep the test short. The layer sweep, the four editors
compared and the MEMIT batch are checked through the page's API on a tiny
model (``test_app_api.py``), where a browser adds nothing. Set
``LOCATE_EDIT_SCREENSHOTS=assets`` to refresh the README's screenshots: then
the trace is the full one and the sweep, the editors and the batch run here
too (``assets/screenshot.png``; the other views go to ``assets/static/``);
otherwise screenshots go to pytest's temporary directory.

In CI (``CI=true``) a missing Chromium fails the test; elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from editing.presets import load_presets

from app_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
PRESET = 0  # the first shipped preset
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.real_model


def chromium() -> str:
    path = os.environ.get("LOCATE_EDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = "Chromium is not installed (apt-get install -y chromium, or `make browser`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run the browser test.")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def page_url():
    """``python app.py`` on a free port; yields its URL, stops it afterwards."""
    port = free_port()
    # The page's deadline is for crowds; on a busy test machine the four editors may take longer than it.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "LOCATE_EDIT_LIMIT_DEADLINE_S": "3600"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("app.py did not serve the page within 300 s")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


SCREENSHOTS = os.environ.get("LOCATE_EDIT_SCREENSHOTS")  # refreshing the README's screenshots: every section


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("LOCATE_EDIT_SCREENSHOTS") or tmp_path)
    (folder / "static").mkdir(parents=True, exist_ok=True)
    return folder


def test_trace_edit_undo_in_a_browser(page_url, shots):
    executable = chromium()
    from playwright.sync_api import expect, sync_playwright

    preset = load_presets().presets[PRESET]
    new = preset.counterfactual.lower()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(page_url)
            expect(page.locator("#model-card")).to_contain_text("SmolLM2-135M-Instruct", timeout=60_000)
            # Plotly is loaded with the page (in a plot that is never shown), not when the first map arrives.
            expect(page.locator("#plotly-preload .js-plotly-plot")).to_be_attached(timeout=60_000)
            assert not page.locator("#plotly-preload").is_visible()

            # A preset fills both panels.
            page.locator("#presets").get_by_text(preset.label, exact=True).click()
            expect(page.locator("#trace-prompt textarea")).to_have_value(preset.prompt)
            expect(page.locator("#trace-subject textarea")).to_have_value(preset.subject)

            # Trace and wait for the three heatmaps.
            page.get_by_text("Advanced settings").click()
            if not SCREENSHOTS:
                page.get_by_label("Quick trace", exact=False).check()
            page.locator("#trace-button").click()
            # Progress the visitor can see: the stage and its fraction, while the trace runs.
            expect(page.locator("#trace-progress")).to_contain_text("Tracing: restoring", timeout=120_000)
            expect(page.locator("#trace-progress")).to_contain_text("%")
            # First the estimate (labelled as one), then the exact maps.
            expect(page.locator("#preview-note")).to_contain_text("estimates", timeout=120_000)
            expect(page.locator("#trace-scores")).to_contain_text(preset.attribute, timeout=900_000)
            for kind in ("hidden", "mlp", "attn"):
                expect(page.locator(f"#plot-{kind} .js-plotly-plot")).to_be_visible()
            expect(page.locator("#layer-suggestion")).to_contain_text(re.compile("peaks at layer|No layer stands out"))
            expect(page.locator("#plot-mlp")).to_contain_text("Impact of restoring MLP")
            page.get_by_text("Advanced settings").click()  # fold it again for the screenshot
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "screenshot.png"), full_page=True)

            if SCREENSHOTS:  # the README's figure; the sweep's checks run through the API (test_app_api)
                # Which layer to edit? ROME at layers 0 and 15 of the traced fact, drawn beside its MLP row.
                page.locator("#sweep-accordion").get_by_text("Which layer to edit?", exact=False).first.click()
                expect(page.locator("#sweep-target textarea")).to_have_value(preset.counterfactual)
                every = page.locator("#sweep-every input[type=number]")
                every.fill("15")
                every.press("Enter")
                page.locator("#sweep-button").click()
                expect(page.locator("#sweep-out")).to_contain_text("Best layer by S", timeout=900_000)
                expect(page.locator("#sweep-out")).to_contain_text("of 2 layers")
                expect(page.locator("#sweep-plot .js-plotly-plot")).to_be_visible()

            # Edit with the preset's counterfactual.
            page.get_by_role("tab", name="② Rewrite the fact").click()
            expect(page.locator("#edit-target textarea")).to_have_value(preset.counterfactual)
            page.locator("#edit-button").click()
            rewrite = page.locator('#edit-comparison tr[data-kind="rewrite"]')
            expect(rewrite.locator("td.after mark.le-new").first).to_be_visible(timeout=1_800_000)
            before, after = rewrite.locator("td.before").inner_text(), rewrite.locator("td.after").inner_text()
            assert new in after.lower(), after
            assert new not in before.lower(), before
            expect(page.locator("#edit-status")).to_contain_text("1 edit active")
            expect(page.locator("#edit-scores")).to_contain_text("Efficacy")
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "static" / "screenshot-edit.png"), full_page=True)

            # Undo.
            page.locator("#undo-button").click()
            expect(page.locator("#edit-status")).to_contain_text("original model", timeout=60_000)
            page.screenshot(path=str(shots / "static" / "screenshot-undo.png"), full_page=True)

            # Two more presets pasted as CSV into the batch table (typed as a visitor types them; no model needed).
            page.locator("#batch-accordion").get_by_text("Edit many facts", exact=False).first.click()
            others = load_presets().presets[1:3]
            for q in others:  # typed as a visitor would (a filled value is not always taken by the textbox)
                page.locator("#batch-csv textarea").click()
                page.keyboard.type(f'{q.subject},"{q.rewrite_prompt}",{q.counterfactual},{q.attribute}')
                page.locator("#batch-paste").click()
                try:
                    expect(page.locator("#batch-table")).to_contain_text(q.subject, timeout=30_000)
                except AssertionError:
                    toasts = page.locator(".toast-body").all_inner_texts()
                    raise AssertionError(f"the pasted fact did not reach the table; messages: {toasts}") from None
                expect(page.locator("#batch-csv textarea")).to_have_value("")
            if SCREENSHOTS:  # the README's figures; these checks run through the API (test_app_api)
                # The same fact with every editor, side by side: one column per method; then the batch, written as
                # one MEMIT edit: one row per fact, the health check, one edit.
                page.locator("#editors-accordion").get_by_text("Compare editors", exact=False).first.click()
                page.locator("#editors-button").click()
                table = page.locator("#editors-comparison")
                for method in ("rome", "ft", "ft-l", "kn"):
                    expect(table.locator(f'td.after[data-method="{method}"]').first).to_be_visible(timeout=900_000)
                assert table.locator("th.le-method").count() == 4
                expect(table).to_contain_text("Neighbourhood")
                page.screenshot(path=str(shots / "static" / "screenshot-editors.png"), full_page=True)

                page.locator("#batch-button").click()
                facts = page.locator("#batch-facts tr[data-index]")
                expect(facts.nth(1)).to_be_visible(timeout=900_000)
                assert facts.count() == 2
                expect(page.locator("#batch-health")).to_contain_text("Health check")
                expect(page.locator("#edit-status")).to_contain_text("1 edit active")
                page.screenshot(path=str(shots / "static" / "screenshot-batch.png"), full_page=True)

            # Across many facts: the shipped averages, the severed paths, and a fact that opens in the Locate tab.
            page.get_by_role("tab", name="③ Across many facts").click()
            expect(page.locator("#average-intro")).to_contain_text("facts that SmolLM2-135M-Instruct knows")
            for figure in ("average-curve-subject", "average-curve-last", "average-hidden", "average-mlp",
                           "average-attn", "average-severed"):
                expect(page.locator(f"#{figure} .js-plotly-plot")).to_be_visible(timeout=60_000)
            expect(page.locator("#average-mlp")).to_contain_text("Average impact of restoring MLP")
            fact = json.loads(next((ROOT / "assets" / "averages").glob("*.json")).read_text())["facts"][1]
            page.locator("#average-facts").get_by_text(fact["subject"], exact=True).first.click()
            expect(page.locator("#trace-prompt textarea")).to_have_value(fact["prompt"], timeout=30_000)
            expect(page.locator("#trace-answer textarea")).to_have_value(fact["attribute"])
            page.get_by_role("tab", name="③ Across many facts").click()
            page.screenshot(path=str(shots / "static" / "screenshot-average.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "screenshot.png").stat().st_size > 10_000
