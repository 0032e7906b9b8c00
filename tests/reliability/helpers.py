"""Helpers of the reliability tests: a tiny job file, CLI runners, shard corruption."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

#: A one-stage job: a small classifier on 8x8 digits; tests override fields with --set.
TINY_JOB = {
    "name": "rel",
    "seed": 0,
    "data": {"source": "shards", "dir": "SET-ME", "image_size": 8},
    "tracking": {"experiment": "rel"},
    "eval": {"classifier": None},
    "ray": {"num_cpus": 8},
    "stages": {
        "classifier": {
            "kind": "classifier",
            "model": {"name": "classifier", "args": {"in_channels": 1, "num_classes": 10, "model_channels": 8,
                                                     "channel_mult": [1, 2], "num_res_blocks": 1}},
            "scale": {"workers": 2, "cpus_per_worker": 1, "zero_stage": 1, "max_failures": 0},
            "train": {"steps": 12, "batch_size": 32, "lr": 2.0e-3, "checkpoint_every": 6, "log_every": 3},
            "register": {"name": "rel-classifier", "gate": {"metric": "eval/accuracy", "min": 0.0}},
        }
    },
}


def write_job(path: Path, data_dir: Path, **stage_overrides) -> Path:
    """Write TINY_JOB (data from `data_dir`) to `path`; `stage_overrides` replace stage sections."""
    job = yaml.safe_load(yaml.safe_dump(TINY_JOB))
    job["data"]["dir"] = str(data_dir)
    job["stages"]["classifier"].update(stage_overrides)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def ray_auth_disabled() -> None:
    """Make the next in-process `ray.init` run without token auth, in Ray's cached state as well as in os.environ.

    Ray 2.60 caches the auth mode per process (RayConfig, the token loader). A driver still in token mode from an
    earlier in-process cluster rejects its own raylet's calls ("Missing authorization header"); the raylet takes
    the driver for dead and Train's controller is cancelled before it runs ("The actor never ran").
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # a Ray without the helper: nothing cached to reset
        return
    reset_auth_token_state()


@contextmanager
def auth_disabled() -> Iterator[None]:
    """`ray_auth_disabled()` for the body; RAY_AUTH_MODE as it was afterwards."""
    saved = os.environ.get("RAY_AUTH_MODE")
    ray_auth_disabled()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@contextmanager
def local_ray(**init_kwargs: Any) -> Iterator[None]:
    """An in-process Ray without token auth (`ray.init(address="local", **init_kwargs)`), progress bars off;
    shut down and RAY_AUTH_MODE restored afterwards."""
    import ray

    with auth_disabled():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **init_kwargs)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield
        finally:
            ray.shutdown()


def corrupt_member(tar_path: Path, suffix: str = ".png", index: int = 0) -> str:
    """Overwrite the bytes of the `index`-th member ending in `suffix` with zeros (same size, so the
    manifest's byte count still matches); returns the member's name."""
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(suffix)]
    member = members[index]
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    return member.name


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a `pipeline` subprocess: no inherited tracking URI or Ray address."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def pipeline_cmd(*args: str) -> list[str]:
    """argv of `python -m pipeline ARGS` with this interpreter."""
    return [sys.executable, "-m", "pipeline", *args]


def run_pipeline(cwd: Path, *args: str, timeout: float = 600, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """Run `pipeline ARGS` in `cwd` (own session, so Ray's processes can be ended with it)."""
    return subprocess.run(pipeline_cmd(*args), cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def run_job(cwd: Path, job: str, overrides: list[str] = (), timeout: float = 1800, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run `pipeline run jobs/JOB --set O1 --set O2 ...` in `cwd` (a shipped job file, shrunk by `overrides`)."""
    sets = [a for item in overrides for a in ("--set", item)]
    return run_pipeline(cwd, "run", str(ROOT / "jobs" / job), *sets, timeout=timeout, env=env)


def run_log(cwd: Path) -> str:
    """The log file of the latest `pipeline run` in `cwd` (Ray's, DeepSpeed's and the workers' output)."""
    logs = sorted((cwd / ".pipeline" / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text() if logs else ""


def listing(path: Path) -> set[str]:
    """Every path under `path`, relative (to show that a failed command wrote nothing)."""
    return {str(p.relative_to(path)) for p in path.rglob("*")}


#: The untrained pixel U-Net of `register_untrained_ddpm` (8x8 grayscale, 10 classes, cosine T = 50).
TINY_UNET = {"in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [], "num_classes": 10}
TINY_DIFFUSION = {"schedule": "cosine", "timesteps": 50, "parameterization": "v", "loss": "simple",
                  "label_dropout": 0.2}


def register_untrained_ddpm(root: Path, name: str = "tiny-ddpm") -> str:
    """Export an untrained class-conditional diffusion U-Net (T = 50, 10 classes) and register it as
    `models:/NAME@champion` in a new SQLite store under `root`; returns the store's tracking URI.
    For commands whose argument checks need a registered model but not a good one."""
    import torch
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import tracking
    from pipeline.train.export import export_weights
    from pipeline.train.tasks import DiffusionTask

    task = DiffusionTask({"model": {"name": "unet", "args": TINY_UNET}, "diffusion": TINY_DIFFUSION},
                         num_classes=10, data={"latent_scale": 1.0, "sample_shape": [1, 8, 8]})
    torch.manual_seed(0)
    model_dir = export_weights(task.build_model().state_dict(), "unet", TINY_UNET, root / "exported",
                               task.export_extra())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        run = client.create_run(client.create_experiment("tiny", artifact_location=(root / "artifacts").as_uri()))
        ref = tracking.register(name, run.info.run_id, model_dir, {"pipeline.test": "1"})
        tracking.set_alias(name, "champion", ref.version)
        client.set_terminated(run.info.run_id, "FINISHED")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri


def error_lines(stderr: str) -> tuple[list[str], str]:
    """(the stderr lines that start with ``error:``, the last non-blank line)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return [ln for ln in lines if ln.startswith("error:")], (lines[-1] if lines else "")
