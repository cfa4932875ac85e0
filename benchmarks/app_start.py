"""Start-up and response times of the app, as a visitor meets them.

    .venv/bin/python benchmarks/app_start.py               # cold and warm start, preset trace and edit
    .venv/bin/python benchmarks/app_start.py --skip-cold --preset 3

* cold start: ``python app.py`` with an empty cache directory (the embedded
  GGUF is dequantised and converted again) until the page answers;
* warm start: the same with the normal cache;
* then, through the warm server's API (gradio_client), the preset's trace with
  the paper's settings (and the quick trace: subject and last token only),
  and the preset's edit with its before/after generations and scores. The key
  statistics of an edit layer are computed on its first edit ever and cached;
  the edit's own timings say how long each stage took;
* and the same trace and edit for a second visitor (a new session), which the
  app answers from the results it keeps for the unedited model;
* first of all, for a prompt that is no preset (the Eiffel Tower, 10 tokens):
  the seconds from Trace until the gradient preview's maps reach the visitor,
  and until the first exact rows replace them; then the trace is stopped.
  With ``--browser`` that is first measured on the screen: headless Chromium
  clicks Trace on the page's default prompt (the same one) and the page itself
  notes when the preview is drawn and when the first exact rows are
  (``--browser /path/to/chromium``; ``--preview-only`` stops there):

      .venv/bin/python benchmarks/app_start.py --skip-cold --browser --preview-only

Aims on 2 CPU cores: warm start <= 15 s, preview <= 1 s, preset trace <= 30 s, preset edit <= 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict, timeout: float = 900) -> tuple[subprocess.Popen, str, float]:
    """Start ``python app.py``; return the process, its URL and the seconds until the page answered."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            pass
        if time.perf_counter() - started > timeout:
            proc.kill()
            raise SystemExit(f"app.py did not serve a page within {timeout} s")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def time_preview(client, prompt: str, subject: str) -> dict:
    """Seconds from Trace to the estimated maps on the page, and to the first exact rows; then Stop."""
    figures: dict[str, float] = {}
    started = time.perf_counter()
    job = client.submit(prompt, subject, "", 10, 3.0, 10, "gaussian", "prob", "", 1, "auto", False,
                        api_name="/trace")
    try:
        for out in job:
            maps = " ".join(str(o) for o in out[1:4])
            if "preview_s" not in figures and "Estimate" in maps:
                figures["preview_s"] = round(time.perf_counter() - started, 2)
            if "rows still being computed" in maps:
                figures["first_exact_rows_s"] = round(time.perf_counter() - started, 1)
                break
    finally:
        job.cancel()
    return figures


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# In the page: from the click on Trace (t0) to the first time the attention plot's drawn title says "Estimate"
# (the preview is on the screen) and then says that rows are still being computed (the first exact rows).
WATCH = """() => {
  const marks = window.__leMarks = {t0: null, preview: null, exact: null};
  const look = () => {
    if (marks.t0 === null) return;
    const text = (document.querySelector('#plot-attn .js-plotly-plot') || {}).textContent || '';
    if (marks.preview === null && text.includes('Estimate')) marks.preview = performance.now();
    if (marks.exact === null && text.includes('still being computed')) marks.exact = performance.now();
  };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});
  marks.t0 = performance.now();
  document.querySelector('#trace-button').click();
}"""


