"""What a run records about its origin and its data: MLflow's source/user/commit tags (`tracking.source_tags`) and
the splits it reads as dataset inputs (`tracking.log_dataset`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

import mlflow
from pipeline import tracking

ROOT = Path(__file__).resolve().parents[2]


def test_source_tags_name_the_command_user_and_commit() -> None:
    tags = tracking.source_tags("pipeline run jobs/ldm.yaml")
    assert tags["mlflow.source.name"] == "pipeline run jobs/ldm.yaml" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the full commit, as MLflow's Version column expects
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_a_split_is_a_dataset_input_with_digest_split_count_and_context(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("data")).info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    digest = "ab" * 32
    tracking.log_dataset(run_id, "/data/digits", name="digits:train", digest=digest, split="train",
                         num_samples=1528, context="train")
    tracking.log_dataset(run_id, "s3://bucket/digits", name="digits:test", digest=digest, split="test",
                         num_samples=269, context="eval")
    inputs = {i.dataset.name: i for i in client.get_run(run_id).inputs.dataset_inputs}
    train, test = inputs["digits:train"], inputs["digits:test"]
    assert train.dataset.digest == digest[:16] and json.loads(train.dataset.source) == {"uri": "/data/digits"}
    assert train.dataset.source_type == "local" and test.dataset.source_type == "s3"
    assert json.loads(train.dataset.profile) == {"split": "train", "num_samples": 1528}
    assert json.loads(test.dataset.profile)["num_samples"] == 269
    assert [t.value for t in train.tags if t.key == "mlflow.data.context"] == ["train"]
    assert [t.value for t in test.tags if t.key == "mlflow.data.context"] == ["eval"]


def test_system_metrics_are_logged_while_a_stage_runs(tmp_path: Path) -> None:
    import time

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("sys")).info.run_id
    with tracking.system_metrics(run_id, interval_s=0.2):
        time.sleep(1.5)
    before = set(client.get_run(run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= before, before
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and steps == sorted(steps)
    time.sleep(0.5)  # the monitor stopped with the block: nothing more is logged
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == len(steps)


def test_end_of_run_links_open_the_model_training_view_without_credentials() -> None:
    from pipeline.tracking import ui_links

    served = ui_links("http://admin:s3cret@10.0.0.5:5000/", "7")
    assert served == ["  runs:     http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning",
                      "  models:   http://10.0.0.5:5000/#/experiments/7/models?workflowType=machine_learning",
                      "  registry: http://10.0.0.5:5000/#/models?workflowType=machine_learning"]
    local = ui_links("sqlite:///mlflow.db", "1")
    assert local[0] == "browse with `mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000`, then open"
    assert local[1].endswith("/#/experiments/1/runs?workflowType=machine_learning")
