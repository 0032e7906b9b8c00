"""generation: few-step samplers of one job compared on held-out data (issue #6, "Must show").

`pipeline bench generation jobs/distill.yaml [--set KEY=VALUE ...] [--num N] [--tracking-uri URI]` reads the
job's registered champions from MLflow (run it where the job ran) and measures, with the same seed, number of
samples and the job's clean classifier (FID/KID on its features, class accuracy against the held-out split):

- the diffusion teacher with DDIM at `--teacher-steps` (default 64, 8) and the distillation guidance;
- the progressive-distillation students: 1 step from the registered model, the intermediate halvings
  (8, 4, 2 steps) from the metrics the distill stage logged for them (their weights are not registered);
- the consistency models (CD and CT stages) at each of their `eval_steps` (1 and 2);
- the teacher with classifier-free guidance w ∈ `--cfg` (0, 1, 3) and with classifier guidance (DDIM, eq. 38,
  the job's noisy classifier) at `--cg-scales` (default 1, 3), all at the first of `--teacher-steps`;
- held-out reference: training images against the held-out split (the floor of the metrics).

The table is printed, logged to a `bench-generation` MLflow run of the job's experiment (`table.md` plus one
metric per row) and written to bench-results/generation.json.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.bench import Options, Report

COLUMNS = ["model", "sampler", "steps", "guidance", "FID", "KID", "class acc", "img/s", "source"]


def _parse(extra: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipeline bench generation")
    p.add_argument("job", help="the job file whose registered models are compared (e.g. jobs/distill.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--num", type=int, default=None, help="samples per row (default: the job's eval.num_samples)")
    p.add_argument("--teacher-steps", default="64,8", help="DDIM steps of the teacher rows (comma-separated)")
    p.add_argument("--cfg", default="0,1,3", help="classifier-free guidance weights of the teacher")
    p.add_argument("--cg-scales", default="1,3", help="classifier guidance scales of the teacher")
    p.add_argument("--part", choices=["all", "teacher", "students"], default="all",
                   help="only the teacher rows (steps, CFG, classifier guidance, reference) or only the distilled ones")
    p.add_argument("--tracking-uri", default=None)
    return p.parse_args(extra)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _stage_of(spec, kind: str, **attrs: Any) -> str | None:
    for name, stage in spec.stages.items():
        if stage.kind == kind and all(getattr(stage, k, None) == v for k, v in attrs.items()):
            return name
    return None


def run(opts: Options) -> Report:
    """Measure every sampler of the job's registered models and return the table."""
    import torch

    from pipeline import tracking
    from pipeline.config import load_spec
    from pipeline.data import load_split
    from pipeline.eval import generate, sample_metrics
    from pipeline.stages import guidance_cond_fn, load_generator
    from pipeline.train.export import load_exported

    args = _parse(opts.extra)
    spec = load_spec(args.job, args.set)
    tracking.connect(tracking.tracking_uri(args.tracking_uri or spec.tracking.uri))
    n = args.num or (40 if opts.quick else spec.eval.num_samples)
    seed = spec.seed
    if not spec.eval.classifier:
        raise SystemExit(f"{args.job}: eval.classifier is not set; the table needs the job's classifier")

    def champion(stage_name: str) -> tracking.ModelRef:
        return tracking.resolve(f"models:/{spec.stages[stage_name].registry.name}@champion")

    classifier, _ = load_exported(tracking.download(champion(spec.eval.classifier)))
    real = torch.from_numpy(load_split(spec.data.dir, "test")["image"])
    labels = torch.arange(n) % 10
    rows: list[dict[str, Any]] = []
    versions: dict[str, str] = {}

    def measure(model: str, gen, steps, guidance: float = 0.0, sampler: str = "DDIM", **kw: Any) -> None:
        t0 = time.perf_counter()
        fake = generate(gen, labels[:n] % gen.num_classes, steps=steps, guidance=guidance, seed=seed, **kw)
        secs = time.perf_counter() - t0
        m = sample_metrics(fake, labels[:n] % gen.num_classes, real, classifier)
        k = steps if isinstance(steps, int) else len(steps)
        rows.append({"model": model, "sampler": sampler, "steps": k, "guidance": _guidance_text(gen, guidance, kw),
                     "FID": m["fid"], "KID": m["kid"], "class acc": m["class_accuracy"], "img/s": n / secs,
                     "source": "measured"})
        print(f"  {model:<34} {sampler:<22} {k:>3} steps  FID {m['fid']:8.3f}  acc {m['class_accuracy']:.3f}",
              flush=True)

    teacher_part, student_part = args.part in ("all", "teacher"), args.part in ("all", "students")
    # held-out reference: real training images vs the held-out split
    if teacher_part:
        train = load_split(spec.data.dir, "train")
        idx = torch.randperm(len(train["label"]), generator=torch.Generator().manual_seed(seed))[:n]
        m = sample_metrics(torch.from_numpy(train["image"])[idx], torch.from_numpy(train["label"])[idx], real,
                           classifier)
        rows.append({"model": "training images (reference)", "sampler": "-", "steps": 0, "guidance": "-",
                     "FID": m["fid"], "KID": m["kid"], "class acc": m["class_accuracy"], "img/s": float("nan"),
                     "source": "measured"})

    distill = _stage_of(spec, "distill")
    teacher_name = spec.stages[distill].needs[0] if distill else _stage_of(spec, "diffusion")
    if teacher_name is None:
        raise SystemExit(f"{args.job}: no diffusion stage to compare")
    teacher_ref = champion(teacher_name)
    versions[teacher_name] = f"{teacher_ref.name} v{teacher_ref.version}"
    teacher = load_generator(tracking.download(teacher_ref))
    w_distill = spec.stages[distill].guidance if distill else spec.stages[teacher_name].sampling.guidance
    teacher_steps = [int(s) for s in _floats(args.teacher_steps)]
    for steps in teacher_steps if teacher_part else []:
        measure(f"teacher ({teacher_name})", teacher, steps, w_distill)

    skipped: list[str] = []

    def registered(stage_name: str) -> tracking.ModelRef | None:
        try:
            return champion(stage_name)
        except tracking.TrackingError as exc:  # the stage has not (yet) registered a champion
            skipped.append(f"{stage_name}: {exc}")
            return None

    ref = registered(distill) if distill and student_part else None
    if ref is not None:
        versions[distill] = f"{ref.name} v{ref.version}"
        student = load_generator(tracking.download(ref))
        final = student.default_steps
        logged = _logged_students(ref)
        for k in sorted(logged, reverse=True):
            if k == len(final):  # the registered student: measured below
                continue
            rows.append({"model": f"progressive distillation ({distill})", "sampler": "DDIM (student)", "steps": k,
                         "guidance": f"{w_distill:g} (distilled)", **logged[k],
                         "source": f"logged by the stage (run {ref.run_id[:8]})"})
        measure(f"progressive distillation ({distill})", student, final, sampler="DDIM (student)")

    for mode in ("distill", "train"):
        name = _stage_of(spec, "consistency", mode=mode)
        if name is None or not student_part:
            continue
        ref = registered(name)
        if ref is None:
            continue
        versions[name] = f"{ref.name} v{ref.version}"
        gen = load_generator(tracking.download(ref))
        label = {"distill": "consistency distillation", "train": "consistency training"}[mode]
        for steps in spec.stages[name].eval_steps:
            measure(f"{label} ({name})", gen, steps, spec.stages[name].sampling.guidance, sampler="consistency")

    steps = teacher_steps[0]
    for w in _floats(args.cfg) if teacher_part else []:
        if w == w_distill and steps in teacher_steps:
            continue  # already a row
        measure(f"teacher ({teacher_name})", teacher, steps, w)
    guide = spec.stages[teacher_name].sampling.classifier or _stage_of(spec, "classifier", noisy=True)
    if guide and teacher_part:
        ctx = _refs_context(spec, guide, champion)
        cond_fn = guidance_cond_fn(ctx, guide, teacher)
        for scale in _floats(args.cg_scales):
            measure(f"teacher ({teacher_name})", teacher, steps, 0.0, sampler="DDIM + classifier guidance",
                    cond_fn=cond_fn, classifier_scale=scale)

    report = Report(name="generation", command=_command(args), columns=COLUMNS, rows=rows,
                    notes=[f"{n} samples per row (labels 0..9 in turn), seed {seed}; FID/KID on the features of "
                           f"{spec.eval.classifier} ({champion(spec.eval.classifier).name}), against the "
                           f"held-out split of {spec.data.dir} ({len(real)} images)",
                           "models: " + ", ".join(f"{k}: {v}" for k, v in versions.items())],
                    params={"job": str(args.job), "set": args.set, "num": n, "versions": versions})
    report.notes += [f"no row for {s}" for s in skipped]
    _log_run(spec, report)
    return report