def browser_preview(url: str, chromium: str) -> dict:
    """In headless Chromium: seconds from a click on Trace (the page's default prompt, the Eiffel Tower) until
    the preview is drawn, and until the first exact rows are; then Stop."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#trace-button", timeout=60_000)
            page.wait_for_selector("#plotly-preload .js-plotly-plot", state="attached", timeout=60_000)
            page.wait_for_timeout(1000)  # the page's own start-up (Plotly, fonts, the model card) is not the preview's
            page.evaluate(WATCH)
            page.wait_for_function("() => window.__leMarks.exact !== null", timeout=120_000, polling=100)
            marks = page.evaluate("() => window.__leMarks")
            page.locator("#trace-stop").click()
        finally:
            browser.close()
    return {"browser_preview_s": round((marks["preview"] - marks["t0"]) / 1000, 2),
            "browser_first_exact_rows_s": round((marks["exact"] - marks["t0"]) / 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", type=int, default=0, help="index of the shipped preset to trace and edit")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold start (it converts the model again)")
    parser.add_argument("--skip-full-trace", action="store_true", help="only the quick trace")
    parser.add_argument("--browser", metavar="CHROMIUM", nargs="?", const="/usr/bin/chromium", default=None,
                        help="first time the preview in headless Chromium (default path /usr/bin/chromium)")
    parser.add_argument("--preview-only", action="store_true", help="stop after the preview's timings")
    args = parser.parse_args()
    from gradio_client import Client

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    figures: dict[str, object] = {"cpu_cores": os.cpu_count(), "load_average": os.getloadavg()[0]}

    if not args.skip_cold:
        with tempfile.TemporaryDirectory(prefix="le-cold-") as cache:
            proc, _, seconds = start({**env, "LOCATE_EDIT_CACHE": cache})
            stop(proc)
        figures["cold_start_s"] = round(seconds, 1)
        print(f"cold start (model converted, empty cache): {seconds:6.1f} s", flush=True)

    proc, url, seconds = start(env)
    figures["warm_start_s"] = round(seconds, 1)
    print(f"warm start to a served page:               {seconds:6.1f} s   (aim <= 15 s)", flush=True)
    try:
        if args.browser:
            seen = browser_preview(url, args.browser)
            figures.update(seen)
            print(f"the preview drawn in the browser:          {seen['browser_preview_s']:6.2f} s   (aim <= 1 s); "
                  f"first exact rows {seen['browser_first_exact_rows_s']:.1f} s", flush=True)
        client = Client(url, verbose=False)
        preview = time_preview(client, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
        figures.update(preview)
        print(f"a new prompt's preview on the page:        {preview.get('preview_s', float('nan')):6.2f} s   "
              f"(aim <= 1 s); first exact rows {preview.get('first_exact_rows_s', float('nan')):.1f} s", flush=True)
        if args.preview_only:
            return
        prompt, subject, answer, e_subject, relation, target, old, para, neigh = client.predict(
            args.preset, api_name="/preset")[:9]
        print(f"preset {args.preset}: {prompt!r} -> {answer!r}, edit to {target!r}", flush=True)
        def trace_args(quick: bool) -> tuple:  # the paper's settings; quick: subject and last token only
            return (prompt, subject, answer, 10, 3.0, 10, "gaussian", "prob", "", 1, "auto", quick)

        modes = [("quick", True)] + ([] if args.skip_full_trace else [("paper", False)])
        for mode, quick in modes:
            started = time.perf_counter()
            client.predict(*trace_args(quick), api_name="/trace")
            seconds = time.perf_counter() - started
            figures[f"trace_{mode}_s"] = round(seconds, 1)
            aim = "   (aim <= 30 s)" if mode == "paper" else ""
            print(f"preset trace, {mode + ' settings:':16s}          {seconds:6.1f} s{aim}", flush=True)

        started = time.perf_counter()
        layer = client.predict(api_name="/model_info")["default_edit_layer"]
        edit_args = (e_subject, relation, target, old, layer, "rome", para, neigh, 16, False, 0)
        out = client.predict(*edit_args, api_name="/edit")
        seconds = time.perf_counter() - started
        details = out[2]
        figures["edit_s"] = round(seconds, 1)
        figures["edit_timings_s"] = details.get("timings", {})
        rewrite = details["rows"][0]
        figures["edit_rewrite_after"] = rewrite["after"]
        print(f"preset edit (generations, scores, ROME):   {seconds:6.1f} s   (aim <= 15 s)", flush=True)
        print(f"  ROME stages: {json.dumps(details.get('timings', {}))}", flush=True)
        print(f"  rewrite prompt after the edit: {rewrite['prompt']!r} ->{rewrite['after']!r}", flush=True)

        started = time.perf_counter()
        client.predict(api_name="/undo")
        figures["undo_s"] = round(time.perf_counter() - started, 2)

        # A second visitor (a new session) clicks the same preset: the unedited model's results are shared.
        other = Client(url, verbose=False)
        started = time.perf_counter()
        other.predict(*trace_args(modes[-1][1]), api_name="/trace")  # the trace the first visitor ran last
        figures["next_visitor_trace_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        other.predict(*edit_args, api_name="/edit")
        figures["next_visitor_edit_s"] = round(time.perf_counter() - started, 1)
        print(f"the next visitor's same trace and edit:    {figures['next_visitor_trace_s']:6.1f} s, "
              f"{figures['next_visitor_edit_s']:.1f} s", flush=True)
    finally:
        stop(proc)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
