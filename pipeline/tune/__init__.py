"""Ray Tune sweeps over any job-spec field, each trial a Ray Train run and an MLflow child run.

`run_sweep(sweep)`:

1. connects to MLflow, builds the data, starts (or joins) Ray, and opens one sweep run;
2. runs the swept stage's prerequisites once from the base spec (the normal stage runner, as
   child runs of the sweep run; stages whose champion matches are skipped);
3. runs the trials with `ray.tune.Tuner`: each trial builds its job spec from the base job plus
   its sampled values, trains the stage with `fit_stage` (Ray Train, `scale.workers` workers; the
   workers' reports reach Tune as intermediate results, so ASHA can stop it), evaluates it like the
   stage runner does, logs its model, and reports the evaluation;
4. marks each trial's MLflow run FINISHED / KILLED (stopped early) / FAILED, registers the best
   completed trial's model as a new version with alias `candidate` (lineage tags as the stage
   runner writes, plus the sweep and trial), logs a summary table, and returns it.

A failed trial is reported and does not stop the sweep. An interrupted sweep resumes with
`Tuner.restore` when run again (same name, same storage); its MLflow sweep run is reused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tune.spec import Sweep, SweepSpec, load_sweep, prerequisites, trial_overrides

__all__ = ["Sweep", "SweepSpec", "SweepResult", "TrialRow", "format_table", "load_sweep", "run_sweep",
           "trial_overrides"]

log = logging.getLogger("pipeline.tune")

SWEEP_STATE = "pipeline_sweep.json"


@dataclass
class TrialRow:
    """One trial in the summary."""

    trial_id: str
    config: dict[str, Any]
    status: str  # completed | stopped early | failed
    step: float | None
    scheduler_value: float | None
    metric_value: float | None
    run_id: str | None
    error: str | None = None
    nll_bpd: float | None = None


@dataclass
class SweepResult:
    """What a sweep produced."""

    name: str
    sweep_run_id: str
    experiment_id: str
    rows: list[TrialRow]
    best: TrialRow | None
    candidate: str | None  # models:/NAME/VERSION of the registered best trial
    storage: str
    restored: bool = False
    metric: str = ""
    scheduler_metric: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ----------------------------------------------------------------------------- the trial


def _nll_bpd(export: Path, data_dir: Path, num: int, batch_size: int, seed: int) -> float:
    """Mean VLB in bits/dim of held-out images under the exported (unconditional-label) model."""
    import torch

    from pipeline.data import load_split
    from pipeline.diffusion.likelihood import nll_bits_per_dim
    from pipeline.train.export import load_exported
    from pipeline.train.tasks import make_schedule

    model, meta = load_exported(export)
    d = meta["extra"]["diffusion"]
    s = make_schedule(d)
    x = torch.from_numpy(load_split(data_dir, "test", limit=num)["image"])
    null = int(meta["extra"]["num_classes"])  # the label-dropout class: the unconditional model
    g = torch.Generator().manual_seed(seed)
    out = []
    for chunk in x.split(batch_size):
        y = torch.full((len(chunk),), null, dtype=torch.long)
        out.append(nll_bits_per_dim(lambda xt, t, y=y: model(xt.float(), t, y=y), s, chunk.double(),
                                    parameterization=d.get("parameterization", "eps"),
                                    learn_sigma=bool(d.get("learn_sigma", False)), noise_generator=g))
    return float(torch.cat(out).mean())


def _trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function trainable: one stage trained with the trial's values, evaluated, logged."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    import mlflow

    os.chdir(setup["cwd"])  # Tune starts trials in their own directory; our paths are the job's
    from pipeline import stages, tracking
    from pipeline.config import flatten
    from pipeline.data import manifest_sha256
    from pipeline.train.ray_worker import setup_worker_logging

    setup_worker_logging()
    sweep = load_sweep(setup["sweep_path"], setup["sweep_set"])
    spec = sweep.trial_spec(config)
    name = sweep.spec.stage
    stage = spec.stages[name]
    tracking.connect(setup["uri"])
    mlflow.set_tracking_uri(setup["uri"])
    client = MlflowClient()
    trial_id = tune.get_context().get_trial_id()
    ctx = stages.JobContext(spec=spec, spec_path=sweep.job_path, uri=setup["uri"],
                            experiment_id=setup["experiment_id"], parent_run_id=setup["sweep_run_id"],
                            storage=setup["storage"], data_dir=Path(setup["data_dir"]),
                            refs={k: tracking.resolve(v) for k, v in setup["refs"].items()},
                            latent_dirs={k: Path(v) for k, v in setup["latent_dirs"].items()})
    inputs = stages.input_refs(ctx, name)
    key = stages.stage_key(ctx, name, {k: v.uri for k, v in inputs.items()})
    tags = {"mlflow.parentRunId": setup["sweep_run_id"], "pipeline.stage": name, "pipeline.stage_key": key,
            "pipeline.sweep": sweep.spec.name, "pipeline.sweep_run_id": setup["sweep_run_id"],
            "pipeline.trial_id": trial_id, "pipeline.spec_sha256": spec.stage_hash(name),
            "pipeline.data_manifest_sha256": manifest_sha256(ctx.data_dir),
            "pipeline.code_version": tracking.code_version(), "pipeline.job": spec.name,
            **{f"pipeline.input.{k}": v.uri for k, v in inputs.items()}}
    found = client.search_runs([setup["experiment_id"]],
                               filter_string=f"tags.`pipeline.sweep_run_id` = '{setup['sweep_run_id']}' and "
                                             f"tags.`pipeline.trial_id` = '{trial_id}'")
    if found:  # a restored sweep re-runs an unfinished trial: same MLflow run
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(setup["experiment_id"], run_name=f"{sweep.spec.name}-{trial_id}",
                                   tags=tags).info.run_id
        tracking.log_params_flat(run_id, {**flatten(stage.model_dump(mode="json")),
                                          **{f"sweep.{k}": v for k, v in config.items()}})
    status = "FAILED"
    try:
        # Train run name per trial: a restored trial resumes from its last Train checkpoint.
        export, metrics = stages.RUNNERS[stage.kind](ctx, name, f"{sweep.spec.name}-{trial_id}", run_id, inputs)
        if sweep.spec.nll is not None:
            data_dir = stages.data_dir_of(ctx, name)
            metrics["eval/nll_bpd"] = _nll_bpd(export, data_dir, sweep.spec.nll.num_samples,
                                               sweep.spec.nll.batch_size, spec.seed)
        stages.log_metrics(run_id, metrics)
        client.log_artifacts(run_id, str(export), tracking.MODEL_ARTIFACT)
        last = {k: v for k, v in client.get_run(run_id).data.metrics.items() if _finite(v) is not None}
        final_step = float(stage.train.steps)
        tune.report({**last, **metrics, sweep.spec.scheduler.time_attr: final_step, "step": final_step,
                     "pipeline_evaluated": 1.0})
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)


# ----------------------------------------------------------------------------- the driver


def _space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, dom in sweep.spec.search.space.items():
        kind, value = dom.kind, getattr(dom, dom.kind)
        if kind == "grid":
            out[key] = tune.grid_search(list(value))
        elif kind == "choice":
            out[key] = tune.choice(list(value))
        elif kind == "uniform":
            out[key] = tune.uniform(*value)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*value)
        else:
            out[key] = tune.randint(value[0], value[1] + 1)
    return out


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # ASHA stops a trial whose time reaches max_t; beyond the last training step, so that a trial
    # that survives every rung goes on to its evaluation.
    max_t = s.max_t or sweep.base.stages[sweep.spec.stage].train.steps + 1
    return ASHAScheduler(time_attr=s.time_attr, metric=s.metric, mode=s.mode, max_t=max_t,
                         grace_period=min(s.grace_period, max_t), reduction_factor=s.reduction_factor)


def _searcher(sweep: Sweep):
    if sweep.spec.search.algorithm != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        from pipeline.config import SpecError

        raise SpecError(f"{sweep.path}: search.algorithm: optuna is not installed (`pip install optuna`), "
                        "or use `random`") from None
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(metric=sweep.spec.metric.name, mode=sweep.spec.metric.mode),
                              max_concurrent=sweep.spec.max_concurrent_trials)


def _sweep_run(client, experiment_id: str, state_file: Path, sweep: Sweep, restoring: bool) -> tuple[str, bool]:
    """The sweep's MLflow run: reused when the Tune experiment is restored."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.config import flatten

    if restoring and state_file.is_file():
        run_id = json.loads(state_file.read_text())["sweep_run_id"]
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id, True
        except MlflowException:
            log.warning("sweep run %s of %s is not in this tracking store; opening a new one", run_id, state_file)
    run = client.create_run(experiment_id, run_name=f"sweep-{sweep.spec.name}",
                            tags={"pipeline.sweep": sweep.spec.name, "pipeline.stage": sweep.spec.stage,
                                  "pipeline.job": sweep.base.name, "pipeline.spec_path": str(sweep.path),
                                  "pipeline.code_version": tracking.code_version()})
    client.log_artifact(run.info.run_id, str(sweep.path), "sweep")
    client.log_artifact(run.info.run_id, str(sweep.job_path), "spec")
    tracking.log_params_flat(run.info.run_id, flatten({"sweep": sweep.spec.model_dump(mode="json")}))
    return run.info.run_id, False


