"""Autoscaling, shown locally: a training stage that asks for more than the head offers makes the
autoscaler add worker nodes (real raylets of Ray's fake multi-node provider), runs with one worker on
each added node, completes, and the idle nodes are removed afterwards.

The head has 1 CPU; each training worker asks for 2 (`scale.cpus_per_worker=2`, 2 workers) and each
added node offers 2, so the two workers can only run on two new, different nodes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.infra.autoscale import autoscaling_cluster
from tests.reliability.helpers import ROOT, clean_env, run_log, run_pipeline, write_job

pytestmark = pytest.mark.slow

WORKER_TYPES = {"ray.worker.cpu2": {"resources": {"CPU": 2, "object_store_memory": 100 * 1024**2},
                                    "min_workers": 0, "max_workers": 2}}


def _alive() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def test_stage_scales_the_cluster_up_and_back_down(tmp_path: Path, digits8: Path,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    import ray

    job = write_job(tmp_path / "job.yaml", digits8,
                    scale={"workers": 2, "cpus_per_worker": 2, "zero_stage": 1, "max_failures": 0})
    with autoscaling_cluster(WORKER_TYPES, head_cpus=1, idle_timeout_minutes=0.1,
                             extra_env={"PYTHONPATH": str(ROOT)}) as cluster:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        head = next(n["NodeID"] for n in _alive() if n["Resources"].get("node:__internal_head__"))
        assert len(_alive()) == 1 and ray.cluster_resources()["CPU"] == 1.0

        # RAY_DEDUP_LOGS=0: Ray folds log lines that differ only in numbers/ids ("[repeated 2x across
        # cluster]"), which can swallow one of the two "rank N of 2 on node X" lines this test reads
        env = clean_env(**cluster.env, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", RAY_DEDUP_LOGS="0")
        t0 = time.monotonic()
        # the fake nodes share this machine's disk: the job's data, checkpoints and MLflow store (all under the
        # tests' temp directory) are on a mount every node sees, which the cluster check requires declared
        shared = f"--set=ray.shared_mounts=[{tmp_path_factory.getbasetemp()}]"
        out = run_pipeline(tmp_path, "run", str(job), shared, env=env, timeout=900)
        text = out.stdout + out.stderr + run_log(tmp_path)  # the workers' lines are in the run's log file
        assert out.returncode == 0, text[-4000:] + "\n" + cluster.log_tail()
        assert "[classifier] registered rel-classifier v1 → champion" in text
        t_run = time.monotonic() - t0

        placed = dict(re.findall(r"rank (\d) of 2 on node ([0-9a-f]+)", text))
        assert set(placed) == {"0", "1"}, text[-4000:]
        assert placed["0"] != placed["1"], "the two workers must sit on different nodes"
        known = {n["NodeID"]: n for n in ray.nodes()}
        for node in placed.values():
            assert node in known and node != head, "workers run on nodes the autoscaler added"

        deadline = time.monotonic() + 180
        while len(_alive()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        actors = [(a.get("ActorClassName"), a.get("Address", {}).get("NodeID"), a.get("State"))
                  for a in ray._private.state.actors().values() if a.get("State") == "ALIVE"]
        assert [n["NodeID"] for n in _alive()] == [head], (f"idle workers were not removed; live actors: {actors}\n"
                                                           + cluster.log_tail(1500))
        print(f"stage ran in {t_run:.0f} s; back to the head alone {time.monotonic() - t0 - t_run:.0f} s later")
