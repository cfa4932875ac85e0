"""How far reduced-precision heatmaps are from fp32 ones, over the classroom presets.

    .venv/bin/python benchmarks/precision_agreement.py --device cuda --json agreement.json
    .venv/bin/python benchmarks/precision_agreement.py --device cpu --presets 4 --samples 3 --kinds hidden,mlp

For every preset of ``assets/presets.json`` (the default model's known facts)
the trace runs in fp32 and in each of ``--precisions`` (bf16: a bf16 copy of
the weights; tf32: fp32 weights, TF32 matrix products, CUDA only) with the
same seed. Per kind it reports Pearson's r over all cells, the largest
difference relative to the clean score, whether the peak cell is the same,
and whether the peak layer at the last subject token (the layer the page
offers for an edit) is the same. The rule this project applies: bf16 is a
GPU default only if r >= 0.99 and the peaks agree on every preset.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def compare(reference, other) -> dict:
    """Agreement of two results of one kind."""
    import numpy as np

    a, b = np.asarray(reference.scores), np.asarray(other.scores)
    keep = ~np.isnan(a) & ~np.isnan(b)
    r = float(np.corrcoef(a[keep], b[keep])[0, 1]) if a[keep].std() > 0 and b[keep].std() > 0 else float("nan")
    last = reference.subject_range[1] - 1
    gap = a[reference.peak()] - a[other.peak()]  # how far below the fp32 peak the other's peak cell is, in fp32
    return {
        "r": r,
        "max_diff_rel": float(np.max(np.abs(a[keep] - b[keep]))) / max(abs(reference.high_score), 1e-9),
        "same_peak": reference.peak() == other.peak(),
        "peak": list(reference.peak()),
        "other_peak": list(other.peak()),
        "peak_gap_rel": float(gap) / max(abs(reference.high_score), 1e-9),
        "same_subject_peak_layer": reference.peak(last)[1] == other.peak(last)[1],
        "high": [reference.high_score, other.high_score],
        "low": [reference.low_score, other.low_score],
        "same_answer": reference.answer == other.answer,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M (whose presets these are)")
    p.add_argument("--device", default=None)
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp16", "tf32"])
    p.add_argument("--presets", type=int, default=None, help="only N presets")
    p.add_argument("--first", type=int, default=0, help="index of the first preset (default 0)")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--kinds", default="hidden,mlp,attn")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="OUT", default=None)
    args = p.parse_args()

    import torch

    from tracing import LoadedModel, TraceConfig, load_model, trace
    from tracing.models import parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    presets = json.loads((ROOT / "assets" / "presets.json").read_text())["presets"][args.first :][: args.presets]
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    lm = load_model(args.model, device=args.device, dtype="fp32")
    models = {"fp32": lm}
    for name in args.precisions:
        if name != "tf32":
            weights = copy.deepcopy(lm.model).to(parse_dtype(name))
            models[name] = LoadedModel(model=weights, tokenizer=lm.tokenizer, spec=lm.spec, name=lm.name)
    config = TraceConfig(samples=args.samples, window=args.window)
    rows, seconds = [], {name: 0.0 for name in ["fp32", *args.precisions]}
    for preset in presets:
        got = {}
        for name in ["fp32", *args.precisions]:
            model = models.get(name, lm)
            t0 = time.perf_counter()
            got[name] = trace(model, preset["prompt"], preset["subject"], kinds=kinds,
                              config=TraceConfig(**{**config.to_dict(), "precision": "tf32" if name == "tf32" else "auto"}))
            seconds[name] += time.perf_counter() - t0
        for name in args.precisions:
            for ref, other in zip(got["fp32"], got[name]):
                rows.append({"preset": preset["subject"], "precision": name, "kind": ref.kind, **compare(ref, other)})
                row = rows[-1]
                print(f"{preset['subject'][:24]:<25}{name:<6}{ref.kind:<7} r {row['r']:.4f}  max diff "
                      f"{row['max_diff_rel']:.3f} of p(clean)  peak {'same' if row['same_peak'] else 'DIFFERS'}"
                      f"{'' if row['same_peak'] else ' (%.4f of p(clean) lower in fp32)' % row['peak_gap_rel']}"
                      f"  subject-peak layer {'same' if row['same_subject_peak_layer'] else 'DIFFERS'}", flush=True)

    summary = {}
    for name in args.precisions:
        mine = [r for r in rows if r["precision"] == name]
        summary[name] = {
            "min_r": min(r["r"] for r in mine),
            "mean_r": sum(r["r"] for r in mine) / len(mine),
            "max_diff_rel": max(r["max_diff_rel"] for r in mine),
            "same_peak": f"{sum(r['same_peak'] for r in mine)}/{len(mine)}",
            "largest_peak_gap_rel": max(r["peak_gap_rel"] for r in mine),
            "same_subject_peak_layer": f"{sum(r['same_subject_peak_layer'] for r in mine)}/{len(mine)}",
            "agrees": all(r["r"] >= 0.99 and r["same_peak"] for r in mine),
        }
    print()
    for name, s in summary.items():
        print(f"{name} vs fp32 over {len(presets)} presets x {len(kinds)} kinds: min r {s['min_r']:.4f}, mean r "
              f"{s['mean_r']:.4f}, largest difference {s['max_diff_rel']:.3f} of p(clean), same peak {s['same_peak']} "
              f"(where not, at most {s['largest_peak_gap_rel']:.4f} of p(clean) apart in fp32), "
              f"same subject-peak layer {s['same_subject_peak_layer']} -> {'agrees' if s['agrees'] else 'does NOT agree'}"
              " (rule: r >= 0.99 and same peak everywhere)")
    print("seconds per precision (all presets): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if args.json:
        report = {"model": lm.name, "device": str(lm.device), "torch": torch.__version__, "samples": args.samples,
                  "window": args.window, "kinds": list(kinds), "presets": len(presets), "seconds": seconds,
                  "summary": summary, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
