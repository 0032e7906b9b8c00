"""Ray Train plumbing: the per-worker entry point and the driver-side `fit_stage`.

The worker builds its task from plain data, streams its Ray Data shard, and runs the same
`train_loop` as the plain-process path, reporting metrics and checkpoints to Ray Train.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.train.loop import WorkerContext, train_loop

log = logging.getLogger("pipeline.train")


def setup_worker_logging() -> None:
    """Log lines from workers reach the driver's terminal through Ray's log forwarding."""
    root = logging.getLogger("pipeline")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _download(source: str, tracking_uri: str | None) -> str:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=source)


def build_task(config: dict[str, Any]):
    """The task of a stage, with its input models fetched from the registry's artifact store."""
    from pipeline.train import tasks
    from pipeline.train.export import load_exported

    stage = config["stage"]
    kind = stage["kind"]
    if kind == "autoencoder":
        return tasks.AutoencoderTask(stage)
    if kind == "classifier":
        return tasks.ClassifierTask(stage)
    if kind == "diffusion":
        return tasks.DiffusionTask(stage, num_classes=config["num_classes"], data=config["data_info"])
    if kind == "distill":
        source = config["inputs"]["teacher"]
        if "checkpoint" in source:  # a previous halving's student, from Ray Train storage
            teacher_dir = str(Path(source["checkpoint"].to_directory()) / "export")
        else:  # a registered version (runs:/... URI), from MLflow's artifact store
            teacher_dir = _download(source["uri"], config.get("tracking_uri"))
        teacher, meta = load_exported(teacher_dir)
        return tasks.DistillTask(stage, teacher, meta, teacher_timesteps=config["teacher_timesteps"])
    raise ValueError(f"no training task for stage kind '{kind}'")


def _metric_logger(tracking_uri: str | None, run_id: str | None):
    if not run_id:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    return log_metrics


def worker_main(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer."""
    import ray.train as rt

    setup_worker_logging()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if config["stage"]["scale"]["gpus_per_worker"] == 0
                          else "cuda")
    rctx = rt.get_context()
    rank, world = rctx.get_world_rank(), rctx.get_world_size()
    task = build_task(config)
    train = config["stage"]["train"]
    micro = max(1, train["batch_size"] // world)
    shard = rt.get_dataset_shard("train")

    def batches(epoch: int):
        for b in shard.iter_torch_batches(batch_size=micro, drop_last=True,
                                          dtypes={"image": torch.float32, "label": torch.int64}):
            yield {"image": b["image"], "label": b["label"]}

    def report(metrics: dict[str, float], ckpt_dir: str | None) -> None:
        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    ctx = WorkerContext(rank=rank, world_size=world, batches=batches, report=report,
                        log_metrics=_metric_logger(config.get("tracking_uri"), config.get("run_id")))
    checkpoint = rt.get_checkpoint()
    if checkpoint is None:
        train_loop(task, train, config["stage"]["scale"], ctx, seed=config["seed"],
                   cache_batches=config.get("cache_batches", True))
        return
    with checkpoint.as_directory() as resume_dir:
        ctx.resume_dir = resume_dir
        train_loop(task, train, config["stage"]["scale"], ctx, seed=config["seed"],
                   cache_batches=config.get("cache_batches", True))


def fit_stage(config: dict[str, Any], dataset, *, run_name: str, storage_path: str):
    """Run one training stage on Ray Train; returns Ray's Result (checkpoint = final export)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scale = config["stage"]["scale"]
    use_gpu = scale["gpus_per_worker"] > 0
    resources = {"CPU": scale["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = scale["gpus_per_worker"]
    callbacks = []
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if _in_tune_session():  # a Ray Tune trial: Train's reports reach Tune as intermediate results (ASHA)
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        worker_main,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=scale["workers"], use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()) if "://" not in storage_path else storage_path,
            failure_config=FailureConfig(max_failures=scale.get("max_failures", 1)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": dataset},
    )
    return trainer.fit()
