"""MLflow as the system of record: tracking URI, runs, registered versions and aliases.

Models are registered from run artifacts (`runs:/<run>/model`) holding safetensors weights and a
JSON recipe — no pickled Python objects. Downstream stages resolve `models:/NAME@ALIAS`.
"""

from __future__ import annotations

import os
import re
import subprocess
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
                f"{str(exc).splitlines()[0][:200]}); start it (mlflow/start-server.sh) or unset "
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
            known = f"; its aliases are: {', '.join(sorted(rm.aliases)) or '(none)'}"
        except MlflowException:
            known = "; no registered model has that name"
        raise TrackingError(f"{uri}: not found ({str(exc).splitlines()[0][:120]}){known}") from None
    return ModelRef(name, str(mv.version), mv.source, mv.run_id, dict(mv.tags))


def download(ref: ModelRef, dst: str | None = None) -> str:
    """Fetch a version's artifacts to a local directory."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=dst)


def register(name: str, run_id: str, local_dir: str | Path, tags: dict[str, str]) -> ModelRef:
    """Log `local_dir` as the run's model artifact and register it as a new version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.log_artifacts(run_id, str(local_dir), MODEL_ARTIFACT)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already exists
    mv = client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id,
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
