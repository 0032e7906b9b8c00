"""gpu: forwards to the plain-process GPU script `pipeline/bench/gpu.py` (owned by another engineer).

That script measures DiT-B/2 and DiT-XL/2 images/s and MFU against the peak measured in the same run,
on a lent GPU machine. This entry point only finds and calls it: `run(opts)` if it defines one
(returning a `Report`), else `main(argv)` with the benchmark-specific arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from pipeline.bench import Options, Report


def run(opts: Options) -> Report | None:
    """Call `pipeline.bench.gpu` if it exists; say so plainly if it does not."""
    if importlib.util.find_spec("pipeline.bench.gpu") is None:
        print("pipeline bench gpu: pipeline/bench/gpu.py does not exist yet (the GPU script is owned by "
              "another engineer; see BENCHMARKS.md)", file=sys.stderr)
        return None
    gpu = importlib.import_module("pipeline.bench.gpu")
    if hasattr(gpu, "run"):
        return gpu.run(opts)
    if hasattr(gpu, "main"):
        argv = [*opts.extra, *(["--quick"] if opts.quick else []),
                *(["--repeats", str(opts.repeats)] if opts.repeats else [])]
        rc = gpu.main(argv)
        if rc:
            raise SystemExit(rc)
        return None
    raise SystemExit("pipeline/bench/gpu.py defines neither run(opts) nor main(argv)")
