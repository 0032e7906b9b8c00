"""A local autoscaling Ray cluster for tests, started the way DESIGN.md describes.

Ray 2.60's ``ray.cluster_utils.AutoscalingCluster`` cannot start (its base config is
not in the wheel) and runs ``ray stop --force``, which ends every Ray process on the
machine. This helper starts the same fake multi-node cluster directly::

    RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 \\
        ray start --head --block --autoscaling-config=CONFIG.json ...

in its own process group and, on exit, ends exactly that group (the head, its
autoscaler monitor and the worker "nodes" the monitor started are all in it).

Isolation from anything else running on the machine:

- the GCS listens on a free port (the fake provider's ``gcs_address`` tells the worker
  raylets where it is), not on 6379;
- Ray's files go to a fresh temp dir, not ``/tmp/ray``;
- token authentication is on with a fresh token kept in that temp dir
  (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``): ``~/.ray/auth_token`` is neither
  read nor written.

Usage::

    with autoscaling_cluster() as cluster:
        ray.init(address=cluster.address)   # os.environ carries the token settings
        ...
        ray.shutdown()

    # or in a subprocess:  subprocess.run([...], env={**os.environ, **cluster.env})
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Worker node types used when none are given: a "training" node that offers a custom
#: resource the head does not have, so tasks asking for it force a scale-up.
DEFAULT_WORKER_TYPES: dict[str, dict[str, Any]] = {
    "ray.worker.train": {
        "resources": {"CPU": 2, "train_slot": 1, "object_store_memory": 100 * 1024**2},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    }
}

HEAD_NODE_TYPE = "ray.head.default"
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@dataclass(frozen=True)
class LocalAutoscalingCluster:
    """What a running :func:`autoscaling_cluster` offers to its users."""

    address: str
    """GCS address ``ip:port``, for ``ray.init(address=...)``."""
    env: dict[str, str]
    """Environment a driver (in-process or subprocess) needs to reach the cluster:
    ``RAY_ADDRESS``, ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``."""
    temp_dir: Path
    """Ray's temp/session dir root for this cluster (logs under ``session_latest/logs``)."""
    log_path: Path
    """stdout+stderr of the ``ray start`` process."""
    dashboard_url: str | None = None
    """``http://127.0.0.1:PORT`` when started with ``include_dashboard=True``."""
    pid: int = field(default=0)
    """Process id (= process group id) of ``ray start``."""

    def log_tail(self, n_chars: int = 4000) -> str:
        """The last characters of the ``ray start`` output and the monitor log."""
        return _log_tail(self.log_path, self.temp_dir, n_chars)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _node_ip() -> str:
    """The IP Ray's fake worker nodes will pick for themselves (they are not told one)."""
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


def _log_tail(log_path: Path, temp_dir: Path, n_chars: int) -> str:
    parts = []
    for path in [log_path, temp_dir / "session_latest" / "logs" / "monitor.log"]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {path} ---\n{text[-n_chars:]}")
    return "\n".join(parts) or "(no log written)"