def run_sweep(sweep: Sweep, *, sweep_set: list[str] | None = None, resume: bool = True) -> SweepResult:
    """Run (or resume) a sweep; see the module docstring."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from pipeline import stages, tracking

    spec, base = sweep.spec, sweep.base
    uri = tracking.tracking_uri(base.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    tracking.connect(uri)
    data_dir = stages.ensure_data(base).resolve()
    stages.init_ray(base)
    experiment_id = tracking.training_experiment(base.tracking.experiment or base.name)
    client = MlflowClient()
    storage = Path(base.ray.storage).resolve()
    tune_root = storage / "sweeps"
    exp_dir = tune_root / spec.name
    state_file = exp_dir / SWEEP_STATE
    if not resume and exp_dir.exists():  # keep the old sweep's files; start a fresh one
        exp_dir.rename(exp_dir.with_name(f"{exp_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    restoring = resume and tune.Tuner.can_restore(str(exp_dir))
    sweep_run_id, reused = _sweep_run(client, experiment_id, state_file, sweep, restoring)
    status = "FAILED"
    try:
        ctx = stages.JobContext(spec=base, spec_path=sweep.job_path, uri=uri, experiment_id=experiment_id,
                                parent_run_id=sweep_run_id, storage=str(storage), data_dir=data_dir)
        for name in prerequisites(sweep):
            outcome = stages.run_stage(ctx, name)
            log.info("[sweep %s] prerequisite %s: %s%s", spec.name, name, outcome.status,
                     f" v{outcome.version}" if outcome.version else "")
        setup = {"cwd": str(Path.cwd()), "sweep_path": str(sweep.path.resolve()), "sweep_set": sweep_set or [],
                 "uri": uri, "experiment_id": experiment_id, "sweep_run_id": sweep_run_id,
                 "storage": str(storage), "data_dir": str(data_dir),
                 "refs": {k: v.uri for k, v in ctx.refs.items()},
                 "latent_dirs": {k: str(Path(v).resolve()) for k, v in ctx.latent_dirs.items()}}
        # the trial driver only waits on its Train run, whose workers reserve the CPUs
        trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {"CPU": 0.01})
        if restoring:
            log.info("[sweep %s] resuming the interrupted sweep from %s", spec.name, exp_dir)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=_space(sweep),
                tune_config=tune.TuneConfig(num_samples=spec.search.num_samples, scheduler=_scheduler(sweep),
                                            search_alg=_searcher(sweep),
                                            max_concurrent_trials=spec.max_concurrent_trials,
                                            reuse_actors=False),
                run_config=tune.RunConfig(name=spec.name, storage_path=str(tune_root), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
            )
        exp_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"sweep_run_id": sweep_run_id, "tracking_uri": tracking.redact(uri)}))
        t0 = time.perf_counter()
        grid = tuner.fit()
        if _interrupted(grid, sweep):
            client.set_tag(sweep_run_id, "pipeline.sweep.interrupted", time.strftime("%Y-%m-%dT%H:%M:%S"))
            status = "KILLED"
            raise KeyboardInterrupt(f"sweep {spec.name} interrupted; its state is in {exp_dir}")
        rows = _rows(client, sweep, sweep_run_id, experiment_id, grid)
        best = _best(rows, spec.metric.mode)
        candidate = _register_best(client, sweep, sweep_run_id, best, data_dir)
        result = SweepResult(spec.name, sweep_run_id, experiment_id, rows, best, candidate, str(exp_dir),
                             reused, spec.metric.name, spec.scheduler.metric,
                             {"seconds": time.perf_counter() - t0})
        _log_summary(client, result, sweep)
        status = "FINISHED"
        return result
    finally:
        client.set_terminated(sweep_run_id, status)


def _expected_trials(sweep: Sweep) -> int:
    search = sweep.spec.search
    if search.algorithm != "grid":
        return search.num_samples
    return search.num_samples * math.prod(len(d.grid or []) for d in search.space.values())


def _interrupted(grid, sweep: Sweep) -> bool:
    """True when Tune returned before every trial ended (Ctrl-C, SIGTERM): resume instead of summarising."""
    trials = grid._experiment_analysis.trials  # Trial objects, with their final status
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < _expected_trials(sweep)


def _rows(client, sweep: Sweep, sweep_run_id: str, experiment_id: str, grid) -> list[TrialRow]:
    """One row per trial; marks the trials' MLflow runs by how they ended."""
    spec = sweep.spec
    runs = client.search_runs([experiment_id], filter_string=f"tags.`pipeline.sweep_run_id` = '{sweep_run_id}'",
                              max_results=10000)
    by_trial = {r.data.tags.get("pipeline.trial_id"): r for r in runs}
    rows: list[TrialRow] = []
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or (Path(res.path).name if res.path else "?")
        run = by_trial.get(trial_id)
        if run is None:  # fall back to matching the directory name, which starts with the trainable name
            run = next((r for t, r in by_trial.items() if t and t in (res.path or "")), None)
        config = {k: v for k, v in (res.config or {}).items()}
        if res.error is not None:
            status = "failed"
        elif m.get("pipeline_evaluated"):
            status = "completed"
        else:
            status = "stopped early"
        row = TrialRow(trial_id=str(trial_id), config=config, status=status, step=_finite(m.get("step")),
                       scheduler_value=_finite(m.get(spec.scheduler.metric)),
                       metric_value=_finite(m.get(spec.metric.name)) if status == "completed" else None,
                       run_id=run.info.run_id if run else None,
                       error=(f"{type(res.error).__name__}: {str(res.error).splitlines()[-1][:300]}"
                              if res.error is not None else None),
                       nll_bpd=_finite(m.get("eval/nll_bpd")))
        rows.append(row)
        if run is not None:
            want = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}[status]
            client.set_tag(run.info.run_id, "pipeline.trial_status", status)
            if row.error:
                client.set_tag(run.info.run_id, "pipeline.trial_error", row.error[:5000])
            if run.info.status != want:
                client.set_terminated(run.info.run_id, want)
    rows.sort(key=lambda r: r.trial_id)
    return rows


