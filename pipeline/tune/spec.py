"""Sweep specs (jobs/sweep*.yaml): a base job file, a search space over dotted spec paths, a scheduler.

```yaml
name: ae-beta                  # the sweep's name: its MLflow run and its Tune experiment directory
job: ldm.yaml                  # the base job file, relative to this file
stage: autoencoder             # the stage every trial trains (its prerequisites run once, from the base spec)
set: [stages.autoencoder.train.steps=200]      # overrides applied to the base job before the space
metric: {name: eval/recon_mse, mode: min}      # picks the best trial (reported when a trial ends)
search:
  algorithm: grid              # grid | random | optuna (optuna needs the `optuna` package)
  num_samples: 1               # grid: repeats of the whole grid; random/optuna: number of trials
  space:
    stages.autoencoder.objective.beta: {grid: [1.0e-6, 1.0e-5, 1.0e-4]}
    stages.autoencoder.train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    objective:                 # a group: each value is a mapping of dotted paths set together
      grid: [{stages.diffusion.diffusion.loss: simple},
             {stages.diffusion.diffusion.loss: hybrid, stages.diffusion.diffusion.learn_sigma: true,
              stages.diffusion.model.args.learn_sigma: true}]   # L_hybrid trains Σ (eq. 35)
scheduler: {kind: asha, metric: train/loss, mode: min, grace_period: 50, reduction_factor: 2}
max_concurrent_trials: 2
```

Errors name the sweep file, the key path and what was expected; every value of the space is
checked against the base job spec before any trial starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import JobSpec, SpecError, apply_overrides, parse_spec, read_yaml
from pipeline.data.storage import local_path

_DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(_Strict):
    """One dimension of the space: exactly one of grid / choice / uniform / loguniform / randint."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        set_ = [k for k in _DOMAINS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"expected exactly one of {', '.join(_DOMAINS)}, got {set_ or 'none'}")
        kind = set_[0]
        value = getattr(self, kind)
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"`{kind}` needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"`{kind}` needs [low, high] with low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("`loguniform` needs a positive lower bound")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _DOMAINS if getattr(self, k) is not None)

    def examples(self) -> list[Any]:
        """Values to validate against the job spec: every listed value, or both bounds."""
        value = getattr(self, self.kind)
        return list(value)


