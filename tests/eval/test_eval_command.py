"""`pipeline eval`: FID/KID and class accuracy of a registered class- or caption-conditioned model."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.cli import main
from pipeline.data import load_split
from pipeline.eval import generate, sample_metrics
from pipeline.eval.text import generate_from_captions
from pipeline.stages import load_generator
from pipeline.train.export import load_exported


def _run(capsys, store, model: str, num: int) -> dict[str, float]:
    rc = main(["eval", f"models:/{model}@champion", "--classifier", "models:/tiny-noisy-classifier@champion",
               "--data", str(store.data_dir), "--num", str(num), "--steps", "3", "--tracking-uri", store.uri])
    assert rc == 0
    out = capsys.readouterr().out
    m = re.search(r"class accuracy ([\d.]+)\s+FID ([-\d.]+)", out)
    assert m, out
    return {"class_accuracy": float(m[1]), "fid": float(m[2])}


def _expected(store, fake: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    classifier, _ = load_exported(store.dirs["tiny-noisy-classifier"])
    real = torch.from_numpy(load_split(store.data_dir, "test")["image"])
    return sample_metrics(fake, labels, real, classifier)


def test_eval_of_a_class_conditional_model_matches_a_direct_computation(tiny_mlflow, capsys):
    got = _run(capsys, tiny_mlflow, "tiny-ddpm", 30)
    labels = torch.arange(30) % 10
    want = _expected(tiny_mlflow, generate(load_generator(tiny_mlflow.dirs["tiny-ddpm"]), labels, steps=3, seed=0),
                     labels)
    assert got["class_accuracy"] == pytest.approx(want["class_accuracy"], abs=5e-4)
    assert got["fid"] == pytest.approx(want["fid"], abs=5e-4)


def test_eval_of_a_text_model_draws_the_held_out_captions(tiny_mlflow, capsys):
    got = _run(capsys, tiny_mlflow, "tiny-text-untrained", 24)
    test = load_split(tiny_mlflow.data_dir, "test")
    assert all(test["caption"][:24])  # the digits carry a caption per image
    gen = load_generator(tiny_mlflow.dirs["tiny-text-untrained"])
    fake = generate_from_captions(gen, list(test["caption"][:24]), steps=3, seed=0)
    want = _expected(tiny_mlflow, fake, torch.as_tensor(test["label"][:24]))
    assert got["class_accuracy"] == pytest.approx(want["class_accuracy"], abs=5e-4)
    assert got["fid"] == pytest.approx(want["fid"], abs=5e-4)


def test_eval_refuses_models_it_does_not_measure(tiny_mlflow):
    for name, kind in (("tiny-controlnet", "controlnet"), ("tiny-noisy-classifier", "classifier")):
        with pytest.raises(SystemExit, match=f"is a {kind} model"):
            main(["eval", f"models:/{name}@champion", "--classifier", "models:/tiny-noisy-classifier@champion",
                  "--data", str(tiny_mlflow.data_dir), "--tracking-uri", tiny_mlflow.uri])