def _best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    done = [r for r in rows if r.status == "completed" and r.metric_value is not None and r.run_id]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r.metric_value)


def _register_best(client, sweep: Sweep, sweep_run_id: str, best: TrialRow | None, data_dir: Path) -> str | None:
    """Register the best trial's logged model with the sweep's alias (once per sweep run)."""
    from pipeline import tracking

    if best is None:
        log.warning("[sweep %s] no trial completed; nothing registered", sweep.spec.name)
        return None
    done = client.get_run(sweep_run_id).data.tags.get("pipeline.sweep.candidate")
    if done and done.endswith(f"#{best.run_id}"):
        return done.split("#")[0]
    stage = sweep.base.stages[sweep.spec.stage]
    run = client.get_run(best.run_id)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("pipeline.") and k not in
            ("pipeline.stage", "pipeline.trial_status", "pipeline.trial_error")}
    tags["pipeline.sweep_metric"] = f"{sweep.spec.metric.name}={best.metric_value}"
    import mlflow

    export = mlflow.artifacts.download_artifacts(f"runs:/{best.run_id}/{tracking.MODEL_ARTIFACT}")
    from pipeline.data import read_manifest
    from pipeline.data.shards import expected_chw

    ref = tracking.register(stage.registry.name, best.run_id, export, tags,
                            image_chw=expected_chw(read_manifest(data_dir)))
    tracking.set_alias(ref.name, sweep.spec.register_alias, ref.version)
    client.set_tag(sweep_run_id, "pipeline.sweep.candidate", f"{ref.uri}#{best.run_id}")
    log.info("[sweep %s] best trial %s (%s=%.6g) registered as %s v%s @%s", sweep.spec.name, best.trial_id,
             sweep.spec.metric.name, best.metric_value, ref.name, ref.version, sweep.spec.register_alias)
    return ref.uri


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(x)}" for k, x in v.items())
    return str(v)


