"""Every registered version is an MLflow model: `mlflow.pyfunc` loads it by alias and predicts by its kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mlflow
from pipeline import tracking
from pipeline.eval import image_grid
from pipeline.train.export import export_weights, load_exported
from tests.reliability.helpers import register_untrained_ddpm


@pytest.fixture
def store(tmp_path: Path):
    previous = mlflow.get_tracking_uri()
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def test_a_generator_predicts_what_pipeline_sample_draws_for_the_same_seed(store: Path) -> None:
    from pipeline.cli import main

    uri = register_untrained_ddpm(store)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tiny-ddpm@champion")
    params = model.metadata.get_params_schema()
    assert {p.name: p.default for p in params.params} == {"seed": 0, "steps": 0, "guidance": 0.0, "sampler": "ddim",
                                                          "eta": 0.0}
    assert model.metadata.get_input_schema().input_names() == ["label"]
    images = model.predict(pd.DataFrame({"label": [3, 3, 5, 7]}), params={"seed": 7, "steps": 6, "guidance": 1.5})
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8

    grid = store / "grid.png"  # the same request through the command line
    assert main(["sample", "models:/tiny-ddpm@champion", "--label", "3", "--num", "2", "--seed", "7", "--steps", "6",
                 "--guidance", "1.5", "--nrow", "2", "--out", str(grid), "--tracking-uri", uri]) == 0
    again = model.predict(pd.DataFrame({"label": [3, 3]}), params={"seed": 7, "steps": 6, "guidance": 1.5})
    x = torch.from_numpy(again).permute(0, 3, 1, 2).float() / 127.5 - 1  # back to [-1, 1]: the grid rounds it back
    assert image_grid(x, nrow=2, scale=4) == grid.read_bytes()
    assert np.array_equal(again, images[:2])  # the first rows of a request do not depend on the later ones
    assert not np.array_equal(images, model.predict(pd.DataFrame({"label": [3, 3, 5, 7]}), params={"seed": 8,
                                                                                                    "steps": 6}))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        model.predict(pd.DataFrame({"label": [10]}))


def _register(root: Path, name: str, model_name: str, args: dict, extra: dict) -> torch.nn.Module:
    from mlflow.tracking import MlflowClient

    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, **args)
    export = export_weights(model.state_dict(), model_name, args, root / name, extra)
    client = MlflowClient()
    exp = client.get_experiment_by_name("kinds") or client.get_experiment(client.create_experiment("kinds"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    ref = tracking.register(name, run_id, export, {}, image_chw=(1, 8, 8))
    tracking.set_alias(name, "champion", ref.version)
    return load_exported(export)[0]


def test_autoencoders_encode_decode_and_classifiers_give_logits(store: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    # a process's active experiment does not take the models
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", MlflowClient().create_experiment("another"))
    ae = _register(store, "ae", "kl_vae", {"in_channels": 1, "base_channels": 8, "channel_mult": [1, 2],
                                           "num_res_blocks": 1, "latent_channels": 2}, {"kind": "autoencoder"})
    clf = _register(store, "clf", "classifier", {"in_channels": 1, "num_classes": 10, "model_channels": 8,
                                                 "channel_mult": [1, 2], "num_res_blocks": 1},
                    {"kind": "classifier", "noisy": False})
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, _ = ae.encode(x)
        want = {"encode": mean, "reconstruct": ae.decode(mean), "decode": ae.decode(mean)}
        logits = clf(x)
    pyfunc_ae = mlflow.pyfunc.load_model("models:/ae@champion")
    for mode, expected in want.items():
        given = mean.numpy() if mode == "decode" else x.numpy()
        np.testing.assert_allclose(pyfunc_ae.predict(given, params={"mode": mode}), expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(mlflow.pyfunc.load_model("models:/clf@champion").predict(x.numpy()), logits.numpy(),
                               rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="reconstruct, encode or decode"):
        pyfunc_ae.predict(x.numpy(), params={"mode": "sample"})

    # the version is a LoggedModel of its run, with the input example of its kind; downstream loaders get the export
    client = MlflowClient()
    mv = client.get_model_version("clf", "1")
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))  # the Models tab of the experiment
    assert logged.source_run_id == mv.run_id and logged.name == "clf" and logged.model_type == "classifier"
    assert logged.experiment_id == client.get_run(mv.run_id).info.experiment_id != "0"  # the run's, not Default
    info = mlflow.models.get_model_info("models:/clf@champion")
    assert info.flavors["python_function"]["loader_module"] == "pipeline.tracking.pyfunc"
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 8, 8)
    assert (Path(tracking.download(tracking.resolve("models:/clf@champion"))) / "model.safetensors").is_file()
