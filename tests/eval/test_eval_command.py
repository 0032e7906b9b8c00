"""`pipeline eval`: FID/KID and class accuracy of a registered class- or caption-conditioned model."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.cli import main
from pipeline.data import load_split
from pipeline.diffusion import Schedule, sample_ddim
from pipeline.train.export import load_exported
from tests.eval.conftest import DIFFUSION, frechet_distance

# The expected numbers below do not go through what `pipeline eval` calls (generate, generate_from_captions,
# sample_metrics, load_generator): samples come from the sampler itself on the model's own forward, FID from a
# numpy Fréchet distance of the classifier's features and accuracy from its argmax. The CLI prints FID to 3
# decimals (about 0.009 here), so its numbers are read at full precision from a spy on sample_metrics.


def _run(capsys, monkeypatch, store, model: str, num: int) -> dict[str, float]:
    """Run `pipeline eval`; the metrics at full precision (a spy on sample_metrics: it still runs), checked
    against the printed line."""
    import pipeline.eval

    seen: list[dict[str, float]] = []
    real_metrics = pipeline.eval.sample_metrics

    def spy(*args, **kwargs) -> dict[str, float]:
        seen.append(real_metrics(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(pipeline.eval, "sample_metrics", spy)
    rc = main(["eval", f"models:/{model}@champion", "--classifier", "models:/tiny-noisy-classifier@champion",
               "--data", str(store.data_dir), "--num", str(num), "--steps", "3", "--tracking-uri", store.uri])
    assert rc == 0 and len(seen) == 1
    out = capsys.readouterr().out
    m = re.search(r"class accuracy ([\d.]+)\s+FID ([-\d.]+)\s+KID ([-\d.]+)", out)
    assert m, out
    got = seen[0]
    assert (m[1], m[2], m[3]) == (f"{got['class_accuracy']:.3f}", f"{got['fid']:.3f}", f"{got['kid']:.4f}")
    return got


def _ddim(fn, num: int) -> torch.Tensor:
    """3 DDIM steps (eta 0) of the tiny models' schedule from x_T ~ N(0, I) drawn with seed 0 (the CLI default)."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((num, 1, 8, 8), generator=g)
    with torch.no_grad():
        return sample_ddim(fn, Schedule.make(DIFFUSION["schedule"], DIFFUSION["timesteps"]), x_t, 3,
                           parameterization=DIFFUSION["parameterization"], generator=g)


def _expected(store, fake: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    classifier, _ = load_exported(store.dirs["tiny-noisy-classifier"])
    real = torch.from_numpy(load_split(store.data_dir, "test")["image"])
    fake = fake.clamp(-1, 1)
    with torch.no_grad():
        f_real, f_fake = classifier.features(real).double().numpy(), classifier.features(fake).double().numpy()
        acc = float((classifier(fake).argmax(-1) == labels).double().mean())
    return {"class_accuracy": acc, "fid": frechet_distance(f_real, f_fake)}


def test_eval_of_a_class_conditional_model_matches_a_direct_computation(tiny_mlflow, capsys, monkeypatch):
    got = _run(capsys, monkeypatch, tiny_mlflow, "tiny-ddpm", 30)
    model, _ = load_exported(tiny_mlflow.dirs["tiny-ddpm"])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)  # each class in turn
    want = _expected(tiny_mlflow, _ddim(lambda x, t: model(x, t, y=labels), 30), labels)
    assert got["class_accuracy"] == pytest.approx(want["class_accuracy"], abs=1e-6)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-5)


def test_eval_of_a_text_model_draws_the_held_out_captions(tiny_mlflow, capsys, monkeypatch):
    got = _run(capsys, monkeypatch, tiny_mlflow, "tiny-text-untrained", 24)
    test = load_split(tiny_mlflow.data_dir, "test")
    captions = [str(c) for c in test["caption"][:24]]
    assert all(captions)  # the digits carry a caption per image
    model, _ = load_exported(tiny_mlflow.dirs["tiny-text-untrained"])
    fake = _ddim(lambda x, t: model(x, t, captions=captions), 24)  # the model encodes its captions itself
    want = _expected(tiny_mlflow, fake, torch.as_tensor(test["label"][:24]))
    assert got["class_accuracy"] == pytest.approx(want["class_accuracy"], abs=1e-6)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-5)


def test_eval_refuses_models_it_does_not_measure(tiny_mlflow):
    for name, kind in (("tiny-controlnet", "controlnet"), ("tiny-noisy-classifier", "classifier")):
        with pytest.raises(SystemExit, match=f"is a {kind} model"):
            main(["eval", f"models:/{name}@champion", "--classifier", "models:/tiny-noisy-classifier@champion",
                  "--data", str(tiny_mlflow.data_dir), "--tracking-uri", tiny_mlflow.uri])
