"""MLflow as the system of record: tracking URI, runs, registered versions and aliases.

Every registered version is an MLflow model (`pipeline.tracking.pyfunc`: mlflow.pyfunc loads and serves it)
around safetensors weights and a JSON recipe — no pickled Python objects. Downstream stages resolve
`models:/NAME@ALIAS`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_ARTIFACT = "model"


class TrackingError(Exception):
    """A registry or tracking-server problem, with a message meant for the user."""


def tracking_uri(configured: str | None = None) -> str:
    """$MLFLOW_TRACKING_URI wins, then the spec, then an embedded SQLite store in the cwd."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return uri


def redact(uri: str) -> str:
    """A URI with any password removed (safe for logs, params and tags)."""
    return re.sub(r"(//[^:/@]+):[^@/]+@", r"\1:***@", uri)


def code_version() -> str:
    """The git commit of the code, or the package version outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from pipeline import __version__

    return __version__


def git_commit() -> str | None:
    """The full git commit of the code, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own run tags for what started the run (the UI's Source, User and Version columns)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = os.environ.get("USER", "unknown")
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "mlflow.user": user}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


@contextmanager
def system_metrics(run_id: str, interval_s: float = 5.0) -> Iterator[None]:
    """Log this machine's CPU, memory, disk and network use (and GPU where MLflow can read it) to the run as
    `system/*` every `interval_s` seconds while the block runs (MLflow's system-metrics monitor)."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines, every stage
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_dataset(run_id: str, uri: str, *, name: str, digest: str, split: str, num_samples: int,
                context: str) -> None:
    """Record a split a run reads as an MLflow dataset input (the UI's Datasets column): where it is, the
    manifest's digest, the split and its sample count; `context` is "train" or "eval"."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    ds = Dataset(name=name, digest=digest[:16], source_type=uri.split("://")[0] if "://" in uri else "local",
                 source=json.dumps({"uri": uri}), profile=json.dumps({"split": split, "num_samples": num_samples}))
    MlflowClient().log_inputs(run_id, [DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


def training_experiment(name: str) -> str:
    """Create or reuse experiment `name`, marked as model training so MLflow 3's UI opens it in that view
    (not its GenAI view); returns its ID."""
    from mlflow.tracking import MlflowClient

    import mlflow

    exp_id = mlflow.set_experiment(name).experiment_id
    MlflowClient().set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


def ui_links(uri: str, experiment_id: str) -> list[str]:
    """Where a job's results are in the MLflow UI's model-training view: its runs, its models, the registry."""
    if uri.startswith(("http://", "https://")):  # the server itself, without credentials
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        base, lines = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}", []
        base = base.rstrip("/")
    else:  # a local store: the UI is a command away
        base = "http://127.0.0.1:5000"
        lines = [f"browse with `mlflow ui --backend-store-uri {redact(uri)} --port 5000`, then open"]
    view = "?workflowType=machine_learning"
    return lines + [f"  runs:     {base}/#/experiments/{experiment_id}/runs{view}",
                    f"  models:   {base}/#/experiments/{experiment_id}/models{view}",
                    f"  registry: {base}/#/models{view}"]


def connect(uri: str, timeout_s: float = 15.0) -> None:
    """Point MLflow at `uri` and fail fast (not hang) when a server does not answer."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means "unreachable/unauthorised"
            raise TrackingError(
                f"cannot reach the MLflow server at {redact(uri)} ({type(exc).__name__}: "
                f"{redact(str(exc).splitlines()[0][:200])}); start it (mlflow/start-server.sh) or unset "
                "MLFLOW_TRACKING_URI to use the embedded store"
            ) from None


@dataclass
class ModelRef:
    """A registered model version."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` → (name, alias, version)."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))", uri)
    if not m:
        raise TrackingError(f"'{uri}' is not a model URI; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group(1), m.group(2), m.group(3)


def resolve(uri: str) -> ModelRef:
    """Resolve a model URI to the exact version it names now."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_model_uri(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        known = ""
        try:
            rm = client.get_registered_model(name)
            known = (f"; its aliases are: {', '.join(sorted(rm.aliases)) or '(none)'} — use one of them or "
                     f"a version number (models:/{name}/N)")
        except MlflowException:
            known = (f"; no registered model is named '{name}' in {redact(client.tracking_uri)} — check the name "
                     "and the tracking URI, or run the job that registers it")
        raise TrackingError(f"{uri}: not found ({str(exc).splitlines()[0][:120]}){known}") from None
    return ModelRef(name, str(mv.version), mv.source, mv.run_id, dict(mv.tags))


def download(ref: ModelRef, dst: str | None = None) -> str:
    """Fetch a version to a local directory; returns the folder of its model.json and model.safetensors."""
    import mlflow
    from pipeline.tracking.pyfunc import export_dir

    return str(export_dir(mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=dst)))


def register(name: str, run_id: str, export: str | Path, tags: dict[str, str],
             image_chw: tuple[int, int, int] | None = None) -> ModelRef:
    """Log `export` as the run's MLflow model (`pipeline.tracking.pyfunc`) and register it as a new version.

    `image_chw` is the shape of the stage's data images, for the signature's input example."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.pyfunc import log_model

    info = log_model(run_id, export, name=name, image_chw=image_chw)
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already exists
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                     tags={k: str(v) for k, v in tags.items()})
    return ModelRef(name, str(mv.version), mv.source, run_id, dict(mv.tags))


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `models:/name@alias` at `version`."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


