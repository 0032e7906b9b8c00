"""Tiny registered models for the evaluation tests, built once per session without the Ray pipeline.

The 8x8 bundled digits; a small class-conditional pixel U-Net trained with the real DiffusionTask
objective (cosine schedule, T = 50), the same U-Net untrained, and a noisy classifier trained with the
real ClassifierTask objective (x_t ~ q(x_t | x_0), cosine T = 1000), and a ControlNet around the trained
U-Net as initialised (zero convolutions: it still draws what its base draws), and an untrained
caption-conditioned U-Net (trainable word encoder). All are exported with
``export_weights`` and registered (alias ``champion``) in a temporary SQLite MLflow store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.data import build_dataset, load_split

UNET_ARGS = {"in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [], "num_classes": 10}
CLASSIFIER_ARGS = {"in_channels": 1, "num_classes": 10, "model_channels": 16, "channel_mult": [1, 2],
                   "num_res_blocks": 1}
EDGES = {"sigma": 1.0, "low_threshold": 0.1, "high_threshold": 0.2}
DIFFUSION = {"schedule": "cosine", "timesteps": 50, "parameterization": "v", "loss": "simple",
             "label_dropout": 0.2}


@dataclass
class TinyStore:
    """Where the tiny models live."""

    uri: str
    data_dir: Path
    dirs: dict[str, Path]  # exported model directories by registered name
    train_seconds: dict[str, float]


def _train(task, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
           lr: float, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=gen)
        loss, _ = task.loss(model, {"image": images[idx], "label": labels[idx]}, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny ops: extra intra-op threads only add contention on a busy machine (as in tests/diffusion)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> TinyStore:
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import tracking
    from pipeline.train.controlnet_task import ControlNetTask
    from pipeline.train.export import export_weights
    from pipeline.train.tasks import ClassifierTask, DiffusionTask
    from pipeline.train.text_task import TextDiffusionTask, resolve_text_encoder

    root = tmp_path_factory.mktemp("tiny-eval")
    data_dir = root / "digits8"
    build_dataset("digits", data_dir, image_size=8, seed=0)
    train = load_split(data_dir, "train")
    images, labels = torch.from_numpy(train["image"]), torch.from_numpy(train["label"])

    threads = torch.get_num_threads()  # session fixture: set up before the module-scoped _single_thread
    torch.set_num_threads(1)
    try:
        stage = {"model": {"name": "unet", "args": UNET_ARGS}, "diffusion": DIFFUSION}
        task = DiffusionTask(stage, num_classes=10, data={"latent_scale": 1.0, "sample_shape": [1, 8, 8]})
        torch.manual_seed(0)
        untrained = task.build_model()
        torch.manual_seed(0)
        model = task.build_model()
        secs = {"tiny-ddpm": _train(task, model, images, labels, steps=300, lr=2e-3, seed=0)}
        ctask = ClassifierTask({"model": {"name": "classifier", "args": CLASSIFIER_ARGS}, "noisy": True})
        torch.manual_seed(0)
        clf = ctask.build_model()
        secs["tiny-noisy-classifier"] = _train(ctask, clf, images, labels, steps=300, lr=2e-3, seed=1)
    finally:
        torch.set_num_threads(threads)

    dirs = {
        "tiny-ddpm": export_weights(model.state_dict(), "unet", UNET_ARGS, root / "ddpm", task.export_extra()),
        "tiny-ddpm-untrained": export_weights(untrained.state_dict(), "unet", UNET_ARGS, root / "untrained",
                                              task.export_extra()),
        "tiny-noisy-classifier": export_weights(clf.state_dict(), "classifier", CLASSIFIER_ARGS, root / "clf",
                                                ctask.export_extra()),
    }
    cn_task = ControlNetTask({"edges": EDGES, "class_labels": True}, model,
                             {"name": "unet", "args": UNET_ARGS, "extra": task.export_extra()})
    cn_name, cn_args = cn_task.model_recipe()
    dirs["tiny-controlnet"] = export_weights(cn_task.build_model().state_dict(), cn_name, cn_args,
                                             root / "controlnet", cn_task.export_extra())
    text_encoder = resolve_text_encoder({"name": "trainable", "args": {"width": 16, "depth": 1, "heads": 2,
                                                                       "max_length": 8}}, train["caption"])
    text_unet = {k: v for k, v in UNET_ARGS.items() if k != "num_classes"}
    t_task = TextDiffusionTask({"model": {"name": "unet", "args": {**text_unet, "attention_resolutions": [1]}},
                                "diffusion": DIFFUSION}, 10, {"latent_scale": 1.0, "sample_shape": [1, 8, 8]},
                               text_encoder)
    torch.manual_seed(0)
    t_name, t_args = t_task.model_recipe()
    dirs["tiny-text-untrained"] = export_weights(t_task.build_model().state_dict(), t_name, t_args, root / "text",
                                                 t_task.export_extra())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        exp_id = client.create_experiment("tiny", artifact_location=(root / "artifacts").as_uri())
        for name, d in dirs.items():
            run = client.create_run(exp_id, run_name=name)
            ref = tracking.register(name, run.info.run_id, d, {"pipeline.test": "1"})
            tracking.set_alias(name, "champion", ref.version)
            client.set_terminated(run.info.run_id, "FINISHED")
    finally:
        mlflow.set_tracking_uri(previous)
    return TinyStore(uri, data_dir, dirs, secs)


@pytest.fixture
def tiny_mlflow(tiny_store: TinyStore, monkeypatch: pytest.MonkeyPatch) -> TinyStore:
    """The tiny store as the current MLflow tracking URI (restored afterwards)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tiny_store.uri)
    yield tiny_store
    mlflow.set_tracking_uri(previous)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to features (N, d), in numpy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # unbiased (N - 1)
    root = scipy.linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root).real)


def unbiased_mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples (N, d) with the kernel k(x, y) = (x.y / d + 1)^3, in numpy."""
    m, d = a.shape

    def k(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u @ v.T / d + 1.0) ** 3

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    off = m * (m - 1)
    return float((kaa.sum() - np.trace(kaa)) / off + (kbb.sum() - np.trace(kbb)) / off - 2 * kab.mean())
