"""Bad input: one clear message (what, where, what to do), exit code 2, nothing written.

Each case here is a row of the README's troubleshooting table. The cases that arise inside Ray (a
corrupt member inside Ray Train, a GPU-less worker, an infeasible GPU request) are in
test_bad_input_ray.py, raised by real Ray workers; bad command-line arguments are in test_bad_cli_input.py.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data import DataError, iterate_batches, load_split, write_manifest
from pipeline.data.shards import Manifest, read_manifest, write_shards
from tests.reliability.helpers import listing, write_job

ROOT = Path(__file__).resolve().parents[2]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run the `pipeline` command line in this process; returns (exit code, stderr)."""
    from pipeline import progress

    progress.forget_terminal()  # an earlier in-process run may have sent its output to a log file
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # bad command-line input: UsageError, exit code 2
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_malformed_yaml(cwd: Path, capsys) -> None:
    job = cwd.parent / "bad.yaml"
    job.write_text("name: x\nstages:\n  a: {kind: classifier, train: [1, 2}\n")
    for verb in ("validate", "run"):
        rc, err = cli(capsys, verb, str(job))
        assert rc == 2
        assert err.startswith(f"error: {job}: malformed YAML at line 3, column ")
    assert listing(cwd) == set()


def test_unknown_and_mistyped_fields(cwd: Path, capsys, digits8: Path) -> None:
    job = write_job(cwd.parent / "job.yaml", digits8)
    rc, err = cli(capsys, "run", str(job), "--set", "stages.classifier.train.stepz=3")
    assert rc == 2 and "stages.classifier.train.stepz: unknown key (check the spelling" in err
    rc, err = cli(capsys, "run", str(job), "--set", "stages.classifier.train.steps=many")
    assert rc == 2 and "stages.classifier.train.steps: Input should be a valid integer" in err and "'many'" in err
    rc, err = cli(capsys, "run", str(job), "--set", "stages.classifier.scale.zero_stage=5")
    assert rc == 2 and "stages.classifier.scale.zero_stage" in err
    assert listing(cwd) == set()


def test_missing_empty_and_unfinished_shard_directories(cwd: Path, capsys, digits8: Path) -> None:
    job = write_job(cwd.parent / "job.yaml", digits8)
    missing, empty, unfinished = cwd.parent / "missing", cwd.parent / "empty", cwd.parent / "unfinished"
    empty.mkdir()
    shutil.copytree(digits8, unfinished)
    (unfinished / "manifest.json").unlink()  # what an interrupted `pipeline data build` leaves
    for d in (missing, empty, unfinished):
        rc, err = cli(capsys, "run", str(job), "--set", f"data.dir={d}")
        assert rc == 2
        assert f"data.dir: no shards at '{d}' (manifest.json missing); build them with `pipeline data build`" in err
    # the data layer's own messages (eval, data commands) say the same, with the reason
    with pytest.raises(DataError, match="holds no shards and no manifest.json; build it with"):
        read_manifest(empty)
    with pytest.raises(DataError, match="but no manifest.json: an unfinished or interrupted build; rebuild"):
        read_manifest(unfinished)
    assert listing(cwd) == set()


def test_corrupt_member_fails_or_is_skipped_and_counted(tmp_path: Path, digits8: Path) -> None:
    from pipeline.data import ReadStats
    from pipeline.data.local import iter_samples
    from tests.reliability.helpers import corrupt_member

    d = tmp_path / "digits"
    shutil.copytree(digits8, d)
    shard = d / read_manifest(d).splits["train"].shards[0].name
    name = corrupt_member(shard)
    with pytest.raises(DataError, match=rf"corrupt member {name} in shard {shard}: "):
        list(iter_samples([str(shard)], on_corrupt="fail"))
    stats = ReadStats()
    n = sum(1 for _ in iter_samples([str(shard)], on_corrupt="skip", stats=stats))
    assert (stats.skipped, stats.skipped_keys, n) == (1, [name.split(".")[0]], 799)


def _one_odd_image_dataset(out: Path, image: np.ndarray) -> None:
    """Shards whose manifest promises 8x8 grayscale, holding one sample `image` among good ones."""
    good = [{"key": f"s{i:03d}", "image": np.full((8, 8, 1), i, np.uint8), "label": i % 2, "caption": ""}
            for i in range(7)]
    shards = write_shards([*good, {"key": "odd", "image": image, "label": 0, "caption": ""}], out, prefix="train")
    split = {"num_samples": 8, "labels": {0: 4, 1: 4}, "shards": [s.model_dump() for s in shards]}
    write_manifest(out, Manifest(source="test", image_size=[8, 8, 1], num_classes=2, splits={"train": split}))


@pytest.mark.parametrize("image, shape", [(np.zeros((8, 8, 3), np.uint8), (3, 8, 8)),  # RGB among grayscale
                                          (np.zeros((9, 8, 1), np.uint8), (1, 9, 8))])  # wrong size
def test_image_of_wrong_size_or_mode(tmp_path: Path, image: np.ndarray, shape: tuple) -> None:
    _one_odd_image_dataset(tmp_path / "d", image)
    msg = rf"sample odd in shard .*train-000000.tar: image shape {re.escape(str(shape))}, manifest says \(1, 8, 8\)"
    with pytest.raises(DataError, match=msg):
        load_split(tmp_path / "d", "train")
    assert load_split(tmp_path / "d", "train", on_corrupt="skip")["skipped"] == 1
    batches = list(iterate_batches(tmp_path / "d", "train", 7, epochs=1, on_corrupt="skip", shuffle=False))
    assert [len(b["key"]) for b in batches] == [7] and "odd" not in batches[0]["key"]


