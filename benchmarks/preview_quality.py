"""How good the gradient preview is: Pearson r and top-cell agreement against exact traces, per kind.

    .venv/bin/python benchmarks/preview_quality.py                      # 50 known facts, paper settings
    .venv/bin/python benchmarks/preview_quality.py --facts 10 --json out/preview.json
    .venv/bin/python benchmarks/preview_quality.py --write-verdict      # also assets/preview_quality.json

Facts: known facts of the paper's set that the model answers (its top next
token is the attribute's first token), one per subject, taken round-robin over
relations in ``known_id`` order so that every relation is represented. For
each fact the exact trace (``tracing.trace``, paper settings: 10 samples,
noise 3, window 10, every token) is computed once and cached on disk
(``tracing.average.cached_trace``; ``--cache``, default ``$LOCATE_EDIT_CACHE/traces``,
shared with ``python -m tracing.average``), keyed by the
model's fingerprint and the settings, so a rerun only recomputes the
estimates. Per kind it reports, over the computed cells of each fact:

* ``r``: Pearson's r between estimate and exact scores (mean, median, 10th
  percentile over facts, and the share of facts with r >= 0.8);
* ``same_peak``: the estimate's top cell is the exact top cell;
* ``near_peak``: the exact score at the estimate's top cell is within 10 % of
  the exact map's range (high - low) of the exact peak (near-ties count);
* ``same_subject_peak_layer``: the peak layer at the last subject token (the
  layer the page offers for an edit) is the same.

Then the timing of the preview of the Eiffel Tower prompt (10 tokens): the
median of ``--repeats`` runs after one warm-up, with this process's threads.

Each kind is shown when its median r is at least ``SHOW_R`` (0.7: the
estimate explains about half of the exact map's variance or more) and its top
cell is near the exact one in at least ``SHOW_NEAR_PEAK`` (60 %) of the facts:
a preview is on the screen for the half minute before the exact map replaces
it, and one whose bright spot is elsewhere would teach the wrong layer.
``--spaces`` compares where the first-order step is taken (the metric itself,
or its log-odds); ``tracing.preview.SPACE`` is the library's choice.
``--precisions`` compares the library's choice of precision for the blocks
("auto": bf16 on CPUs with AMX or AVX-512 BF16, see
``tracing.preview.block_dtype``) with float32, and reports how closely the
bf16 estimates follow the float32 ones. The verdict is taken for "auto".
``--write-verdict`` writes ``assets/preview_quality.json``: per kind the
figures and whether to show it, keyed by the model's fingerprint and the
settings; :func:`tracing.preview.preview_verdict` reads it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EIFFEL = ("The Eiffel Tower is located in the city of", "The Eiffel Tower")


def agreement(exact, estimate) -> dict:
    """Pearson r and top-cell agreement of one kind's estimate against its exact map."""
    import numpy as np

    a, b = np.asarray(exact.scores), np.asarray(estimate.scores)
    keep = ~np.isnan(a) & ~np.isnan(b)
    r = float(np.corrcoef(a[keep], b[keep])[0, 1]) if a[keep].std() > 0 and b[keep].std() > 0 else float("nan")
    span = max(float(np.nanmax(a)) - exact.low_score, 1e-12)
    peak, guess = exact.peak(), estimate.peak()
    last = exact.subject_range[1] - 1
    return {
        "r": r,
        "same_peak": peak == guess,
        "near_peak": bool(a[peak] - a[guess] <= 0.1 * span),
        "same_subject_peak_layer": exact.peak(last)[1] == estimate.peak(last)[1],
        "peak": list(peak),
        "estimate_peak": list(guess),
    }


def summarise(rows: list[dict]) -> dict:
    import numpy as np

    rs = np.array([row["r"] for row in rows], dtype=float)
    rs = rs[~np.isnan(rs)]
    return {
        "facts": len(rows),
        "r_mean": float(rs.mean()) if rs.size else float("nan"),
        "r_median": float(np.median(rs)) if rs.size else float("nan"),
        "r_p10": float(np.percentile(rs, 10)) if rs.size else float("nan"),
        "r_at_least_0.8": float((rs >= 0.8).mean()) if rs.size else float("nan"),
        "same_peak": float(np.mean([row["same_peak"] for row in rows])),
        "near_peak": float(np.mean([row["near_peak"] for row in rows])),
        "same_subject_peak_layer": float(np.mean([row["same_subject_peak_layer"] for row in rows])),
    }