def _guidance_text(gen, guidance: float, kw: dict[str, Any]) -> str:
    distilled = float(gen.extra.get("distilled_guidance", 0.0))
    if distilled:
        return f"{distilled:g} (distilled)"
    text = f"CFG {guidance:g}"
    if kw.get("classifier_scale"):
        text += f", classifier {kw['classifier_scale']:g}"
    return text


def _logged_students(ref) -> dict[int, dict[str, float]]:
    """The distill stage's per-halving metrics `eval/student_{k}steps_*`, by step count k."""
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient().get_run(ref.run_id).data.metrics
    out: dict[int, dict[str, float]] = {}
    names = {"fid": "FID", "kid": "KID", "class_accuracy": "class acc", "samples_per_sec": "img/s"}
    for key, value in metrics.items():
        m = re.fullmatch(r"eval/student_(\d+)steps_(\w+)", key)
        if m and m.group(2) in names:
            out.setdefault(int(m.group(1)), {})[names[m.group(2)]] = value
    return out


def _refs_context(spec, guide: str, champion):
    """A minimal stand-in for the job context: the noisy classifier stage's champion by stage name."""
    from types import SimpleNamespace

    if guide.startswith("models:/"):
        return None
    return SimpleNamespace(refs={guide: champion(guide)})