def test_image_folder_of_mixed_sizes_is_rejected_before_writing(cwd: Path, capsys) -> None:
    src = cwd.parent / "images" / "cat"
    src.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "a.png")
    Image.new("RGB", (9, 8)).save(src / "b.png")
    rc, err = cli(capsys, "data", "build", "--source", f"imagefolder:{src.parent}", "--out", str(cwd / "out"))
    assert rc == 2 and "b.png" in err
    assert not (cwd / "out" / "manifest.json").exists()


def test_registry_alias_that_does_not_exist(cwd: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cwd.parent / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    run = client.create_run(client.create_experiment("e"))
    version = client.create_model_version("m", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("m", "champion", version.version)
    rc, err = cli(capsys, "sample", "models:/m@nosuch", "--tracking-uri", uri, "--out", str(cwd / "g.png"))
    assert rc == 2
    assert "models:/m@nosuch: not found" in err and "its aliases are: champion — use one of them" in err
    rc, err = cli(capsys, "sample", "models:/nobody@champion", "--tracking-uri", uri, "--out", str(cwd / "g.png"))
    assert rc == 2 and "no registered model is named 'nobody'" in err and "run the job that registers it" in err
    assert listing(cwd) == set()


class _SilentServer:
    """A TCP server that accepts connections and never answers (a hung server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_fails_fast(cwd: Path, capsys, monkeypatch, digits8: Path) -> None:
    job = write_job(cwd.parent / "job.yaml", digits8)
    port = _closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:s3cret@127.0.0.1:{port}")
    rc, err = cli(capsys, "run", str(job))
    assert rc == 2
    assert f"cannot reach the MLflow server at http://admin:***@127.0.0.1:{port}" in err
    assert "start it (mlflow/start-server.sh) or unset MLFLOW_TRACKING_URI" in err
    assert "s3cret" not in err  # the password never reaches the terminal

    silent = _SilentServer()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.port}")
        t0 = time.monotonic()
        rc, err = cli(capsys, "run", str(job))
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert rc == 2 and f"cannot reach the MLflow server at http://127.0.0.1:{silent.port}" in err
    assert elapsed < 60, f"a hung server must time out (MLFLOW_HTTP_REQUEST_TIMEOUT=2), took {elapsed:.0f} s"
    assert listing(cwd) == set()


def test_unreachable_ray_address_fails_fast(cwd: Path, capsys, monkeypatch, digits8: Path) -> None:
    job = write_job(cwd.parent / "job.yaml", digits8)
    port = _closed_port()
    t0 = time.monotonic()
    rc, err = cli(capsys, "run", str(job), "--set", f"ray.address=127.0.0.1:{port}")
    assert rc == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err
    assert "start it (`ray start --head" in err and "unset both to run Ray inside this process" in err
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    rc, err = cli(capsys, "run", str(job))
    assert rc == 2 and "a dashboard URL" in err and "pipeline submit JOB --address http://127.0.0.1:8265" in err
    assert time.monotonic() - t0 < 60
    assert listing(cwd) == set()  # checked before data, MLflow store or Ray session are touched


def test_gpu_asked_for_where_none_exists(cwd: Path, capsys, digits8: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = write_job(cwd.parent / "job.yaml", digits8)
    rc, err = cli(capsys, "run", str(job), "--set", "stages.classifier.scale.gpus_per_worker=1")
    assert rc == 2
    assert "stage 'classifier': scale.gpus_per_worker=1, but this machine has no GPU" in err
    assert "set stages.classifier.scale.gpus_per_worker=0 to train on CPU" in err
    assert listing(cwd) == set()


def test_workers_that_take_every_cpu_are_refused_before_they_hang(cwd: Path, capsys, digits8: Path) -> None:
    """Each worker streams through Ray Data tasks that need a CPU of their own; a stage whose workers take all of
    in-process Ray's CPUs would wait for them forever."""
    job = write_job(cwd.parent / "job.yaml", digits8)
    rc, err = cli(capsys, "--verbose", "run", str(job), "--set", "ray.num_cpus=2")  # 2 workers × 1 CPU
    assert rc == 2
    assert "stage 'classifier' takes all 2 CPU of the cluster for its workers" in err
    assert "lower stages.classifier.scale.cpus_per_worker (fractions work)" in err and "raise ray.num_cpus" in err
    assert listing(cwd) == set()


def test_embedded_store_in_rays_temporary_working_dir_is_refused(tmp_path: Path, capsys, monkeypatch,
                                                                 digits8: Path) -> None:
    """`ray job submit --working-dir .` runs the job in Ray's copy of the directory, deleted with the cluster."""
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    pkg.mkdir(parents=True)
    job = write_job(tmp_path / "job.yaml", digits8)
    monkeypatch.chdir(pkg)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, err = cli(capsys, "run", str(job))
    assert rc == 2
    assert f"this job runs in Ray's temporary copy of its working directory ({pkg})" in err
    assert f"its MLflow store sqlite:///{pkg}/mlflow.db would live there" in err
    assert "Point MLFLOW_TRACKING_URI (or tracking.uri) at a tracking server" in err
    assert listing(pkg) == set()

    from pipeline.config import load_spec
    from pipeline.stages import check_store_outlives_ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # outside: accepted
    check_store_outlives_ray(load_spec(job))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_store_outlives_ray(load_spec(job))
