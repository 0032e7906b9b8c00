"""The `pipeline` command line: run jobs, build data, sample, evaluate, submit to a cluster."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

log = logging.getLogger("pipeline")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.config import SpecError
    from pipeline.data import DataError
    from pipeline.tracking import TrackingError

    return (SpecError, DataError, TrackingError)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec

    spec = load_spec(args.job, args.set)  # validated whole before any work starts
    from pipeline.stages import run_job

    t0 = time.perf_counter()
    outcomes = run_job(spec, args.job)
    from pipeline import tracking

    uri = tracking.tracking_uri(spec.tracking.uri)
    print(f"\nJob '{spec.name}' finished in {time.perf_counter() - t0:.0f} s.")
    print(f"{'stage':<14}{'status':<10}{'version':<9}{'champion':<10}{'time':>7}")
    for o in outcomes:
        print(f"{o.name:<14}{o.status:<10}{(o.version or '-'):<9}{('yes' if o.champion else 'no'):<10}"
              f"{o.seconds:>6.0f}s")
    for o in outcomes:
        if spec.stages[o.name].kind != "distill" or not o.metrics:
            continue
        teacher = spec.stages[spec.stages[o.name].needs[0]]
        metrics = dict(o.metrics)
        base = next((p.metrics for p in outcomes if p.name == spec.stages[o.name].needs[0]), {})
        steps = getattr(teacher, "sampling", None)
        if steps is not None:  # the teacher's own evaluation, at its full step count
            metrics.update({k.replace("eval/", f"eval/teacher_{steps.steps}steps_"): v for k, v in base.items()})
        _print_distill_report(metrics)
    print(f"\nMLflow runs and registered models: {tracking.redact(uri)} (experiment "
          f"'{spec.tracking.experiment or spec.name}'); browse with `mlflow ui --backend-store-uri "
          f"{tracking.redact(uri)}`")
    names = [s.registry.name for s in spec.stages.values() if hasattr(s, "registry") and s.kind != "encode"]
    print("Registered models (alias champion): " + ", ".join(f"models:/{n}@champion" for n in names))
    print("Sample grids: the artifacts samples/*.png of each stage's run; draw a new one with\n"
          f"  pipeline sample models:/{names[-1]}@champion --label 3 --out grid.png")
    return 0


def _print_distill_report(metrics: dict[str, float]) -> None:
    rows = sorted({m.group(1) for k in metrics if (m := re.match(r"eval/((?:teacher|student)_\d+steps)_", k))},
                  key=lambda r: (r.startswith("student"), -int(re.sub(r"\D", "", r))))
    if not rows:
        return
    print("\nTeacher vs distilled students on held-out digits (classifier features):")
    print(f"{'model':<22}{'class acc':>10}{'FID':>10}{'KID':>10}{'img/s':>9}")
    for r in rows:
        def g(m: str, r: str = r) -> float:
            return metrics.get(f"eval/{r}_{m}", float("nan"))
        print(f"{r:<22}{g('class_accuracy'):>10.3f}{g('fid'):>10.3f}{g('kid'):>10.4f}{g('samples_per_sec'):>9.1f}")


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec

    spec = load_spec(args.job, args.set)
    print(f"{args.job}: ok ({len(spec.stages)} stages: {', '.join(spec.stages)})")
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from pipeline.data import build_dataset

    m = build_dataset(args.source, Path(args.out), image_size=args.image_size, held_out=args.held_out,
                      shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite)
    for name, split in m.splits.items():
        print(f"{name}: {split.num_samples} samples in {len(split.shards)} shard(s)")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _connect(uri: str | None) -> None:
    from pipeline import tracking

    tracking.connect(tracking.tracking_uri(uri))


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from pipeline import tracking
    from pipeline.eval import generate, image_grid
    from pipeline.stages import load_generator

    _connect(args.tracking_uri)
    ref = tracking.resolve(args.model)
    gen = load_generator(tracking.download(ref))
    if args.label is not None:
        if not 0 <= args.label < gen.num_classes:
            raise SystemExit(f"error: --label must be in [0, {gen.num_classes - 1}]")
        labels = torch.full((args.num,), args.label, dtype=torch.long)
    else:
        labels = torch.arange(args.num) % gen.num_classes
    steps = args.steps if args.steps is not None else None
    x = generate(gen, labels, steps=steps, guidance=args.guidance, sampler=args.sampler, eta=args.eta,
                 seed=args.seed)
    Path(args.out).write_bytes(image_grid(x, nrow=args.nrow, scale=4))
    print(f"{len(x)} samples of {ref.name} v{ref.version} → {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.eval import generate, sample_metrics
    from pipeline.stages import load_generator
    from pipeline.train.export import load_exported

    _connect(args.tracking_uri)
    ref = tracking.resolve(args.model)
    gen = load_generator(tracking.download(ref))
    classifier, _ = load_exported(tracking.download(tracking.resolve(args.classifier)))
    real = torch.from_numpy(load_split(args.data, "test")["image"])
    labels = torch.arange(args.num) % gen.num_classes
    fake = generate(gen, labels, steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed)
    m = sample_metrics(fake, labels, real, classifier)
    print(f"{ref.name} v{ref.version}: class accuracy {m['class_accuracy']:.3f}  FID {m['fid']:.3f}  "
          f"KID {m['kid']:.4f} ± {m['kid_std']:.4f}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec

    load_spec(args.job, args.set)  # fail here, not on the cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entry = " ".join(["pipeline", "run", args.job, *[f"--set {s}" for s in args.set]])
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": args.working_dir,
                                                              "env_vars": env,
                                                              "excludes": [".venv", "mlruns", ".pipeline",
                                                                           "mlflow.db", ".git"]})
    print(f"submitted {job_id} to {args.address}: {entry}")
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="")

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import tracking

    _connect(args.tracking_uri)
    gate = None
    if args.metric:
        gate = tracking.Gate(args.metric, higher_is_better=args.higher_is_better)
    r = tracking.promote(args.name, to=args.to, from_=args.from_, force=args.force, gate=gate)
    prev = f"v{r.previous.version}" if r.previous else "(none)"
    values = f" [{r.metric}: candidate {r.candidate_value}, {args.to} {r.previous_value}]" if r.metric else ""
    if r.promoted:
        print(f"{args.name}@{args.to}: {prev} → v{r.candidate.version} ({r.reason}){values}")
        return 0
    print(f"{args.name}@{args.to} stays {prev}: not promoting v{r.candidate.version}: {r.reason}{values}")
    return 1


def cmd_lineage(args: argparse.Namespace) -> int:
    from pipeline import tracking

    _connect(args.tracking_uri)
    print("\n".join(tracking.format_lineage(tracking.lineage(args.model))))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import format_table, load_sweep, run_sweep

    sweep = load_sweep(args.sweep, args.set)  # validated whole before any work starts
    result = run_sweep(sweep, sweep_set=args.set, resume=not args.restart)
    print(f"\nSweep '{result.name}'{' (resumed)' if result.restored else ''}: {len(result.rows)} trials, "
          f"MLflow run {result.sweep_run_id}, Tune experiment {result.storage}")
    print(format_table(result))
    failed = [r for r in result.rows if r.status == "failed"]
    for r in failed:
        print(f"trial {r.trial_id} failed: {r.error}")
    if result.candidate:
        print(f"best trial {result.best.trial_id}: {result.metric}={result.best.metric_value:.6g} → "
              f"{result.candidate} (@{sweep.spec.register_alias}); promote with `pipeline promote "
              f"{result.candidate.split('/')[1]} --to champion`")
        return 0
    print("no trial completed; nothing was registered")
    return 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Forward to `python -m pipeline.bench` (see BENCHMARKS.md)."""
    from pipeline.bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every stage of a job file")
    r.add_argument("job")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field (repeatable)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a job file without running it")
    v.add_argument("job")
    v.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    v.set_defaults(fn=cmd_validate)

    d = sub.add_parser("data", help="datasets as WebDataset shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write shards + manifest from a source")
    b.add_argument("--source", required=True, help="digits | photos | imagefolder:PATH")
    b.add_argument("--out", required=True)
    b.add_argument("--image-size", type=int, default=None)
    b.add_argument("--held-out", type=float, default=0.15)
    b.add_argument("--shard-size", type=int, default=512)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(fn=cmd_data_build)

    s = sub.add_parser("sample", help="draw an image grid from a registered diffusion model")
    s.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    s.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w")
    s.add_argument("--label", type=int, default=None, help="class to draw (default: all classes)")
    s.add_argument("--sampler", choices=["ddim", "ancestral"], default="ddim")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--nrow", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="grid.png")
    s.add_argument("--tracking-uri", default=None)
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="FID/KID and class accuracy of a generator")
    e.add_argument("model")
    e.add_argument("--classifier", default="models:/ldm-classifier@champion")
    e.add_argument("--data", default="data/digits")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=0.0)
    e.add_argument("--sampler", choices=["ddim", "ancestral"], default="ddim")
    e.add_argument("--num", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--tracking-uri", default=None)
    e.set_defaults(fn=cmd_eval)

    bn = sub.add_parser("bench", help="benchmarks: bench NAME [--json OUT] [--repeats N] [--quick] (BENCHMARKS.md)",
                        description="Forwards to `python -m pipeline.bench` (`pipeline bench data -h`).")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)
    bn.set_defaults(fn=cmd_bench)

    j = sub.add_parser("submit", help="submit a job to a Ray cluster and stream its logs")
    j.add_argument("job")
    j.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    j.add_argument("--working-dir", default=".")
    j.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    j.set_defaults(fn=cmd_submit)

    pr = sub.add_parser("promote", help="move a registry alias to a better version (metric-gated)")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("--to", default="champion", help="alias to move (default: champion)")
    pr.add_argument("--from", dest="from_", default="candidate", help="alias or version to promote")
    pr.add_argument("--force", action="store_true", help="promote without comparing (recorded in a tag)")
    pr.add_argument("--metric", default=None, help="compare on this metric instead of the stage's gate")
    pr.add_argument("--higher-is-better", action="store_true", help="with --metric: higher values win")
    pr.add_argument("--tracking-uri", default=None)
    pr.set_defaults(fn=cmd_promote)

    ln = sub.add_parser("lineage", help="print the chain of versions behind a model back to the data")
    ln.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ln.add_argument("--tracking-uri", default=None)
    ln.set_defaults(fn=cmd_lineage)

    t = sub.add_parser("tune", help="Ray Tune sweep of a job's stage (jobs/sweep*.yaml)")
    t.add_argument("sweep")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a sweep-file field (repeatable)")
    t.add_argument("--restart", action="store_true", help="do not resume an interrupted sweep of this name")
    t.set_defaults(fn=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pipeline` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(args.fn(args) or 0)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
