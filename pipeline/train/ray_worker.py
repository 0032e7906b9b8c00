"""Ray Train plumbing: the per-worker entry point and the driver-side `fit_stage`.

The worker builds its task from plain data, streams its part of every global batch through Ray Data
(`pipeline.data.ray_data.worker_stream`), and runs the same
`train_loop` as the plain-process path, reporting metrics and checkpoints to Ray Train.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.train.loop import WorkerContext, batch_tensors, train_loop

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
    # A failing training function reaches the driver as an exception carrying its traceback; these two
    # loggers would print it a second (and third) time, after the driver's own one-line message.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _download(source: str, tracking_uri: str | None) -> str:
    import mlflow
    from pipeline.tracking.pyfunc import export_dir

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return str(export_dir(mlflow.artifacts.download_artifacts(artifact_uri=source)))


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
    if kind == "diffusion" and stage.get("conditioning") == "text":
        from pipeline.train.text_task import TextDiffusionTask

        return TextDiffusionTask(stage, num_classes=config["num_classes"], data=config["data_info"],
                                 text_encoder=config["text_encoder"])
    if kind == "diffusion":
        return tasks.DiffusionTask(stage, num_classes=config["num_classes"], data=config["data_info"])
    if kind == "distill":
        source = config["inputs"]["teacher"]
        if "checkpoint" in source:  # a previous halving's student, from Ray Train storage
            teacher_dir = str(Path(source["checkpoint"].to_directory()) / "export")
        else:  # a registered version (its MLflow model), from MLflow's artifact store
            teacher_dir = _download(source["uri"], config.get("tracking_uri"))
        teacher, meta = load_exported(teacher_dir)
        return tasks.DistillTask(stage, teacher, meta, teacher_timesteps=config["teacher_timesteps"])
    if kind == "superres":
        from pipeline.train.superres_task import SuperResTask

        return SuperResTask(stage, num_classes=config["num_classes"], data=config["data_info"],
                            text_encoder=config.get("text_encoder"))
    if kind == "controlnet":
        from pipeline.train.controlnet_task import ControlNetTask

        base, meta = load_exported(_download(config["inputs"]["base"]["uri"], config.get("tracking_uri")))
        return ControlNetTask(stage, base, meta)
    if kind == "consistency":
        from pipeline.train.consistency_task import build_consistency_task

        return build_consistency_task(config, _download)
    if kind == "prior":  # a PixelCNN over the codes of the frozen, registered VQ autoencoder
        from pipeline.train.prior_task import PriorTask

        vq, meta = load_exported(_download(config["inputs"]["autoencoder"]["uri"], config.get("tracking_uri")))
        return PriorTask(stage, vq, meta, num_classes=config["num_classes"], data=config["data_info"])
    if kind in ("clip", "clip_prior", "unclip_decoder"):  # unCLIP (eq. 49); the prior and decoder on a frozen CLIP
        from pipeline.train import unclip_task

        if kind == "clip":
            return unclip_task.ClipTask(stage, config["text_encoder"], in_channels=config["in_channels"])
        clip, meta = load_exported(_download(config["inputs"]["clip"]["uri"], config.get("tracking_uri")))
        task = unclip_task.ClipPriorTask if kind == "clip_prior" else unclip_task.ClipDecoderTask
        return task(stage, clip, meta, data=config["data_info"])
    raise ValueError(f"no training task for stage kind '{kind}'")


def _metric_logger(tracking_uri: str | None, run_id: str | None, step_offset: int = 0):
    """Log a worker's training metrics to the stage's run, `step_offset` added to each step (a distillation
    halving continues its run's curves after the previous halving's steps instead of restarting at 1)."""
    if not run_id:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step + step_offset) for k, v in metrics.items()])

    return log_metrics


def _reraise_data_error(exc: BaseException) -> None:
    """Raise the DataError behind a Ray Data failure as itself (Ray's wrappers keep only its text)."""
    import re
    import traceback

    from pipeline.config import user_error_root
    from pipeline.data import DataError

    root = user_error_root(exc, (DataError,))
    if root is not None:
        raise DataError(str(root)) from None
    text = "".join(traceback.format_exception(exc))
    m = re.search(r"^(?:[\w.]*\.)?DataError: (.+)$", text, re.MULTILINE)
    if m:
        raise DataError(m.group(1).strip()) from None


def worker_main(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer."""
    import ray.train as rt

    setup_worker_logging()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if config["stage"]["scale"]["gpus_per_worker"] == 0
                          else "cuda")
    import ray

    rctx = rt.get_context()
    rank, world = rctx.get_world_rank(), rctx.get_world_size()
    log.info("rank %d of %d on node %s (pid %d)", rank, world, ray.get_runtime_context().get_node_id(),
             os.getpid())
    task = build_task(config)
    train = config["stage"]["train"]
    micro = max(1, train["batch_size"] // world)
    spec = config["data"]  # a pipeline.data.stream.StreamSpec
    record = config.get("record_keys_to")  # tests: every batch's keys, to check the order (rank, batch, epoch, keys)

    def batches(start: int, count: int):
        from pipeline.data.ray_data import worker_stream

        try:
            for b, nb in worker_stream(spec, rank=rank, world=world, micro=micro, start=start, count=count):
                if record:
                    with open(Path(record) / f"rank{rank}.jsonl", "a") as f:
                        f.write(json.dumps({"batch": b, "epoch": [int(e) for e in nb["epoch"]],
                                            "keys": [str(k) for k in nb["key"]]}) + "\n")
                yield int(nb["epoch"][0]), batch_tensors(nb, ctx.skipped_keys, ctx.rank)
        except Exception as exc:
            _reraise_data_error(exc)
            raise

    def report(metrics: dict[str, float], ckpt_dir: str | None) -> None:
        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    ctx = WorkerContext(rank=rank, world_size=world, batches=batches, report=report, dataset_size=spec.size,
                        log_metrics=_metric_logger(config.get("tracking_uri"), config.get("run_id"),
                                                   config.get("step_offset", 0)))
    checkpoint = rt.get_checkpoint()
    if checkpoint is None:
        train_loop(task, train, config["stage"]["scale"], ctx, seed=config["seed"])
        return
    with checkpoint.as_directory() as resume_dir:
        ctx.resume_dir = resume_dir
        train_loop(task, train, config["stage"]["scale"], ctx, seed=config["seed"])


def _storage(storage_path: str) -> dict[str, Any]:
    """RunConfig's storage arguments: a local path made absolute, or a URI's filesystem (credentials and a custom
    endpoint as `pipeline.data.storage` finds them: `AWS_ENDPOINT_URL`, or `?endpoint_override=` in the URI)."""
    from pipeline.data import storage

    if not storage.is_uri(storage_path):
        return {"storage_path": str(Path(storage_path).resolve())}
    fs, path = storage.filesystem(storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


def fit_stage(config: dict[str, Any], *, run_name: str, storage_path: str):
    """Run one training stage on Ray Train; returns Ray's Result (checkpoint = final export).

    `config["data"]` (a `pipeline.data.stream.StreamSpec`) says what the workers read: each streams its own
    part of every global batch through Ray Data, in the order of `pipeline.data.stream` — not through
    Ray Train's dataset split, whose assignment of blocks to workers follows arrival order and cannot be
    resumed exactly (ray-project/ray issue 37633).

    Ray Train restarts the workers from the latest checkpoint after a worker failure, up to
    `scale.max_failures` times (-1: always), and resumes from storage when the same `run_name`
    and `storage_path` are used again (a re-run after the driver died).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Train's controller polls its workers every 2 s by default, so every stage waited on average a second at
    # each state change (start, the last report, shutdown); 0.5 s costs nothing and a user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
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
            **_storage(storage_path),
            failure_config=FailureConfig(max_failures=scale.get("max_failures", 1)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    return trainer.fit()
