"""One rank of a plain multi-process (no Ray) run of `train_loop` with gloo, for test_distributed.py.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.reliability.dist_worker PLAN.json

PLAN.json: {"data": DIR, "out": DIR, "stage": {...}, "train": {...}, "runs": [{"name", "zero_stage",
"resume": DIR|null}]}. Each run trains from scratch or resumes; rank 0 writes OUT/NAME.json with the
loss it logged at every step; checkpoints go to OUT/NAME/step-N (every rank adds its own files).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def shards(data_dir: str):
    """The training split's stream (the order every worker count reads it in)."""
    from pipeline.data.stream import spec_for

    return spec_for(data_dir, "train", seed=0)


def main(plan_path: str) -> None:
    from pipeline.train.loop import WorkerContext, shard_stream, train_loop
    from pipeline.train.tasks import ClassifierTask

    plan = json.loads(Path(plan_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = shards(plan["data"])
    micro = plan["train"]["batch_size"] // world
    out = Path(plan["out"])
    for run in plan["runs"]:
        losses: dict[int, float] = {}
        root = out / run["name"]

        def report(metrics: dict[str, float], ckpt: str | None, root: Path = root) -> None:
            if ckpt:
                shutil.copytree(ckpt, root / f"step-{int(metrics['step']):08d}", dirs_exist_ok=True)
            dist.barrier()

        stream = shard_stream(spec, rank=rank, world=world, micro=micro)
        ctx = WorkerContext(rank=rank, world_size=world, batches=stream, report=report, resume_dir=run.get("resume"),
                            log_metrics=lambda m, s, losses=losses: losses.__setitem__(s, m["train/loss"]))
        scale = {"workers": world, "gpus_per_worker": 0, "zero_stage": run["zero_stage"], "precision": "fp32"}
        train_loop(ClassifierTask(plan["stage"]), plan["train"], scale, ctx, seed=0)
        if rank == 0:
            (out / f"{run['name']}.json").write_text(json.dumps(losses))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    main(sys.argv[1])