def find_alias(name: str, alias: str) -> ModelRef | None:
    """The version an alias points to, or None when the model or alias does not exist."""
    try:
        return resolve(f"models:/{name}@{alias}")
    except TrackingError:
        return None


def log_params_flat(run_id: str, params: dict[str, Any]) -> None:
    """Log many params at once (values stringified and truncated to MLflow's limit)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


# ----------------------------------------------------------------------------- registry: sweeps, promotion, lineage


@dataclass
class Gate:
    """The metric a registered model is judged on, and which way is better."""

    metric: str
    higher_is_better: bool
    min: float | None = None
    max: float | None = None

    @classmethod
    def from_bounds(cls, metric: str, min: float | None = None, max: float | None = None) -> Gate:  # noqa: A002
        """A stage's gate: a `min` bound makes the metric "higher is better", a `max` bound "lower is better"."""
        return cls(metric=metric, higher_is_better=min is not None, min=min, max=max)

    def within_bounds(self, value: float | None) -> bool:
        """True when `value` is a number inside the gate's bounds."""
        if value is None or value != value:
            return False
        if self.max is not None and value > self.max:
            return False
        return not (self.min is not None and value < self.min)

    def better(self, a: float, b: float) -> bool:
        """True when `a` is strictly better than `b`."""
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class Verdict:
    """The promotion rule's answer: move the alias or not, whether `force` decided it, and why."""

    promoted: bool
    forced: bool
    reason: str


def judge(gate: Gate | None, value: float | None, held: float | None, *, holder: str | None,
          force: bool = False) -> Verdict:
    """The promotion rule of `pipeline promote` and of a job's stages (one rule for both).

    A candidate with metric `value` takes the alias from `holder` (e.g. "champion v3", None when the
    alias points nowhere; `held` is its value) when it is inside the gate's bounds and not worse than
    `held` (a tie promotes: no regression). `force` skips the comparison, never the bounds; a holder
    without a comparable value (missing or NaN) does not block. Without a gate only `force` promotes.
    """
    if gate is None:
        if force:
            return Verdict(True, True, "forced (no gate is known)")
        return Verdict(False, False, "no gate is known (its run has no registry.gate params); use --force to "
                                     "promote anyway")
    m = gate.metric
    if value is None:
        return Verdict(False, False, f"{m} was not logged by the candidate's run (check the gate's metric name)")
    if not gate.within_bounds(value):
        note = " (force skips only the comparison, not the bounds)" if force else ""
        return Verdict(False, False, f"{m}={value} is outside the gate bounds (min={gate.min}, max={gate.max})"
                                     f"{note}")
    if holder is None:
        return Verdict(True, False, f"{m}={value:.6g} passes the gate and there is no current holder")
    if held is None or held != held:
        return Verdict(True, False, f"{m}={value:.6g} passes the gate; {holder} has no {m} value to compare")
    way = "higher" if gate.higher_is_better else "lower"
    if gate.better(held, value):
        worse = f"{m}={value:.6g} is worse than {holder} ({held:.6g}; {way} is better)"
        return Verdict(True, True, f"forced: {worse}") if force else Verdict(False, False, worse)
    return Verdict(True, False, f"{m}={value:.6g} is not worse than {holder} ({held:.6g}; {way} is better)")


