"""Choose MEMIT's layers, λ and clamp on the tuning cases: every setting writes all of them in one batch.

The expensive step, the target vectors, depends only on the range's last layer
and the clamp, so it is computed once per (last layer, clamp) and reused for
every range start and λ. Prints ES, PS, NS, S of each setting (post-edit, the
whole tuning part in one batch; neighbour prompts naming a case's subject left
out as in ``python -m editing.evaluate --batch``) and the seconds it took.

Example::

    .venv/bin/python benchmarks/memit_sweep.py --cases assets/counterfact_smollm2_tune.json \\
        --last 2 4 6 --spans 1 3 5 --weights 500 1500 5000 15000 --threads 1 --json out/memit_sweep.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from editing.applying import applied  # noqa: E402
from editing.evaluation.evaluate import aggregate, prompts_of, read_cases, request_of  # noqa: E402
from editing.hparams import load_hparams  # noqa: E402
from editing.methods.common import with_old_objects  # noqa: E402
from editing.methods.memit import compute_memit, compute_targets  # noqa: E402
from editing.scores import nan_to_none, score_many  # noqa: E402
from tracing.loading import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="assets/counterfact_smollm2_tune.json")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--last", type=int, nargs="+", default=[2, 4, 6], help="last layers of the ranges")
    parser.add_argument("--spans", type=int, nargs="+", default=[1, 3, 5], help="range lengths")
    parser.add_argument("--weights", type=float, nargs="+", default=[500, 1500, 5000, 15000], help="lambda values")
    parser.add_argument("--clamps", type=float, nargs="+", default=[0.75], help="clamp_norm_factor values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="other hyperparameters")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model()
    cases = read_cases(args.cases)[: args.limit]
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    requests = with_old_objects(lm, [request_of(c) for c in cases])
    subjects = sorted({r.subject.strip() for r in requests})
    prompts = [prompts_of(c, subjects) for c in cases]
    items = [(r, p, n) for r, (p, n, _) in zip(requests, prompts)]
    pre = aggregate([{"pre": nan_to_none(s.summary())} for s in score_many(lm, items)], "pre")
    print(f"{len(cases)} cases; before: ES {pre['ES']:.3f} PS {pre['PS']:.3f} NS {pre['NS']:.3f}", flush=True)
    rows = []
    print(f"{'clamp':>6}{'layers':>12}{'lambda':>9}{'ES':>8}{'PS':>8}{'NS':>8}{'S':>8}{'left':>7}{'|dW|':>8}{'s':>7}",
          flush=True)
    for clamp in args.clamps:
        for last in args.last:
            hp = load_hparams(lm, method="memit", clamp_norm_factor=clamp, **overrides)
            t0 = time.perf_counter()
            targets = compute_targets(lm, requests, last, hp)
            target_seconds = time.perf_counter() - t0
            for span in args.spans:
                layers = tuple(range(max(0, last - span + 1), last + 1))
                for weight in args.weights:
                    hp_w = load_hparams(lm, method="memit", clamp_norm_factor=clamp, mom2_update_weight=weight,
                                        **overrides)
                    t1 = time.perf_counter()
                    edit = compute_memit(lm, requests, layers=layers, hparams=hp_w, targets=targets)
                    seconds = target_seconds + time.perf_counter() - t1
                    with applied(lm, [edit]):
                        post = aggregate([{"post": nan_to_none(s.summary())} for s in score_many(lm, items)], "post")
                    row = {"clamp": clamp, "layers": list(layers), "lambda": weight, **post,
                           "residual_left": edit.info["residual_left"], "norm": edit.norm, "seconds": seconds,
                           "target_prob_after": edit.info["target_prob_after"]}
                    rows.append(row)
                    print(f"{clamp:>6}{f'{layers[0]}-{layers[-1]}':>12}{weight:>9.0f}{post['ES']:>8.3f}"
                          f"{post['PS']:>8.3f}{post['NS']:>8.3f}{post['S']:>8.3f}{row['residual_left']:>7.2f}"
                          f"{edit.norm:>8.2f}{seconds:>7.0f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cases": args.cases, "n": len(cases), "pre": pre, "rows": rows},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
