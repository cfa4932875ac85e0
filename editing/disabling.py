"""``python -m editing.disabling``: ROME's update with both keys over CounterFact cases, per edit, into a JSON file.

The command line of :mod:`editing.evaluation.disabling` (see there for what is recorded). Example::

    python -m editing.disabling --cases assets/counterfact_smollm2_tune.json --json out/keys.json --screen-first
    python -m editing.disabling --write-reference assets/update_norms.json --from-survey out/keys.json \\
        --from-tuning TUNE.json --from-shipped assets/shipped/edits.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tracing.cli import add_common_args, load_from_args, start
from tracing.models import LoadedModel

from .edit_files import load_edits
from .evaluation.disabling import FORMAT, reference_entry, survey, write_reference
from .evaluation.evaluate import read_cases
from .hparams import ROMEHyperParams, load_hparams


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m editing.disabling", description=__doc__.split("\n")[0],
                                epilog="The reference of editing.methods.outliers: --write-reference "
                                "assets/update_norms.json --from-survey SURVEY.json --from-tuning TUNE.json "
                                "--from-shipped assets/shipped/edits.safetensors")
    p.add_argument("--cases", action="append", default=[], help="CounterFact-format JSON (repeat for several)")
    p.add_argument("--limit", type=int, default=None, help="the first N cases of each file")
    p.add_argument("--case-ids", type=int, nargs="*", default=None, help="only the cases with these case_id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override one hyperparameter")
    add_common_args(p, device=False, threads=True)
    p.add_argument("--json", default=None, help="write (and resume from) the per-edit table here")
    p.add_argument("--screen-first", action="store_true",
                   help="look at every case's keys first (seconds each), then edit the largest possible updates first")
    p.add_argument("--write-reference", metavar="OUT", default=None,
                   help="instead of a survey: write the model's reference update norms into OUT")
    p.add_argument("--from-survey", action="append", default=[], help="a survey JSON of tuning cases (reference)")
    p.add_argument("--from-tuning", action="append", default=[], help="an editing.tune JSON (reference)")
    p.add_argument("--from-shipped", action="append", default=[], help="an edits .safetensors file (reference)")
    return p


def _reference(lm: LoadedModel, hp: ROMEHyperParams, args, command: str) -> int:
    """``--write-reference``: the reference norms from earlier surveys, tuning results and shipped edits."""
    read = lambda path: json.loads(Path(path).read_text(encoding="utf-8"))  # noqa: E731
    shipped = [e for path in args.from_shipped for e in load_edits(path)]
    entry = reference_entry(lm, hp, surveys=[read(x) for x in args.from_survey],
                            tuning=[read(x) for x in args.from_tuning], shipped=shipped)
    write_reference(args.write_reference, entry, command)
    for layer, norms in entry["layers"].items():
        print(f"layer {layer}: {len(norms['norms'])} edits, median ‖ΔW‖ {norms['median']:.2f} ({norms['source']})")
    return 0


def _previous(path: Path) -> dict | None:
    """The survey already in ``path`` (resumed), None for a new file; ValueError for another kind of file."""
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if previous is not None and previous.get("format") != FORMAT:
        raise ValueError(f"{path} exists but is not a key survey; choose another --json.")
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start(args)
    command = "python -m editing.disabling " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if not args.write_reference and not (args.cases and args.json):
            raise ValueError("give --cases and --json (a survey), or --write-reference OUT with --from-* files.")
        sources = [(path, [c for c in read_cases(path)[: args.limit]
                           if args.case_ids is None or c.get("case_id") in args.case_ids]) for path in args.cases]
        overrides = {k.strip(): json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
        lm = load_from_args(args)
        hp = load_hparams(lm, **overrides)
        if args.write_reference:
            return _reference(lm, hp, args, command)
        out = Path(args.json)
        previous = _previous(out)
    except (OSError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def save(result: dict, record: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "command": command}, indent=1, ensure_ascii=False) + "\n",
                       encoding="utf-8")
        line = "  ".join(f"{v}: |ΔW| {k['norm']:6.1f} NS {record['pre']['NS']:.2f}->{k['post']['NS']:.2f}"
                         for v, k in record["keys"].items())
        print(f"[{len(result['edits'])}] {record['key']}: {line}", flush=True)

    survey(lm, sources, hp, previous=previous, on_case=save, screen_first=args.screen_first)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
