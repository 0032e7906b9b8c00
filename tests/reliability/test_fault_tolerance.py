"""Fault tolerance: a killed training worker, a killed driver, interrupted shard and checkpoint writing.

What is deterministic: workers stream their shards in the order of `pipeline.data.stream`, where global
batch b is a pure function of (seed, b) and the global batch size, the model starts from rank 0's
seeded weights, every rank's RNG state is in the checkpoint, and gloo's all-reduce on a fixed
worker count sums in a fixed order. So a run that is killed and resumed from its last checkpoint
ends with exactly (bit for bit) the weights of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_spec
from pipeline.data.shards import read_manifest
from tests.reliability.helpers import (
    clean_env,
    corrupt_member,
    local_ray,
    pipeline_cmd,
    run_log,
    run_pipeline,
    write_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def ray_local() -> Iterator[None]:
    """In-process Ray, token auth off (nothing written to ~/.ray), env restored afterwards."""
    with local_ray(num_cpus=8, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}}):
        yield


def _train_workers() -> list[psutil.Process]:
    """Ray Train worker processes started by this test process (never anyone else's)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _history(uri: str, run_id: str) -> list[list[int]]:
    """The steps rank 0 logged train/loss at, split into attempts (a restart logs smaller steps again)."""
    from mlflow.tracking import MlflowClient

    hist = sorted(MlflowClient(uri).get_metric_history(run_id, "train/loss"), key=lambda m: (m.timestamp, m.step))
    attempts: list[list[int]] = [[]]
    for m in hist:
        if attempts[-1] and m.step <= attempts[-1][-1]:
            attempts.append([])
        attempts[-1].append(m.step)
    return attempts


def _split_keys(spec) -> list[str]:
    from pipeline.data.stream import shard_index

    return [k for p in spec.paths for k in shard_index(p).keys]


def _epoch_keys(record: Path, epoch: int) -> list[str]:
    """The keys the workers trained on in `epoch`, from their records (rank, batch -> keys). A batch that
    was read again after a restart must have held the same keys both times."""
    seen: dict[tuple[str, int], tuple[list[int], list[str]]] = {}
    for f in sorted(record.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            got = (r["epoch"], r["keys"])
            assert seen.setdefault((f.name, r["batch"]), got) == got, f"{f.name} batch {r['batch']} changed on re-read"
    return [k for epochs, keys in seen.values() for e, k in zip(epochs, keys, strict=True) if e == epoch]


def test_killed_worker_resumes_from_last_checkpoint_bit_for_bit(ray_local, tmp_path: Path, digits8: Path) -> None:
    """Streamed data, 2 workers, one killed mid-epoch: the run resumes inside the epoch at its last checkpoint,
    reads every sample of the epoch exactly once, and ends with the weights of an uninterrupted run."""
    from mlflow.tracking import MlflowClient

    from pipeline.data.stream import spec_for
    from pipeline.train.ray_worker import fit_stage

    data = tmp_path / "digits"  # one corrupt member, skipped and counted (data.on_corrupt=skip)
    shutil.copytree(digits8, data)
    corrupt_member(data / read_manifest(data).splits["train"].shards[0].name, index=7)
    total, every = 30, 5  # 30 global batches of 64 > one epoch (1,527 samples): the kill lands inside epoch 0
    spec = load_spec(write_job(tmp_path / "job.yaml", data), [
        f"stages.classifier.train.steps={total}", f"stages.classifier.train.checkpoint_every={every}",
        "stages.classifier.train.batch_size=64",
        "stages.classifier.train.log_every=1", "stages.classifier.scale.max_failures=1"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ft")
    stream = spec_for(str(data), "train", seed=0, on_corrupt="skip")

    def fit(name: str, kill: bool):
        run_id = client.create_run(exp).info.run_id
        (tmp_path / name).mkdir()
        config = {"stage": spec.stages["classifier"].model_dump(mode="json"), "seed": 0, "tracking_uri": uri,
                  "run_id": run_id, "data": stream, "record_keys_to": str(tmp_path / name)}
        killed: list[int] = []
        stop = threading.Event()
        earlier = {p.pid for p in _train_workers()}  # the clean fit's workers may still be exiting

        def killer() -> None:  # SIGKILL one of this fit's workers once Ray Train has registered a checkpoint
            snapshot = tmp_path / "ray" / name / "checkpoint_manager_snapshot.json"
            while not stop.is_set():
                try:
                    results = json.loads(snapshot.read_text())["checkpoint_results"]
                except (OSError, ValueError, KeyError):  # not there yet, or being rewritten
                    results = []
                workers = [p for p in _train_workers() if p.pid not in earlier] if results else []
                if workers:
                    workers[-1].kill()
                    killed.append(max(int(r["metrics"]["step"]) for r in results))  # registered at the kill
                    return
                time.sleep(0.1)

        t = threading.Thread(target=killer, daemon=True)
        if kill:
            t.start()
        try:
            result = fit_stage(config, run_name=name, storage_path=str(tmp_path / "ray"))
        finally:
            stop.set()
        return result, run_id, killed

    clean, clean_run, _ = fit("clean", kill=False)
    resumed, resumed_run, killed = fit("killed", kill=True)

    assert killed, "no training worker was killed"
    n = read_manifest(data).splits["train"].num_samples
    for r in (clean, resumed):
        assert r.error is None and r.metrics["step"] == total
        assert r.metrics["data/skipped_samples"] == 1.0 and r.metrics["data/samples"] == n - 1
    assert _history(uri, clean_run) == [list(range(1, total + 1))]
    assert killed[0] < total, "the kill came after the last checkpoint"
    attempts = _history(uri, resumed_run)
    if len(attempts) == 1:  # killed before rank 0 logged the step after the checkpoint: nothing repeats
        assert attempts == [list(range(1, total + 1))] and killed[0] >= every and killed[0] % every == 0
    else:
        first, second = attempts
        assert first == list(range(1, len(first) + 1)) and len(first) < total, "the kill came after the last step"
        last_ckpt = second[0] - 1
        assert last_ckpt >= every and last_ckpt % every == 0  # resumed at a checkpoint: the latest one Ray
        assert killed[0] <= last_ckpt <= len(first)  # Train had registered (a report in flight may count too)
        assert second == list(range(last_ckpt + 1, total + 1))  # no step lost after it, none done twice

    def weights(result) -> dict[str, torch.Tensor]:
        with result.checkpoint.as_directory() as d:
            return load_file(str(Path(d) / "export" / "model.safetensors"))

    a, b = weights(clean), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    split = sorted(_split_keys(stream))
    for name in ("clean", "killed"):  # epoch 0, across both workers (and the restart): every sample once
        seen = _epoch_keys(tmp_path / name, 0)
        assert sorted(seen) == split, f"{name}: {len(seen)} reads of {len(set(seen))} keys, split {len(split)}"
    assert sorted(_epoch_keys(tmp_path / "clean", 1)) == sorted(_epoch_keys(tmp_path / "killed", 1))


def test_resuming_on_one_worker_instead_of_two_continues_the_epoch(ray_local, tmp_path: Path, digits8: Path) -> None:
    """Stopped mid-epoch on 2 workers and resumed from the checkpoint on 1: the epoch goes on with exactly the
    samples not yet read (none twice, none left out), as the same global batches."""
    from pipeline.data.stream import spec_for
    from pipeline.train.ray_worker import fit_stage

    stream = spec_for(str(digits8), "train", seed=0)
    record = tmp_path / "record"
    record.mkdir()

    def fit(steps: int, workers: int):
        spec = load_spec(write_job(tmp_path / "job.yaml", digits8), [
            f"stages.classifier.train.steps={steps}", "stages.classifier.train.checkpoint_every=10",
            "stages.classifier.train.batch_size=64", f"stages.classifier.scale.workers={workers}"])
        config = {"stage": spec.stages["classifier"].model_dump(mode="json"), "seed": 0, "data": stream,
                  "record_keys_to": str(record)}
        result = fit_stage(config, run_name="resize", storage_path=str(tmp_path / "ray"))
        assert result.error is None
        return result

    fit(10, workers=2)  # 10 of the epoch's 24 batches, checkpoint at 10
    assert sorted(p.name for p in record.iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    fit(25, workers=1)  # resumed from storage at step 10, on one worker
    first = [json.loads(line)["batch"] for line in (record / "rank1.jsonl").read_text().splitlines()]
    assert first == list(range(10))  # rank 1 existed only before the resize
    seen = _epoch_keys(record, 0)
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(_split_keys(stream))


def _two_stage_job(tmp_path: Path, data: Path) -> Path:
    import yaml

    job_path = write_job(tmp_path / "job.yaml", data)
    job = yaml.safe_load(job_path.read_text())
    second = yaml.safe_load(yaml.safe_dump(job["stages"]["classifier"]))
    second["train"].update(steps=40, checkpoint_every=5, log_every=5)
    second["register"]["name"] = "rel-classifier2"
    second["scale"]["max_failures"] = 1
    job["stages"]["classifier2"] = second
    job["stages"]["classifier"]["train"]["steps"] = 4
    job_path.write_text(yaml.safe_dump(job, sort_keys=False))
    return job_path


def test_killed_driver_rerun_skips_done_stages_and_resumes(tmp_path: Path, digits8: Path) -> None:
    job = _two_stage_job(tmp_path, digits8)
    # RAY_DEDUP_LOGS=0: Ray folds log lines that differ only in numbers ("rank 0 resumed at step 5" and "rank 1 ...")
    # into the first one to arrive, so rank 0's line would be missing whenever rank 1's came first
    env = clean_env(RAY_AUTH_MODE="disabled", RAY_DEDUP_LOGS="0")
    storage = tmp_path / ".pipeline" / "ray"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(pipeline_cmd("run", str(job)), cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            if any('"checkpoint_dir_name"' in p.read_text()  # a checkpoint Ray Train has registered
                   for p in storage.glob("rel-classifier2-*/checkpoint_manager_snapshot.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the first run ended before it could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
        descendants = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # the driver dies mid-stage
        proc.wait(30)
    finally:
        try:  # and with it whatever it started (Ray's processes are in its session)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    for p in descendants:
        try:
            p.kill()
        except psutil.Error:
            pass
    first = (tmp_path / "first.log").read_text()
    assert "[classifier] registered rel-classifier v1 → champion" in first
    assert "rel-classifier2 v" not in first

    # A checkpoint directory that was being written when the driver died, never registered by Ray
    # Train: the re-run must not read it.
    run_dir = next(storage.glob("rel-classifier2-*"))
    partial = run_dir / "checkpoint_2999-01-01_00-00-00.000000"
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"step": 3')

    second = run_pipeline(tmp_path, "run", str(job), env=env, timeout=600)
    out = second.stdout + second.stderr + run_log(tmp_path)  # the workers' lines are in the run's log file
    assert second.returncode == 0, out[-4000:]
    assert "[classifier] skipped: champion rel-classifier v1" in out
    resumed = [int(line.split("resumed at step ")[1].split()[0]) for line in out.splitlines()
               if "rank 0 resumed at step" in line]
    assert len(resumed) == 1 and resumed[0] >= 5 and resumed[0] % 5 == 0, out[-4000:]
    assert "[classifier2] registered rel-classifier2 v1 → champion" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("rel-classifier2", "champion")
    steps = [m.step for m in client.get_metric_history(mv.run_id, "train/loss")]
    assert steps == list(range(resumed[0] + 5, 41, 5))  # the re-run only did the steps after the checkpoint
    assert [str(v.version) for v in client.search_model_versions("name='rel-classifier'")] == ["1"]


def test_interrupted_shard_build_is_never_read(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    proc = subprocess.Popen(pipeline_cmd("data", "build", "--source", "digits", "--out", str(out),
                                         "--image-size", "8", "--shard-size", "20"),
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("train-000002.tar")):
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait(30)
    assert not (out / "manifest.json").exists(), "the build finished before it could be interrupted"
    finals = sorted(out.glob("train-*.tar"))
    assert finals, "no shard was finished before the kill"
    for shard in finals:  # every file with a final name is complete; partial ones keep hidden temp names
        with tarfile.open(shard) as tar:
            assert len([m for m in tar.getmembers() if m.name.endswith(".png")]) == 20

    job = write_job(tmp_path / "job.yaml", out)
    validate = run_pipeline(tmp_path, "validate", str(job), timeout=120)
    assert validate.returncode == 2 and "(manifest.json missing)" in validate.stderr

    rebuild = run_pipeline(tmp_path, "data", "build", "--source", "digits", "--out", str(out), "--image-size", "8",
                           "--shard-size", "20", timeout=300)
    assert rebuild.returncode == 0, rebuild.stderr[-2000:]
    manifest = read_manifest(out)
    assert sum(s.num_samples for s in manifest.splits["train"].shards) == manifest.splits["train"].num_samples
    listed = {s.name for sp in manifest.splits.values() for s in sp.shards}
    assert all(p.name in listed for p in out.glob("*.tar"))  # temp leftovers are never named *.tar
