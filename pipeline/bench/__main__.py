"""`python -m pipeline.bench <name> [--json OUT] [--repeats N] [--quick] [benchmark options]`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from pipeline.bench import BENCHMARKS, RESULTS_DIR, Options, loadavg


def build_parser() -> argparse.ArgumentParser:
    """The benchmark command line (also reached through `pipeline bench`)."""
    p = argparse.ArgumentParser(prog="pipeline bench", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    p.add_argument("--json", default=None, metavar="OUT",
                   help=f"where to write the JSON result (default: {RESULTS_DIR}/<name>.json)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: per benchmark)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke mode: tiny sizes, few repeats")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark, print its table and write its JSON."""
    args, extra = build_parser().parse_known_args(argv)  # the rest: benchmark-specific arguments
    extra = [a for a in extra if a != "--"]
    module = importlib.import_module(BENCHMARKS[args.name])
    before = loadavg()
    t0 = time.perf_counter()
    report = module.run(Options(repeats=args.repeats, quick=args.quick, extra=extra))
    if report is None:  # e.g. `gpu` where no GPU script exists
        return 1
    report.seconds = time.perf_counter() - t0
    report.load_before = report.load_before or before
    report.load_after = report.load_after or loadavg()
    if args.quick:
        report.notes.append("--quick smoke mode: not a measurement")
    out = report.write_json(Path(args.json) if args.json else RESULTS_DIR / f"{args.name}.json")
    print(report.text())
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
