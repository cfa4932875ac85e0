"""How fast the served page turns away requests it must not run, and that the next visitor is not held up.

Serves the page (the embedded default model unless ``--model``) in this
process and, through its API, times the refusal of a 50,000-word prompt, a
5,000-word subject and target, 100 neighbour lines and an over-long free
prompt; streams a 1 GB upload straight to the upload route (generated on the
fly, never on disk) and reports the answer, its time and the server's memory
growth; then times how long a normal trace waits for the model afterwards.

    .venv/bin/python benchmarks/refusals.py --json out/refusals.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
QUICK = ("", 2, 3.0, 2, "gaussian", "prob", "", 1, "auto", True)  # answer .. fast


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def upload_gb(url: str, gigabytes: float) -> dict:
    """Stream a multipart upload of ``gigabytes`` to the upload route; its status, seconds and bytes sent."""
    import httpx

    boundary = "locateeditboundary"
    sent = [0]

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.safetensors\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        chunk = b"\0" * (1 << 20)
        for _ in range(int(gigabytes * 1024)):
            sent[0] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before, started = rss_mb(), time.perf_counter()
    try:
        response = httpx.post(f"{url}gradio_api/upload", content=body(), timeout=600,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        status, text = response.status_code, response.text[:120]
    except httpx.HTTPError as exc:
        status, text = None, f"{type(exc).__name__}: {exc}"[:120]
    return {"status": status, "answer": text, "seconds": round(time.perf_counter() - started, 2),
            "sent_mb": sent[0] >> 20, "server_rss_growth_mb": round(rss_mb() - before, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--upload-gb", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from gradio_client import Client

    from webapp import build_demo, create_engine, launch

    engine = create_engine(args.model)
    demo = build_demo(engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, engine, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False)
    huge_words = "word " * 50_000
    cases = {
        "50,000-word prompt": ("/trace", (huge_words + PROMPT, SUBJECT, *QUICK)),
        "5,000-word subject": ("/trace", ("word " * 5_000 + PROMPT, "word " * 5_000, *QUICK)),
        "5,000-word answer": ("/trace", (PROMPT, SUBJECT, "Paris " * 5_000, *QUICK[1:])),
        "5,000-word edit target": ("/edit", (SUBJECT, "{} is located in the city of", "Rome " * 5_000, "Paris", 1,
                                             "rome", "", "", 8, False, 0)),
        "5,000-word edit subject": ("/edit", ("Eiffel " * 5_000, "{} is located in the city of", "Rome", "Paris", 1,
                                              "rome", "", "", 8, False, 0)),
        "100 neighbour lines": ("/edit", (SUBJECT, "{} is located in the city of", "Rome", "Paris", 1, "rome", "",
                                          "\n".join(f"The Louvre {i} is in" for i in range(100)), 8, False, 0)),
        "50,000-word free prompt": ("/compare", (huge_words, 8, False, 0)),
    }
    report = {"model": engine.lm.name, "cpu": platform.processor() or platform.machine(), "refusals": {}}
    try:
        for name, (route, payload) in cases.items():
            started = time.perf_counter()
            try:
                client.predict(*payload, api_name=route)
                message = "NOT REFUSED"
            except Exception as exc:  # noqa: BLE001 - the refusal is what we time
                message = str(exc)[:160]
            report["refusals"][name] = {"seconds": round(time.perf_counter() - started, 3), "message": message}
        report["upload"] = upload_gb(url, args.upload_gb)
        first = len(engine.records)
        started = time.perf_counter()
        client.predict(PROMPT, SUBJECT, *QUICK, api_name="/trace")
        record = next(r for r in list(engine.records)[first:] if r.label == "trace")
        report["next_trace"] = {"waited_s": round(record.waited, 3), "ran_s": round(record.ran, 2),
                                "total_s": round(time.perf_counter() - started, 2)}
    finally:
        demo.close()
    for name, row in report["refusals"].items():
        print(f"{name:<26}{row['seconds']:>7.3f} s  {row['message'][:100]}")
    up = report["upload"]
    print(f"{args.upload_gb:g} GB upload: HTTP {up['status']} after {up['seconds']} s ({up['sent_mb']} MB sent), "
          f"server memory +{up['server_rss_growth_mb']} MB: {up['answer']}")
    nt = report["next_trace"]
    print(f"next visitor's quick trace: waited {nt['waited_s']} s for the model, ran {nt['ran_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
