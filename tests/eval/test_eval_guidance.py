"""Classifier guidance with a registered noisy classifier (`pipeline sample --classifier`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.diffusion import Schedule
from pipeline.eval import generate
from pipeline.eval.guidance import (
    GuidanceError,
    check_classifier,
    classifier_cond_fn,
    mean_log_prob,
    noise_level_map,
    noisy_classifier_schedule,
)
from pipeline.models import build_model
from pipeline.stages import load_generator
from pipeline.train.export import load_exported

LABELS = torch.arange(100) % 10


@pytest.fixture(scope="module")
def guided_setup(tiny_store):
    gen = load_generator(tiny_store.dirs["tiny-ddpm"])
    clf, meta = load_exported(tiny_store.dirs["tiny-noisy-classifier"])
    check_classifier(clf, meta, gen)
    return gen, clf


# measured (seed 0, 100 samples): ddim −1.746 → −1.70 at w = 1; ancestral −1.788 → −1.676 at s = 10
@pytest.mark.parametrize(("sampler", "scale", "margin"), [("ddim", 1.0, 0.02), ("ancestral", 10.0, 0.05)])
def test_guidance_raises_target_class_log_prob(guided_setup, sampler, scale, margin):
    gen, clf = guided_setup
    cond_fn = classifier_cond_fn(clf, gen.schedule)
    plain = generate(gen, LABELS, steps=10, sampler=sampler, seed=0)
    off = generate(gen, LABELS, steps=10, sampler=sampler, seed=0, cond_fn=cond_fn, classifier_scale=0.0)
    guided = generate(gen, LABELS, steps=10, sampler=sampler, seed=0, cond_fn=cond_fn, classifier_scale=scale)
    assert torch.equal(plain, off)  # scale 0 is exactly unguided
    lp_plain, lp_guided = mean_log_prob(clf, plain, LABELS), mean_log_prob(clf, guided, LABELS)
    assert lp_guided > lp_plain + margin, (lp_plain, lp_guided)
    assert guided.abs().max() < 5.0  # guided samples stay in the data range


def test_ddim_guidance_at_pure_noise_is_switched_off(guided_setup):
    """Without the ᾱ cut-off eq. 38 at ᾱ_T ≈ 4e-6 is amplified ~500x by eq. 41 and the samples explode."""
    gen, clf = guided_setup
    verbatim = classifier_cond_fn(clf, gen.schedule, min_alpha_bar=0.0)
    x = generate(gen, LABELS[:20], steps=10, sampler="ddim", seed=0, cond_fn=verbatim, classifier_scale=1.0)
    assert x.abs().max() > 10.0
    cut = classifier_cond_fn(clf, gen.schedule)
    t_last = torch.full((2,), gen.schedule.num_timesteps - 1)
    assert torch.count_nonzero(cut(torch.randn(2, 1, 8, 8), t_last, torch.tensor([0, 1]))) == 0


def test_noise_levels_map_onto_the_classifier_schedule():
    cls = noisy_classifier_schedule()
    assert (cls.num_timesteps, round(float(cls.betas[-1]), 3)) == (1000, 0.999)
    assert torch.equal(noise_level_map(cls, cls), torch.arange(1000))
    m = noise_level_map(Schedule.make("cosine", 50), cls)
    assert m.shape == (50,) and bool((m[1:] >= m[:-1]).all()) and int(m[-1]) == 999


def test_classifier_in_a_different_input_space_is_a_clear_error(guided_setup):
    gen, _ = guided_setup
    args = {"in_channels": 4, "num_classes": 10, "model_channels": 8}
    wrong = build_model("classifier", **args)
    with pytest.raises(GuidanceError, match="4 input channels .* pixel inputs have 1"):
        check_classifier(wrong, {"name": "classifier", "args": args, "extra": {"kind": "classifier", "noisy": True}},
                         gen)
    clean = build_model("classifier", in_channels=1, num_classes=10, model_channels=8)
    with pytest.raises(GuidanceError, match="noisy"):
        check_classifier(clean, {"args": {}, "extra": {"kind": "classifier", "noisy": False}}, gen)


def test_sample_command_with_classifier_guidance(tiny_mlflow, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sample", "models:/tiny-ddpm@champion", "--classifier", "models:/tiny-noisy-classifier@champion",
               "--classifier-scale", "3", "--sampler", "ancestral", "--steps", "5", "--num", "8", "--nrow", "4",
               "--out", str(out), "--tracking-uri", tiny_mlflow.uri])
    assert rc == 0
    assert "classifier guidance 3" in capsys.readouterr().out
    plain = tmp_path / "plain.png"
    rc = main(["sample", "models:/tiny-ddpm@champion", "--sampler", "ancestral", "--steps", "5", "--num", "8",
               "--nrow", "4", "--out", str(plain), "--tracking-uri", tiny_mlflow.uri])
    assert rc == 0 and "classifier guidance" not in capsys.readouterr().out
    guided, unguided = (np.asarray(Image.open(p).convert("L"), dtype=np.int16) for p in (out, plain))
    assert guided.shape == unguided.shape == ((2 * 9 + 1) * 4, (4 * 9 + 1) * 4)  # 2 rows of 4 tiles, ×4
    assert np.abs(guided - unguided).max() > 10  # the classifier's gradient moved the same-seed samples
    with pytest.raises(SystemExit, match="needs --classifier"):
        main(["sample", "models:/tiny-ddpm@champion", "--classifier-scale", "3", "--out", str(out),
              "--tracking-uri", tiny_mlflow.uri])
