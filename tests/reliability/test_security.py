"""Security: nothing unpickled from outside, YAML loaded safely, no dashboard/job API by default,
servers on 127.0.0.1 by default, no secrets in logs, params or artifacts."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.config import SpecError, load_spec
from tests.reliability.helpers import ray_auth_disabled, write_job

ROOT = Path(__file__).resolve().parents[2]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            base = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            kw = {k.arg: k.value for k in node.keywords}
            yield node, base, name, kw


def test_library_code_never_unpickles_or_loads_yaml_unsafely() -> None:
    problems = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = lambda n, p=path: f"{p.relative_to(ROOT)}:{n.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(m in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for m in mods):
                    problems.append(f"{where(node)}: imports a pickle module")
        for node, base, name, kw in _calls(tree):
            if base == "torch" and name == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where(node)}: torch.load without weights_only=True")
            if base == "np" and name == "load":
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    problems.append(f"{where(node)}: np.load without allow_pickle=False")
            if base == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{where(node)}: yaml.{name} (use yaml.safe_load)")
            if name == "load_checkpoint":  # DeepSpeed's loader unpickles (torch.load(weights_only=False))
                problems.append(f"{where(node)}: DeepSpeed load_checkpoint")
    assert problems == []


def test_yaml_tags_are_refused_not_executed(tmp_path: Path, digits8: Path) -> None:
    marker = tmp_path / "pwned"
    job = write_job(tmp_path / "job.yaml", digits8)
    job.write_text(job.read_text() + f"extra: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_spec(job)
    assert not marker.exists()


def test_secrets_are_redacted_in_params_and_the_spec_artifact(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline.stages import _log_spec_artifact, redacted_params

    uri = "http://alice:hunter2@mlflow.example:5000"
    spec = {"tracking": {"uri": uri}, "ray": {"storage": "s3://key:topsecret@bucket/x"}, "seed": 3}
    params = redacted_params(spec)
    assert params == {"tracking.uri": "http://alice:***@mlflow.example:5000",
                      "ray.storage": "s3://key:***@bucket/x", "seed": 3}

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("sec", artifact_location=str(tmp_path / "art")))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    _log_spec_artifact(run.info.run_id, job)
    logged = Path(client.download_artifacts(run.info.run_id, "spec/job.yaml", str(tmp_path / "dl"))).read_text()
    assert "hunter2" not in logged and "topsecret" not in logged and "alice:***@" in logged
    assert "hunter2" in job.read_text()  # the user's own file is untouched


def test_mlflow_server_script_binds_loopback_by_default() -> None:
    script = (ROOT / "mlflow" / "start-server.sh").read_text()
    assert 'host="${MLFLOW_HOST:-127.0.0.1}"' in script and '--host "$host"' in script


@pytest.mark.slow
def test_in_process_ray_starts_no_dashboard_or_job_api(tmp_path: Path, digits8: Path, monkeypatch) -> None:
    import ray

    from pipeline.stages import init_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # nothing written to ~/.ray by this test
    ray_auth_disabled()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = load_spec(write_job(tmp_path / "job.yaml", digits8), ["ray.num_cpus=2"])
    before = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    init_ray(spec)
    try:
        ours = [psutil.Process(), *psutil.Process().children(recursive=True)]
        names = {p.name() for p in ours if p.is_running()}
        assert not any("dashboard" in n for n in names), names
        ports = set()
        for p in ours:
            try:
                ports |= {c.laddr.port for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                pass
        assert 8265 not in ports - before  # Ray's dashboard / job API port
        assert not ray._private.worker.global_worker.node.webui_url  # no dashboard address either
    finally:
        ray.shutdown()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
