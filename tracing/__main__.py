"""Command line: causal traces of one prompt, printed and optionally saved as JSON and HTML.

    python -m tracing --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower"
    python -m tracing --prompt "..." --subject "..." --estimate --json preview.json   # a second's estimate
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from tqdm import tqdm

from .cli import add_common_args, load_from_args
from .models import LoadedModel
from .plots import heatmap
from .preview import estimate
from .result import CORRUPTIONS, KINDS, METRICS, PRECISIONS, TraceConfig, TraceResult
from .trace import iter_trace


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tracing",
        description="Causal tracing (Meng et al., 2022): corrupt the subject, restore one clean state at a time, "
        "and measure how much of the answer comes back. Prints a summary per kind (hidden, mlp, attn).",
        epilog='Example: python -m tracing --prompt "The Eiffel Tower is located in the city of" '
        '--subject "The Eiffel Tower" --json trace.json --html trace.html',
    )
    p.add_argument("--prompt", required=True, help="text whose next token states the fact")
    p.add_argument("--subject", required=True, help="the part of the prompt the fact is about (exactly as written)")
    p.add_argument("--occurrence", type=int, default=0, help="which occurrence of the subject, counting from 0")
    p.add_argument("--answer", default=None, help="expected answer (its first token is scored); default: the model's top prediction")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of hidden,mlp,attn (default: all)")
    p.add_argument("--samples", type=int, default=10, help="corrupted copies to average (default 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise as a multiple of the embedding std (default 3)")
    p.add_argument("--noise-scale", type=float, default=None, help="absolute noise std (overrides --noise)")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--seed", type=int, default=1, help="seed of the noise (default 1)")
    p.add_argument("--corruption", choices=CORRUPTIONS, default="gaussian", help="how to corrupt the subject (default gaussian)")
    p.add_argument("--replacement", default=None, help="subject to swap in with --corruption subject (same token length)")
    p.add_argument("--metric", choices=METRICS, default="prob", help="score of a cell: prob = p(first answer token) (default); answer_logprob / answer_prob = "
                   "log p / p of every token of --answer, teacher-forced (for answers of several tokens)")
    p.add_argument("--contrast", default=None, help="contrast answer for --metric logit_diff")
    p.add_argument("--tokens", default="all", help="all, subject_last, or comma-separated token positions")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto loads fp32 (an --estimate then runs its blocks in bf16 on CPUs with AMX or AVX-512 "
                   "BF16; fp32 keeps float32); bf16/fp16 are faster on GPUs; tf32 is fp32 weights with TF32 matrix "
                   "products (CUDA)")
    p.add_argument("--no-skip", action="store_true", help="compute cells that provably equal the low score too")
    p.add_argument("--estimate", action="store_true",
                   help="a first-order estimate (attribution patching: one backward pass) instead of the exact "
                   "trace; results say \"estimate\": true")
    p.add_argument("--html", metavar="OUT", default=None, help="write the three heatmaps as an HTML page")
    return add_common_args(p, json_out="file", quiet="no progress bar")


def _tokens_arg(value: str):
    if value in ("all", "subject_last"):
        return value
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: --tokens takes all, subject_last or positions like 3,4,9; got {value!r}") from None


def _config(args: argparse.Namespace) -> TraceConfig:
    return TraceConfig(
        samples=args.samples, noise=args.noise, noise_scale=args.noise_scale, corruption=args.corruption,
        replacement=args.replacement, window=args.window, seed=args.seed, metric=args.metric,
        contrast=args.contrast, tokens=_tokens_arg(args.tokens), skip=not args.no_skip,
        precision=args.precision if args.precision in ("tf32", "fp32") else "auto",
    )


def _run(args: argparse.Namespace, lm: LoadedModel, config: TraceConfig) -> list[TraceResult]:
    """The estimate, or the exact trace of each kind with a progress bar."""
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if args.estimate:
        return estimate(lm, args.prompt, args.subject, answer=args.answer, kinds=kinds, config=config,
                        occurrence=args.occurrence)
    bar = tqdm(total=0, desc="tracing", unit="token", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    results = list(iter_trace(lm, args.prompt, args.subject, answer=args.answer, kinds=kinds, config=config,
                              occurrence=args.occurrence, progress=progress))
    bar.close()
    return results


def _summary(args: argparse.Namespace, lm: LoadedModel, results: list[TraceResult], seconds: float) -> list[str]:
    first, run = results[0], results[-1].settings
    subject_tokens = "".join(first.tokens[first.subject_range[0] : first.subject_range[1]])
    what = "estimate (attribution patching, not the exact trace)" if args.estimate else "trace"
    blocks = f" (its blocks in {run['blocks_dtype']})" if "blocks_dtype" in run else ""
    lines = [f"model: {lm.name}   answer: {first.answer!r}   subject tokens: {subject_tokens!r}",
             f"clean {first.metric}: {first.high_score:.4f}   corrupted: {first.low_score:.4f}",
             f"on {run['device']} in {run['dtype']}{blocks}: {what} {run['seconds']:.2f} s ({seconds:.1f} s with loading)"]
    last_subject = first.subject_range[1] - 1
    for r in results:
        token, layer = r.peak()
        at_subject = r.peak(last_subject)[1]
        lines.append(
            f"{r.kind:>6}: peak {r.scores[token, layer]:.4f} at token {token} {r.tokens[token]!r}, layer {layer}; "
            f"at the last subject token the peak is layer {at_subject} ({r.scores[last_subject, at_subject]:.4f})"
        )
    return lines


def _write_json(args: argparse.Namespace, lm: LoadedModel, results: list[TraceResult], seconds: float) -> None:
    run = results[-1].settings
    payload = {
        "model": lm.name,
        "prompt": args.prompt,
        "subject": args.subject,
        "results": [r.to_dict() for r in results],
        "seconds": seconds,  # loading included; each result's settings say how long its trace took
        "trace_seconds": run["seconds"],
        "device": run["device"],
        "dtype": run["dtype"],
        "estimate": bool(args.estimate),
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)


def _write_html(args: argparse.Namespace, results: list[TraceResult]) -> None:
    with open(args.html, "w", encoding="utf-8") as f:
        title = "Estimated causal trace" if args.estimate else "Causal trace"
        f.write(f"<html><head><meta charset='utf-8'><title>{title}: {args.prompt}</title></head><body>\n")
        if args.estimate:
            f.write("<p><b>Estimate</b> (attribution patching, a first-order approximation), not the exact "
                    "trace.</p>\n")
        for i, r in enumerate(results):
            f.write(heatmap(r).to_html(full_html=False, include_plotlyjs=(i == 0)))
        f.write("</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        config = _config(args)
        dtype = None if args.precision == "auto" else args.precision
        lm = load_from_args(args, dtype=dtype)
        results = _run(args, lm, config)
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print("\n".join(_summary(args, lm, results, seconds)))
    if args.json:
        _write_json(args, lm, results, seconds)
        print(f"wrote {args.json}")
    if args.html:
        _write_html(args, results)
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