def gate_of(ref: ModelRef) -> Gate | None:
    """The gate of the stage that produced `ref`, read from its run's params (`registry.gate.*`)."""
    from mlflow.tracking import MlflowClient

    if not ref.run_id:
        return None
    params = MlflowClient().get_run(ref.run_id).data.params

    def num(key: str) -> float | None:
        v = params.get(key)
        return None if v in (None, "None", "") else float(v)

    metric = params.get("registry.gate.metric")
    if not metric or metric == "None":
        return None
    return Gate.from_bounds(metric, num("registry.gate.min"), num("registry.gate.max"))


def run_metric(ref: ModelRef, metric: str) -> float | None:
    """The (last) value of `metric` on the run that produced a registered version."""
    from mlflow.tracking import MlflowClient

    if not ref.run_id:
        return None
    return MlflowClient().get_run(ref.run_id).data.metrics.get(metric)


@dataclass
class Promotion:
    """The outcome of `promote`: whether the alias moved, and why."""

    name: str
    alias: str
    candidate: ModelRef
    previous: ModelRef | None
    promoted: bool
    forced: bool
    reason: str
    metric: str | None = None
    candidate_value: float | None = None
    previous_value: float | None = None
    gate: Gate | None = None


def promote(name: str, to: str = "champion", from_: str = "candidate", *, force: bool = False,
            gate: Gate | None = None) -> Promotion:
    """Move `models:/name@to` to the version `from_` names, when `judge` says so.

    `from_` is an alias or a version number. The values are read from the versions' runs; the gate
    defaults to the one the candidate's stage was run with. A promotion is recorded on the version as
    tags `pipeline.promotion.<to>.*` (`forced` is "true" when `force` overrode a worse comparison).
    """
    from mlflow.tracking import MlflowClient

    cand = resolve(f"models:/{name}/{from_}" if from_.isdigit() else f"models:/{name}@{from_}")
    prev = find_alias(name, to)
    gate = gate or gate_of(cand)
    metric = gate.metric if gate else None
    cv = run_metric(cand, metric) if metric else None
    pv = run_metric(prev, metric) if (metric and prev) else None
    result = Promotion(name, to, cand, prev, False, False, "", metric, cv, pv, gate)
    if prev is not None and prev.version == cand.version:
        result.reason = f"v{cand.version} already holds @{to}"
        return result
    verdict = judge(gate, cv, pv, holder=f"{to} v{prev.version}" if prev else None, force=force)
    result.promoted, result.forced, result.reason = verdict.promoted, verdict.forced, verdict.reason
    if result.promoted:
        client = MlflowClient()
        for k, v in {f"pipeline.promotion.{to}.forced": str(verdict.forced).lower(),
                     f"pipeline.promotion.{to}.previous": prev.uri if prev else "",
                     f"pipeline.promotion.{to}.reason": result.reason[:500]}.items():
            client.set_model_version_tag(name, cand.version, k, v)
        set_alias(name, to, cand.version)
    return result


def _link(ref: ModelRef) -> str:
    """A Markdown link to the version's page in the MLflow UI."""
    return f"[{ref.name} v{ref.version}](#/models/{ref.name}/versions/{ref.version})"