class SearchSpec(_Strict):
    """How trials are generated."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    space: dict[str, Domain]

    @model_validator(mode="after")
    def _fits_algorithm(self) -> SearchSpec:
        if not self.space:
            raise ValueError("the search space is empty")
        kinds = {k: d.kind for k, d in self.space.items()}
        if self.algorithm == "grid":
            bad = [k for k, v in kinds.items() if v != "grid"]
            if bad:
                raise ValueError(f"algorithm `grid` needs `grid:` dimensions; {', '.join(bad)} are not "
                                 "(use algorithm `random` to sample them)")
        if self.algorithm == "optuna":
            bad = [k for k, v in kinds.items() if v == "grid"]
            if bad:
                raise ValueError(f"algorithm `optuna` cannot search `grid:` dimensions ({', '.join(bad)}); "
                                 "use `choice:`")
        return self


class SchedulerSpec(_Strict):
    """Early stopping of trials on an intermediate metric reported by the trainers."""

    kind: Literal["asha", "fifo"] = "asha"
    metric: str = "train/loss"
    mode: Literal["min", "max"] = "min"
    time_attr: str = "step"
    grace_period: int = Field(50, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)


class MetricSpec(_Strict):
    """The metric that picks the best trial (reported once, when a trial has been evaluated)."""

    name: str
    mode: Literal["min", "max"] = "min"


class NllSpec(_Strict):
    """Extra evaluation of diffusion trials: the VLB in bits/dim on held-out images (eq. 26)."""

    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)


class SweepSpec(_Strict):
    """A whole sweep."""

    name: str
    job: str
    stage: str
    set: list[str] = Field(default_factory=list)
    metric: MetricSpec
    search: SearchSpec
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: int = Field(2, ge=1)
    register_alias: str = "candidate"
    nll: NllSpec | None = None


class Sweep:
    """A validated sweep: its spec, the base job (raw and parsed) and where they came from."""

    def __init__(self, spec: SweepSpec, path: Path, job_path: Path, job_raw: dict[str, Any], base: JobSpec):
        self.spec, self.path, self.job_path, self.job_raw, self.base = spec, path, job_path, job_raw, base

    def overrides(self, config: dict[str, Any]) -> list[str]:
        """The `key.path=value` overrides of one trial (base `set`, then the sampled values)."""
        return [*self.spec.set, *trial_overrides(config)]

    def trial_spec(self, config: dict[str, Any]) -> JobSpec:
        """The job spec of one trial."""
        raw = apply_overrides(copy.deepcopy(self.job_raw), self.overrides(config), str(self.job_path))
        return parse_spec(raw, f"{self.job_path} (sweep {self.path})")


def trial_overrides(config: dict[str, Any]) -> list[str]:
    """Dotted-path overrides of a sampled config; mapping values (groups) set several paths."""
    out: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict):
            out += [f"{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            out.append(f"{key}={json.dumps(value)}")
    return out


def _prereqs(base: JobSpec, stage: str) -> list[str]:
    """Stages that must have a champion before `stage` can train, in job order."""
    need: set[str] = set()

    def walk(name: str) -> None:
        for n in base.stages[name].needs:
            if n not in need:
                need.add(n)
                walk(n)

    walk(stage)
    kind = base.stages[stage].kind
    if kind in ("diffusion", "distill") and base.eval.classifier and base.eval.classifier != stage:
        need.add(base.eval.classifier)
        walk(base.eval.classifier)
    return [n for n in base.stages if n in need]


def prerequisites(sweep: Sweep) -> list[str]:
    """The stages run once (from the base spec) before the trials start."""
    return _prereqs(sweep.base, sweep.spec.stage)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file and its base job. Raises SpecError with a complete message."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [], str(path))
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid sweep spec ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}")
        raise SpecError("\n".join(lines)) from None
    job_path = (path.parent / spec.job) if not Path(spec.job).is_absolute() else Path(spec.job)
    if not job_path.is_file() and Path(spec.job).is_file():
        job_path = Path(spec.job)
    if not job_path.is_file():
        raise SpecError(f"{path}: job: job file '{spec.job}' not found (relative to {path.parent} or the cwd)")
    job_raw = read_yaml(job_path) or {}
    base_raw = apply_overrides(copy.deepcopy(job_raw), spec.set, f"{path}: set")
    base = parse_spec(base_raw, f"{job_path} (with the `set:` of {path})")
    if spec.stage not in base.stages:
        raise SpecError(f"{path}: stage: '{spec.stage}' is not a stage of {job_path} "
                        f"(stages: {', '.join(base.stages)})")
    if base.stages[spec.stage].kind == "encode":
        raise SpecError(f"{path}: stage: '{spec.stage}' is an encode stage; a sweep trains a model stage")
    if local_path(base.ray.storage) is None:
        raise SpecError(f"{job_path}: ray.storage: {base.ray.storage} is a URI, but a sweep keeps its state (Tune's "
                        "experiment, the sweep's MLflow run id) in a directory; set ray.storage to a local "
                        "directory, on a mount every node shares (ray.shared_mounts) for a multi-node cluster")
    sweep = Sweep(spec, path, job_path, job_raw, base)
    pre = set(prerequisites(sweep))
    for key, dom in spec.search.space.items():
        for value in dom.examples():
            paths = list(value) if isinstance(value, dict) else [key]
            for p in paths:
                parts = p.split(".")
                if len(parts) > 1 and parts[0] == "stages" and parts[1] in pre:
                    raise SpecError(f"{path}: search.space.{key}: '{p}' belongs to stage '{parts[1]}', a "
                                    f"prerequisite of '{spec.stage}' that runs once from the base spec; "
                                    f"a sweep varies the stage it trains")
            try:
                sweep.trial_spec({key: value})
            except SpecError as exc:
                raise SpecError(f"{path}: search.space.{key} = {value!r} does not give a valid job:\n{exc}") from None
    steps = base.stages[spec.stage].train.steps
    if spec.scheduler.kind == "asha" and spec.scheduler.max_t is not None and spec.scheduler.max_t <= steps:
        raise SpecError(f"{path}: scheduler.max_t: {spec.scheduler.max_t} must exceed the stage's train.steps "
                        f"({steps}); ASHA stops a trial at max_t, before its evaluation")
    if spec.nll is not None and base.stages[spec.stage].kind != "diffusion":
        raise SpecError(f"{path}: nll: bits/dim is measured for diffusion stages, not "
                        f"'{base.stages[spec.stage].kind}'")
    return sweep
