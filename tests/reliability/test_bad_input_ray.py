"""A user error raised inside a Ray Train worker (a corrupt tar member read by a Ray Data task there)
reaches the user as one clean message with exit code 2, and nothing is registered."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipeline.data.shards import read_manifest
from tests.reliability.helpers import corrupt_member, run_pipeline, write_job

pytestmark = pytest.mark.slow


def test_corrupt_member_in_a_training_worker_is_one_clean_error(tmp_path: Path, digits8: Path) -> None:
    data = tmp_path / "digits"
    shutil.copytree(digits8, data)
    shard = data / read_manifest(data).splits["train"].shards[1].name
    member = corrupt_member(shard, index=5)
    job = write_job(tmp_path / "job.yaml", data)

    out = run_pipeline(tmp_path, "run", str(job), timeout=600)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    err_lines = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err_lines) == 1 and lines[-1] == err_lines[0], out.stderr[-3000:]  # one message, the last line
    # the driver did not crash: no traceback through the pipeline's own driver code (lines Ray itself
    # logged from its workers, e.g. a slow-machine warning, may precede the message)
    assert 'pipeline/cli.py", line' not in out.stdout + out.stderr, out.stderr[-3000:]
    err = err_lines[0]
    assert err.startswith(f"error: stage 'classifier': corrupt member {member} in shard {shard}: ")
    assert err.endswith("— set data.on_corrupt=skip to skip and count such samples, or rebuild the shards "
                        "(`pipeline data build`)")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []  # nothing half-registered
    runs = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    assert {r.data.tags.get("pipeline.stage", "(job)"): r.info.status for r in runs} == {
        "(job)": "FAILED", "classifier": "FAILED"}


# ------------------------------------------------------------------ errors raised by real Ray workers
# The CLI unwraps what Ray really raises (Ray Train's WorkerGroupError, Ray Data's task errors) to the
# user error inside, and keeps the traceback of anything else. One in-process Ray, tiny one-worker jobs.


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory, digits8: Path):
    """In-process Ray started the way `pipeline run` starts it (`init_ray` of the tiny job: 8 logical CPUs)."""
    import ray

    from pipeline.config import load_spec
    from pipeline.stages import init_ray

    init_ray(load_spec(write_job(tmp_path_factory.mktemp("ray-job") / "job.yaml", digits8)))
    yield ray
    ray.shutdown()


def _fit_error(train_fn, storage: Path) -> BaseException:
    """What a one-worker TorchTrainer running `train_fn` raises on the driver."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="bad", storage_path=str(storage),
                                                failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(Exception) as info:
        trainer.fit()
    return info.value


def test_gpu_less_train_worker_is_one_clean_error_and_a_bug_is_not(local_ray, tmp_path: Path) -> None:
    """A Ray Train worker asked for a GPU it does not have (device_for, as a stage's worker calls it): the
    driver gets Ray's wrapper, and the CLI finds the worker's ClusterError inside; a worker's RuntimeError
    (a bug) is not taken for a user error, so its traceback stays."""
    import torch

    from pipeline.cli import _user_error
    from pipeline.config import ClusterError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    def wants_a_gpu() -> None:
        from pipeline.train.engine import device_for

        device_for(1.0)

    def has_a_bug() -> None:
        raise RuntimeError("a bug in the training loop")

    exc = _fit_error(wants_a_gpu, tmp_path / "gpu")
    assert not isinstance(exc, ClusterError)  # Ray's wrapper, not the worker's error itself
    root = _user_error(exc)
    assert isinstance(root, ClusterError), repr(exc)
    assert re.fullmatch(r"the spec asks for GPUs \(scale\.gpus_per_worker=1\) but this worker's machine \(.+\) "
                        r"has none that torch can use; set scale\.gpus_per_worker=0 to train on CPU", str(root))
    bug = _fit_error(has_a_bug, tmp_path / "bug")
    assert "a bug in the training loop" in str(bug) and _user_error(bug) is None


def test_data_error_in_a_ray_data_task_is_unwrapped(local_ray) -> None:
    """A DataError raised inside a Ray Data map task (as `decode_sample` raises it in the stream data path)
    reaches the driver wrapped by Ray; the CLI finds the original and prints its message."""
    from pipeline.cli import _user_error
    from pipeline.config import user_message
    from pipeline.data import DataError

    def decode(batch: dict) -> dict:
        from pipeline.data import DataError

        if 3 in batch["id"]:
            raise DataError("corrupt member 0003.png in shard train-000000.tar: broken PNG")
        return batch

    with pytest.raises(Exception) as info:
        local_ray.data.range(8, override_num_blocks=2).map_batches(decode, batch_size=4).take_all()
    assert info.value is not None
    root = _user_error(info.value)
    assert isinstance(root, DataError), repr(info.value)
    assert user_message(root) == "corrupt member 0003.png in shard train-000000.tar: broken PNG"  # one line