def format_table(result: SweepResult) -> str:
    """The summary as a Markdown table, best trial marked."""
    keys = sorted({k for r in result.rows for k in r.config})
    short = [k.rsplit(".", 1)[-1] for k in keys]
    nll = any(r.nll_bpd is not None for r in result.rows)
    head = ["trial", *short, "status", "step", result.scheduler_metric, result.metric, *(["nll bpd"] if nll else []),
            "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        mark = " **best**" if result.best is not None and r.trial_id == result.best.trial_id else ""
        cells = [r.trial_id + mark, *[_fmt(r.config.get(k)) for k in keys], r.status + (f" ({r.error})" if r.error
                                                                                    else ""),
                 _fmt(r.step), _fmt(r.scheduler_value), _fmt(r.metric_value), *([_fmt(r.nll_bpd)] if nll else []),
                 r.run_id or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_summary(client, result: SweepResult, sweep: Sweep) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        md = Path(d) / "sweep_summary.md"
        md.write_text(f"# Sweep {result.name}\n\n{format_table(result)}\n\ncandidate: {result.candidate}\n")
        js = Path(d) / "sweep_summary.json"
        js.write_text(json.dumps({"candidate": result.candidate,
                                  "best_trial": result.best.trial_id if result.best else None,
                                  "trials": [r.__dict__ for r in result.rows]}, indent=2, default=str))
        client.log_artifact(result.sweep_run_id, str(md))
        client.log_artifact(result.sweep_run_id, str(js))
    counts = {s: sum(r.status == s for r in result.rows) for s in ("completed", "stopped early", "failed")}
    for k, v in counts.items():
        client.log_metric(result.sweep_run_id, f"sweep/trials_{k.replace(' ', '_')}", v)
    if result.best is not None:
        client.log_metric(result.sweep_run_id, f"sweep/best_{sweep.spec.metric.name}", result.best.metric_value)
        client.set_tag(result.sweep_run_id, "pipeline.sweep.best_run_id", result.best.run_id)