def _bounds(gate: Gate) -> str:
    parts = [f"≥ {gate.min:g}"] if gate.min is not None else []
    parts += [f"≤ {gate.max:g}"] if gate.max is not None else []
    return " and ".join(parts) or "(no bounds)"


def describe_version(ref: ModelRef, *, what: str, job: str, stage: str, inputs: dict[str, ModelRef],
                     promotion: Promotion, evaluator: ModelRef | None, sampled: bool) -> str:
    """The Markdown description of a registered version: what it is, where it came from, how it was judged
    (the gate's metric, bounds and this version's value) and how to use it."""
    lines = [f"**{ref.name} v{ref.version}**: {what}, trained by stage `{stage}` of job `{job}`.", ""]
    if inputs:
        lines.append("- Inputs: " + ", ".join(f"{role} = {_link(r)}" for role, r in sorted(inputs.items())))
    if promotion.gate is not None:
        value = "none" if promotion.candidate_value is None else f"{promotion.candidate_value:.6g}"
        outcome = "promoted to champion" if promotion.promoted else f"not promoted: {promotion.reason}"
        lines.append(f"- Gate: `{promotion.gate.metric}` {_bounds(promotion.gate)}; this version: {value} ({outcome})")
    if evaluator is not None:
        lines.append(f"- Class accuracy, FID and KID computed with the classifier {_link(evaluator)}")
    lines += ["", *usage(f"models:/{ref.name}/{ref.version}", sampled)]
    return "\n".join(lines)


def usage(uri: str, sampled: bool) -> list[str]:
    """"How to use" lines (Markdown) for the registered model at `uri`."""
    lines = ["How to use:", "", f"    pipeline lineage {uri}"]
    if sampled:
        lines.append(f"    pipeline sample {uri} --out grid.png")
    return [*lines, "    # in Python: an MLflow model (its signature says what predict takes)",
            f'    mlflow.pyfunc.load_model("{uri}").predict(...)']


def set_descriptions(ref: ModelRef, version_text: str, model_text: str) -> None:
    """Write the version's description, and the registered model's (what it is, how to use its champion)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.update_model_version(ref.name, ref.version, description=version_text)
    client.update_registered_model(ref.name, description=model_text)


@dataclass
class LineageNode:
    """One registered version in a lineage chain, with the versions it was made from."""

    ref: ModelRef
    role: str
    inputs: list[LineageNode]

    @property
    def data_sha256(self) -> str | None:
        return self.ref.tags.get("pipeline.data_manifest_sha256")


def lineage(uri: str, role: str = "", _seen: set[str] | None = None) -> LineageNode:
    """The chain of registered versions behind `uri`, back to the data (via `pipeline.input.*` tags)."""
    seen = _seen if _seen is not None else set()
    ref = resolve(uri)
    node = LineageNode(ref, role, [])
    if ref.uri in seen:  # a cycle cannot come from the stage runner, but never loop on bad tags
        return node
    seen.add(ref.uri)
    for key, value in sorted(ref.tags.items()):
        if key.startswith("pipeline.input.") and value.startswith("models:/"):
            node.inputs.append(lineage(value, key.removeprefix("pipeline.input."), seen))
    return node


def format_lineage(node: LineageNode, indent: str = "") -> list[str]:
    """Lines of a lineage tree: each version with its run, spec hash, code version and data."""
    t = node.ref.tags
    head = f"{node.role}: " if node.role else ""
    line = (f"{indent}{head}{node.ref.uri}  run={node.ref.run_id}  "
            f"spec={t.get('pipeline.spec_sha256', '?')}  code={t.get('pipeline.code_version', '?')}")
    if "pipeline.sweep_run_id" in t:
        line += f"  sweep={t['pipeline.sweep_run_id']} trial={t.get('pipeline.trial_id', '?')}"
    lines = [line]
    child = indent + "    "
    for inp in node.inputs:
        lines += format_lineage(inp, child)
    if node.data_sha256:
        lines.append(f"{child}data: manifest sha256 {node.data_sha256}")
    return lines
