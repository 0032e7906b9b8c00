"""The local autoscaling Ray cluster scales up for a worker-only resource and back down."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from tests.infra.autoscale import autoscaling_cluster

pytestmark = pytest.mark.slow


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def test_scales_up_for_worker_resource_and_down_when_idle() -> None:
    import ray

    token_file = Path.home() / ".ray" / "auth_token"
    token_existed = token_file.exists()
    t0 = time.monotonic()
    with autoscaling_cluster(idle_timeout_minutes=0.1) as cluster:
        leader = psutil.Process(cluster.pid)
        assert os.environ["RAY_AUTH_MODE"] == "token"
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        assert len(_alive_nodes()) == 1, "only the head should run before any demand"
        assert ray.cluster_resources().get("train_slot", 0) == 0
        # one node, but an autoscaler that may add more: the pipeline counts it as a multi-node cluster
        # (`check_shared_storage`); a head started by hand is not one (test_shared_storage.py)
        from pipeline.stages import cluster_shape

        deadline = time.monotonic() + 60  # the monitor writes its first status within a few update intervals
        while cluster_shape() != (1, True) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster_shape() == (1, True)

        @ray.remote(num_cpus=1, resources={"train_slot": 1})
        def where(i: int) -> tuple[int, str]:
            time.sleep(1.0)
            return i, ray.get_runtime_context().get_node_id()

        results = ray.get([where.remote(i) for i in range(2)], timeout=60)
        assert sorted(i for i, _ in results) == [0, 1]
        head_id = next(n["NodeID"] for n in _alive_nodes() if n["Resources"].get("node:__internal_head__"))
        assert all(node != head_id for _, node in results), "tasks must run on autoscaled workers"
        peak = len(_alive_nodes())
        assert peak >= 2, f"expected worker nodes to be added, saw {peak} alive node(s)"
        t_up = time.monotonic() - t0

        deadline = time.monotonic() + 45
        while len(_alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        remaining = _alive_nodes()
        assert len(remaining) == 1, f"idle workers not removed: {len(remaining)} nodes alive\n{cluster.log_tail()}"
        t_down = time.monotonic() - t0
        group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == cluster.pid]
        assert group, "the cluster's processes should share the leader's process group"

    # Everything the helper started is gone, and the user's default token was not touched.
    assert not leader.is_running() or leader.status() == psutil.STATUS_ZOMBIE
    assert not [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == cluster.pid]
    assert not cluster.temp_dir.exists()
    assert token_file.exists() == token_existed
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ or os.environ["RAY_AUTH_TOKEN_PATH"] != str(
        cluster.temp_dir / "auth_token"
    )
    print(f"scaled up by {t_up:.1f}s, back to 1 node by {t_down:.1f}s")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