def _command(args: argparse.Namespace) -> str:
    sets = "".join(f" --set {s}" for s in args.set)
    return (f"pipeline bench generation {args.job}{sets}" + (f" --num {args.num}" if args.num else "")
            + (f" --part {args.part}" if args.part != "all" else ""))


def _log_run(spec, report: Report) -> None:
    """Log the table (table.md) and one metric per measured row to a `bench-generation` run."""
    from mlflow.tracking import MlflowClient

    import mlflow

    exp = mlflow.set_experiment(spec.tracking.experiment or spec.name)
    client = MlflowClient()
    run = client.create_run(exp.experiment_id, run_name="bench-generation", tags={"pipeline.job": spec.name,
                                                                                 "pipeline.bench": "generation"})
    for row in report.rows:
        slug = re.sub(r"[^a-z0-9]+", "_", f"{row['model']} {row['sampler']} {row['steps']} {row['guidance']}".lower())
        for col, key in (("FID", "fid"), ("KID", "kid"), ("class acc", "class_accuracy")):
            value = row.get(col)
            if isinstance(value, float) and value == value:
                client.log_metric(run.info.run_id, f"{slug.strip('_')}/{key}", value)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "table.md"
        path.write_text(report.table() + "\n\n" + "\n".join(f"note: {x}" for x in report.notes) + "\n")
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    report.notes.append(f"logged to MLflow run {run.info.run_id} (experiment '{exp.name}', artifact table.md)")
