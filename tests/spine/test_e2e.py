"""The main job end to end, shrunk: real Ray (in-process), real DeepSpeed, real MLflow store, real shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import run_job, run_log, run_pipeline
from tests.spine.baselines import mean_image_fid

# The shipped gates of jobs/ldm.yaml (recon MSE <= 0.05 where the mean image scores 0.18, classifier accuracy
# >= 0.9, teacher class accuracy >= 0.5, distilled 4-step class accuracy >= 0.7; chance is 0.1) at 300 of the 800
# shipped diffusion steps and 40 of 150 steps per distillation halving, with fewer evaluation samples (at 400 and 60:
# teacher and 4-step student class accuracy 1.0, FID 0.069 and 0.073 against 45.9 for the mean image).
OVERRIDES = ["eval.num_samples=200",
             "stages.diffusion.train.steps=300", "stages.diffusion.train.checkpoint_every=150",
             "stages.diffusion.sampling.num_samples=200",
             "stages.distill.train.steps=40", "stages.distill.train.checkpoint_every=40",
             "stages.distill.sampling.num_samples=200"]
def dm_of(children, stage: str) -> dict[str, float]:
    """The metrics of the child run of `stage`."""
    return next(r for r in children if r.data.tags["pipeline.stage"] == stage).data.metrics


@pytest.mark.slow
def test_ldm_job_end_to_end_then_skips_on_rerun(tmp_path):
    first = run_job(tmp_path, "ldm.yaml", OVERRIDES, timeout=2400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Registered models (alias champion)" in first.stdout
    # a quiet terminal: the pipeline's lines and a progress bar per training stage; the rest is in the log file
    lines = first.stdout.splitlines()
    terminal = len(lines) + len(first.stderr.splitlines())
    assert terminal < 60, (terminal, first.stdout, first.stderr[-3000:])
    assert lines[0].startswith("Ray, DeepSpeed and worker output: .pipeline/logs/ldm-")
    for stage in ("autoencoder", "classifier", "diffusion", "distill"):
        bars = [ln for ln in lines if ln.startswith(f"[{stage}] █") or ln.startswith(f"[{stage}] ░")]
        assert bars and " steps/s" in bars[-1] and " left" in bars[-1], (stage, lines)
    assert "[distill] ████████████████████████ 80/80" in first.stdout  # both halvings on one bar
    log_text = run_log(tmp_path)
    assert "Started a local Ray instance" in log_text or "ray" in log_text.lower()
    assert "Failed to query Ray Train Controller" not in log_text  # it warned once a second per stage
    assert "/#/experiments/" in first.stdout and "workflowType=machine_learning" in first.stdout
    table = first.stdout.split("Teacher vs distilled students")[1]
    assert "teacher_16steps" in table and "student_8steps" in table and "student_4steps" in table  # all rows
    assert (tmp_path / "data" / "digits" / "manifest.json").is_file()

    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    versions = {}
    for name in ("ldm-autoencoder", "ldm-classifier", "ldm", "ldm-distilled"):
        mv = client.get_model_version_by_alias(name, "champion")
        versions[name] = mv.version
        assert mv.tags["pipeline.stage_key"]
        assert mv.source.startswith("models:/m-")  # an MLflow model (LoggedModel) of the stage's run
    # every version and model says what it is, how it was judged (this version's gate value) and how to use it
    gates = {"ldm-autoencoder": "eval/recon_mse", "ldm-classifier": "eval/accuracy", "ldm": "eval/class_accuracy",
             "ldm-distilled": "eval/class_accuracy"}
    for name, version in versions.items():
        mv = client.get_model_version(name, version)
        value = client.get_run(mv.run_id).data.metrics[gates[name]]
        assert f"`{gates[name]}`" in mv.description and f"this version: {value:.6g}" in mv.description, mv.description
        assert f"models:/{name}@champion" in client.get_registered_model(name).description
    assert "[ldm v" in client.get_model_version("ldm-distilled", versions["ldm-distilled"]).description
    # downstream stages record exactly which input versions they used
    ldm = client.get_model_version_by_alias("ldm", "champion")
    assert ldm.tags["pipeline.input.autoencoder"] == f"models:/ldm-autoencoder/{versions['ldm-autoencoder']}"
    distilled = client.get_model_version_by_alias("ldm-distilled", "champion")
    assert distilled.tags["pipeline.input.diffusion"] == f"models:/ldm/{versions['ldm']}"

    exp = client.get_experiment_by_name("ldm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's UI: model training view
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert {r.data.tags["pipeline.stage"] for r in children} == {"autoencoder", "classifier", "encode", "diffusion",
                                                                "distill"}
    encode_run = next(r for r in children if r.data.tags["pipeline.stage"] == "encode")  # encode has a run too
    ae_uri = f"models:/ldm-autoencoder/{versions['ldm-autoencoder']}"
    assert encode_run.data.tags["pipeline.input.autoencoder"] == ae_uri
    assert encode_run.data.metrics["encode/train_samples"] > 0 and encode_run.info.status == "FINISHED"
    diffusion_run = next(r for r in children if r.data.tags["pipeline.stage"] == "diffusion")
    # every run names its source, user and commit; every stage's run lists the splits it read (manifest digest)
    from pipeline.data.shards import manifest_sha256

    digest = manifest_sha256(tmp_path / "data" / "digits")[:16]
    for r in [*parents, *children]:
        assert r.data.tags["mlflow.source.name"].startswith("pipeline run ") and r.data.tags["mlflow.user"]
    for r in children:
        inputs = {i.dataset.name: i.dataset for i in client.get_run(r.info.run_id).inputs.dataset_inputs}
        assert len(inputs) == 2, (r.data.tags["pipeline.stage"], inputs)
        if r.data.tags["pipeline.stage"] in ("autoencoder", "classifier", "encode"):
            assert inputs["digits:train"].digest == digest, inputs
        else:  # diffusion and its distillation read the latents of the autoencoder
            assert all(n.startswith("latents:models:/ldm-autoencoder/") for n in inputs), inputs
    assert "system/cpu_utilization_percentage" in diffusion_run.data.metrics  # system metrics while it trained
    # the parent run carries each trained stage's gate metric
    pm = parents[0].data.metrics
    assert pm["distill/eval/class_accuracy"] == dm_of(children, "distill")["eval/class_accuracy"]
    assert pm["autoencoder/eval/recon_mse"] == dm_of(children, "autoencoder")["eval/recon_mse"]
    assert "train/loss" in diffusion_run.data.metrics
    history = client.get_metric_history(diffusion_run.info.run_id, "train/loss")
    assert len(history) >= 2 and sorted(m.step for m in history) == [m.step for m in history]
    assert diffusion_run.data.params["train.steps"] == "300"
    artifacts = {a.path for a in client.list_artifacts(diffusion_run.info.run_id, "samples")}
    assert "samples/grid.png" in artifacts
    images = {a.path for a in client.list_artifacts(diffusion_run.info.run_id, "images")}  # MLflow's step slider
    assert any(p.startswith("images/samples~grid+step+300+") and p.endswith(".png") for p in images), images
    assert {"eval/class_accuracy", "eval/fid", "eval/kid"} <= set(diffusion_run.data.metrics)
    distill_run = next(r for r in children if r.data.tags["pipeline.stage"] == "distill")
    dm, tm = distill_run.data.metrics, diffusion_run.data.metrics
    print({k: round(v, 4) for k, v in sorted({**{"teacher:" + k: v for k, v in tm.items()}, **dm}.items())
           if "eval/" in k})
    assert {"eval/teacher_16steps_class_accuracy", "eval/student_8steps_class_accuracy"} <= set(dm)
    # the registered distilled model samples in 4 steps, at the accuracy the issue asks of it (chance: 0.1)
    assert dm["eval/class_accuracy"] >= 0.7 and "eval/student_4steps_class_accuracy" not in dm, dm  # once
    assert tm["eval/class_accuracy"] >= 0.5, tm  # the teacher passed its shipped gate (5x chance)
    # FID under the job's classifier: under 2% of a generator collapsed onto the mean held-out image
    # (measured: 0.099 against 45.9)
    baseline = mean_image_fid(tmp_path / "data" / "digits", "models:/ldm-classifier@champion")
    assert dm["eval/fid"] < 0.02 * baseline and tm["eval/fid"] < 0.02 * baseline, (baseline, dm, tm)

    second = run_job(tmp_path, "ldm.yaml", OVERRIDES, timeout=2400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("autoencoder", "classifier", "diffusion", "distill"):
        assert f"[{stage}] skipped" in second.stdout
    assert "already cached" in second.stdout
    for name, version in versions.items():
        assert client.get_model_version_by_alias(name, "champion").version == version

    grid = tmp_path / "grid.png"
    out = run_pipeline(tmp_path, "sample", "models:/ldm-distilled@champion", "--label", "3", "--num", "8",
                       "--out", str(grid))
    assert out.returncode == 0, out.stderr[-2000:]
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    check_pyfunc_models(tmp_path, grid)
    check_served_model(tmp_path)

    missing = run_pipeline(tmp_path, "sample", "models:/ldm@nosuchalias", "--out", str(grid))
    assert missing.returncode == 2
    assert "nosuchalias" in missing.stderr and "Traceback" not in missing.stderr


def check_pyfunc_models(tmp_path, grid) -> None:
    """Each registered kind of the main job loads with mlflow.pyfunc by alias: the generators draw what
    `pipeline sample` drew (the grid of `--label 3 --num 8`, default seed and steps), the autoencoder and the
    classifier compute what their exported modules compute."""
    import numpy as np
    import pandas as pd
    import torch

    import mlflow
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.eval import image_grid
    from pipeline.train.export import load_exported

    for name in ("ldm-distilled", "ldm"):
        images = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({"label": [3] * 8}))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        if name == "ldm-distilled":
            assert image_grid(x, nrow=8, scale=4) == grid.read_bytes()
        else:  # the teacher, through the command line too
            teacher = tmp_path / "teacher.png"
            out = run_pipeline(tmp_path, "sample", "models:/ldm@champion", "--label", "3", "--num", "8",
                               "--out", str(teacher))
            assert out.returncode == 0, out.stderr[-2000:]
            assert image_grid(x, nrow=8, scale=4) == teacher.read_bytes()
    real = torch.from_numpy(load_split(tmp_path / "data" / "digits", "test")["image"][:16])
    for name, mode in (("ldm-classifier", None), ("ldm-autoencoder", "reconstruct")):
        module, _ = load_exported(tracking.download(tracking.resolve(f"models:/{name}@champion")))
        with torch.no_grad():
            want = module(real) if mode is None else module.decode(module.encode(real)[0])
        got = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(real.numpy(), params=mode and {"mode": mode})
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


def check_served_model(tmp_path) -> None:
    """`mlflow models serve` serves the distilled model on 127.0.0.1: a REST request for 20 labels gets images
    that the pipeline's classifier assigns to the requested classes (at least 70 %; chance is 10 %)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import numpy as np
    import torch

    from pipeline import tracking
    from pipeline.train.export import load_exported
    from tests.servers import free_port

    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts uvicorn from PATH, as in an activated environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m",
                               "models:/ldm-distilled@champion", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its web server's workers are in its process group
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        labels = [k % 10 for k in range(20)]
        body = json.dumps({"dataframe_records": [{"label": k} for k in labels], "params": {"seed": 1}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            images = np.asarray(json.loads(response.read())["predictions"], dtype=np.uint8)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    assert images.shape[0] == 20 and images.shape[-1] == 1, images.shape
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    classifier, _ = load_exported(tracking.download(tracking.resolve("models:/ldm-classifier@champion")))
    with torch.no_grad():
        accuracy = (classifier(x).argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.7, accuracy