def make_autoscaling_config(
    worker_types: Mapping[str, Mapping[str, Any]],
    gcs_address: str,
    idle_timeout_minutes: float,
    head_resources: Mapping[str, float],
) -> dict[str, Any]:
    """The ``fake_multinode`` autoscaling config (the keys Ray's schema requires)."""
    node_types: dict[str, Any] = {
        HEAD_NODE_TYPE: {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    }
    for name, spec in worker_types.items():
        node_types[name] = {"node_config": {}, **spec}
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": node_types,
        "head_node_type": HEAD_NODE_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _wait_ready(
    proc: subprocess.Popen[bytes], log_path: Path, temp_dir: Path, host: str, port: int, timeout_s: float
) -> None:
    """Block until ``ray start`` reports the runtime up and the GCS port accepts connections."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"`ray start --head` exited with code {proc.returncode} before the cluster was ready.\n"
                + _log_tail(log_path, temp_dir, 4000)
            )
        started = "Ray runtime started" in log_path.read_text(errors="replace")
        if started:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError:
                pass
        time.sleep(0.25)
    raise TimeoutError(
        f"local autoscaling Ray cluster not ready after {timeout_s:.0f} s.\n" + _log_tail(log_path, temp_dir, 4000)
    )


def _terminate_group(proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    """End the process group led by ``proc`` (SIGTERM, then SIGKILL), and nothing else.

    Descendants are listed before anything is signalled so that a process which left the
    group (or was re-parented when its parent died first) is still ended by its pid.
    The grace period is short on purpose: ``ray start --block`` catches SIGTERM and its
    graceful shutdown of GCS, raylets and the monitor takes ~20 s; a throwaway test
    cluster gains nothing from it.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(descendants, timeout=0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.wait(timeout=5)


def _reset_ray_auth_cache() -> None:
    """Make this process re-read ``RAY_AUTH_*`` (Ray caches the mode and the token)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # noqa: BLE001 - best effort; private API may move
        pass


@contextmanager
def autoscaling_cluster(
    worker_types: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    head_cpus: int = 1,
    head_resources: Mapping[str, float] | None = None,
    idle_timeout_minutes: float = 0.2,
    include_dashboard: bool = False,
    apply_env: bool = True,
    start_timeout_s: float = 180.0,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[LocalAutoscalingCluster]:
    """Start a local autoscaling Ray cluster (fake multi-node provider); end it on exit.

    Args:
        worker_types: ``available_node_types`` entries for the workers, e.g.
            ``{"ray.worker.train": {"resources": {"CPU": 2, "train_slot": 1},
            "min_workers": 0, "max_workers": 2}}``. Default: :data:`DEFAULT_WORKER_TYPES`.
        head_cpus: ``--num-cpus`` of the head (keep small so work lands on workers).
        head_resources: extra custom resources of the head (``--resources``).
        idle_timeout_minutes: how long an idle worker lives before the autoscaler removes it.
        include_dashboard: start the dashboard on 127.0.0.1 (a free port) for job submission.
        apply_env: also set ``cluster.env`` in ``os.environ`` while the cluster runs (so
            ``ray.init(address=cluster.address)`` in this process authenticates); the
            previous values are restored on exit.
        start_timeout_s: how long to wait for the head to come up.
        extra_env: more environment for the Ray processes (e.g. ``PYTHONPATH``).
    """
    worker_types = DEFAULT_WORKER_TYPES if worker_types is None else worker_types
    head_resources = dict(head_resources or {})
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")

    node_ip = _node_ip()
    gcs_port = free_port()
    gcs_address = f"{node_ip}:{gcs_port}"
    # Short path: Ray puts unix sockets under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rayas-"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    config_path = temp_dir / "autoscaling.json"
    config_path.write_text(
        json.dumps(
            make_autoscaling_config(
                worker_types, gcs_address, idle_timeout_minutes, {"CPU": head_cpus, **head_resources}
            ),
            indent=2,
        )
    )
    log_path = temp_dir / "ray-start.log"

    cluster_env = {
        "RAY_ADDRESS": gcs_address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
    }
    proc_env = {k: v for k, v in os.environ.items() if k not in _AUTH_ENV}
    proc_env.update(
        {
            **cluster_env,
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            **(extra_env or {}),
        }
    )
    proc_env.pop("RAY_ADDRESS")  # the head must not try to join an existing cluster

    dashboard_port = free_port()
    cmd = [
        str(ray_bin), "start", "--head", "--block",
        f"--autoscaling-config={config_path}",
        f"--node-ip-address={node_ip}",
        f"--port={gcs_port}",
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if head_resources:
        cmd.append(f"--resources={json.dumps(head_resources)}")
    # Every listening port is a free one (Ray's defaults 8265/52365 may be taken by
    # another cluster on this machine); even without the dashboard Ray runs a minimal one.
    cmd += [
        f"--include-dashboard={str(include_dashboard).lower()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]

    saved_env = {k: os.environ.get(k) for k in _AUTH_ENV}
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, env=proc_env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        _wait_ready(proc, log_path, temp_dir, node_ip, gcs_port, start_timeout_s)
        cluster = LocalAutoscalingCluster(
            address=gcs_address,
            env=cluster_env,
            temp_dir=temp_dir,
            log_path=log_path,
            dashboard_url=f"http://127.0.0.1:{dashboard_port}" if include_dashboard else None,
            pid=proc.pid,
        )
        if apply_env:
            os.environ.update(cluster_env)
            _reset_ray_auth_cache()
        yield cluster
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        if proc is not None:
            _terminate_group(proc)
        if apply_env:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reset_ray_auth_cache()
        shutil.rmtree(temp_dir, ignore_errors=True)