def time_preview(lm, repeats: int, config) -> dict:
    """Seconds of the Eiffel Tower preview (all three kinds): one warm-up, then the median of ``repeats``."""
    from tracing.preview import estimate

    estimate(lm, *EIFFEL, config=config)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = estimate(lm, *EIFFEL, config=config)
        runs.append(time.perf_counter() - started)
    return {"median_s": statistics.median(runs), "runs_s": runs, "library_s": results[0].settings["seconds"],
            "tokens": len(results[0].tokens)}


SHOW_R = 0.7  # median Pearson r: the estimate explains about half the exact map's variance or more
SHOW_NEAR_PEAK = 0.6  # and its brightest cell is (nearly) the exact one in most facts


def verdict(figures: dict) -> bool:
    """Whether a kind's estimate is good enough to show (see SHOW_R, SHOW_NEAR_PEAK)."""
    return figures["r_median"] >= SHOW_R and figures["near_peak"] >= SHOW_NEAR_PEAK


def report(lm, facts: list[dict], exact: list[list], config, args) -> int:
    """Estimates of every fact in each space and precision, their agreement with the exact traces (and, for
    bf16 blocks, with the float32 estimate), the timing; print and write."""
    import numpy as np

    from tracing import KINDS
    from tracing.preview import METHOD, SPACE, block_dtype, estimate

    blocks = {precision: str(block_dtype(lm, replace(config, precision=precision))).removeprefix("torch.")
              for precision in args.precisions}
    per_fact, summary, versus_fp32 = [], {}, {}
    for space in args.spaces:
        rows = {(precision, kind): [] for precision in args.precisions for kind in KINDS}
        same = {(precision, kind): [] for precision in args.precisions for kind in KINDS}
        for fact, reference in zip(facts, exact):
            estimates = {precision: estimate(lm, fact["prompt"], fact["subject"], answer=fact["attribute"],
                                              kinds=KINDS, config=replace(config, precision=precision),
                                              occurrence=0, space=space)
                         for precision in args.precisions}
            for precision, results in estimates.items():
                for k, (e, guess) in enumerate(zip(reference, results)):
                    row = agreement(e, guess)
                    rows[precision, e.kind].append(row)
                    per_fact.append({"space": space, "precision": precision, "blocks": blocks[precision],
                                     "kind": e.kind, "prompt": fact["prompt"], "answer": fact["attribute"],
                                     "seconds": guess.settings["seconds"], **row})
                    if "fp32" in estimates and blocks[precision] != blocks["fp32"]:
                        same[precision, e.kind].append(agreement(estimates["fp32"][k], guess)["r"])
        summary[space] = {precision: {kind: summarise(rows[precision, kind]) for kind in KINDS}
                          for precision in args.precisions}
        versus_fp32[space] = {precision: {kind: float(np.median(same[precision, kind])) for kind in KINDS}
                              for precision in args.precisions if same[precision, KINDS[0]]}
    timing = {precision: time_preview(lm, args.repeats, replace(config, precision=precision))
              for precision in args.precisions}

    print(f"\nPreview ({METHOD}) against exact traces, {len(facts)} known facts, paper settings")
    print(f"{'space':<8}{'blocks':<10}{'kind':<8}{'r mean':>8}{'median':>8}{'p10':>8}{'r>=0.8':>8}{'same peak':>11}"
          f"{'near peak':>11}{'edit layer':>12}   show")
    for space, precisions in summary.items():
        for precision, kinds in precisions.items():
            for kind, f in kinds.items():
                print(f"{space:<8}{blocks[precision]:<10}{kind:<8}{f['r_mean']:>8.3f}{f['r_median']:>8.3f}"
                      f"{f['r_p10']:>8.3f}{f['r_at_least_0.8']:>8.2f}{f['same_peak']:>11.2f}{f['near_peak']:>11.2f}"
                      f"{f['same_subject_peak_layer']:>12.2f}   {verdict(f)}")
    print(f"(show: median r >= {SHOW_R} and near peak >= {SHOW_NEAR_PEAK}; the library's space: {SPACE}; "
          f"precision auto runs the blocks in {blocks.get('auto', '?')} here)")
    for space, precisions in versus_fp32.items():
        for precision, kinds in precisions.items():
            print(f"{space}, {blocks[precision]} blocks against the float32 estimate: median r "
                  + ", ".join(f"{kind} {r:.4f}" for kind, r in kinds.items()))
    for precision, t in timing.items():
        print(f"Eiffel Tower preview ({t['tokens']} tokens, 3 kinds, {torch_threads()} threads, {blocks[precision]} "
              f"blocks): median {t['median_s']:.3f} s over {args.repeats} runs "
              f"({', '.join(f'{s:.3f}' for s in t['runs_s'])})")

    out = {"model": lm.name, "fingerprint": lm.fingerprint, "settings": config.to_dict(), "facts": len(facts),
           "method": METHOD, "space": SPACE, "rule": {"r_median_at_least": SHOW_R, "near_peak_at_least": SHOW_NEAR_PEAK},
           "blocks": blocks, "summary": summary, "versus_fp32": versus_fp32, "timing": timing,
           "threads": torch_threads(), "per_fact": per_fact}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.write_verdict:
        from tracing.preview import PREVIEW_QUALITY

        if SPACE not in summary or "auto" not in args.precisions:
            print(f"error: --write-verdict needs the library's space {SPACE!r} among --spaces and 'auto' among "
                  f"--precisions", file=sys.stderr)
            return 2
        kinds = {kind: {**f, "show": verdict(f)} for kind, f in summary[SPACE]["auto"].items()}
        record = {"model": lm.name, "fingerprint": lm.fingerprint, "settings": config.to_dict(),
                  "facts": len(facts), "method": METHOD, "space": SPACE, "blocks_dtype": blocks["auto"],
                  "rule": out["rule"], "kinds": kinds, "versus_fp32_r_median": versus_fp32[SPACE].get("auto"),
                  "eiffel_preview_s": round(timing["auto"]["median_s"], 3), "threads": torch_threads(),
                  "generated_by": "benchmarks/preview_quality.py --write-verdict"}
        PREVIEW_QUALITY.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {PREVIEW_QUALITY}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--facts", type=int, default=50, help="how many known facts (default 50)")
    p.add_argument("--cache", default=None, help="folder of the cached exact traces")
    p.add_argument("--exact-only", action="store_true", help="only fill the cache of exact traces")
    p.add_argument("--repeats", type=int, default=5, help="timed previews of the Eiffel Tower prompt (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--spaces", nargs="+", default=["metric", "logit"], choices=["metric", "logit"],
                   help="where the first-order step is taken: the metric itself, or log-odds (see tracing.preview)")
    p.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32"],
                   help="auto: the library's choice (bf16 blocks on CPUs with AMX or AVX-512 BF16); fp32: float32")
    p.add_argument("--json", metavar="OUT", default=None, help="write every figure as JSON")
    p.add_argument("--write-verdict", action="store_true", help="write assets/preview_quality.json for the page")
    args = p.parse_args()

    import torch

    from tracing import TraceConfig, load_model
    from tracing.average import cached_trace
    from tracing.recall import recalled_facts

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    config = TraceConfig()
    cache = Path(args.cache) if args.cache else None
    facts = recalled_facts(lm)[: args.facts]
    print(f"{len(facts)} facts over {len({f['relation_id'] for f in facts})} relations; cache {cache}", flush=True)
    exact = []
    for i, fact in enumerate(facts):
        started = time.perf_counter()
        exact.append(cached_trace(lm, fact, config, cache))
        print(f"[{i + 1}/{len(facts)}] {fact['prompt']!r} -> {fact['attribute']!r}: "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    if args.exact_only:
        return 0
    return report(lm, facts, exact, config, args)


if __name__ == "__main__":
    sys.exit(main())
