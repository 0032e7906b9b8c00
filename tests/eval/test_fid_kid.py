"""FID and KID of `sample_metrics`: against direct numpy computations on the same classifier features, and
their behaviour on sets whose distance is known (a set against itself, held-out digits, uniform noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data import build_dataset, load_split
from pipeline.eval import sample_metrics
from pipeline.models import build_model
from tests.eval.conftest import frechet_distance, unbiased_mmd2


@dataclass
class Digits:
    """The bundled 8x8 digits and a briefly trained classifier whose features FID/KID use."""

    train: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    classifier: torch.nn.Module


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    d = tmp_path_factory.mktemp("fid-digits")
    build_dataset("digits", d, image_size=8, seed=0)
    train, test = load_split(d, "train"), load_split(d, "test")
    x, y = torch.from_numpy(train["image"]), torch.from_numpy(train["label"]).long()
    torch.manual_seed(0)
    clf = build_model("classifier", in_channels=1, num_classes=10, model_channels=8, channel_mult=[1, 2],
                      num_res_blocks=1)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):  # a few seconds: features that tell digits from noise (about 60% test accuracy)
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Digits(x, torch.from_numpy(test["image"]), torch.from_numpy(test["label"]).long(), clf.eval())


def _features(clf: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return clf.features(images).double().numpy()  # (N, feature_dim)


def test_fid_matches_a_direct_frechet_distance_of_the_clamped_samples(digits: Digits):
    fake = digits.test * 1.5  # partly outside [-1, 1]: the metric sees the samples clamped, as drawn images
    got = sample_metrics(fake, digits.test_labels, digits.train, digits.classifier)
    want = frechet_distance(_features(digits.classifier, fake.clamp(-1, 1)), _features(digits.classifier,
                                                                                        digits.train))
    assert want > 0
    assert got["fid"] == pytest.approx(want, rel=1e-6)
    unclamped = frechet_distance(_features(digits.classifier, fake), _features(digits.classifier, digits.train))
    assert abs(unclamped - want) > 1e-3 * want  # the clamp changes the answer: the check above sees it
    with torch.no_grad():
        acc = (digits.classifier(fake.clamp(-1, 1)).argmax(-1) == digits.test_labels).double().mean().item()
    assert got["class_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_kid_matches_a_direct_unbiased_mmd(digits: Digits):
    # equal sizes under 200: every KID subset holds all samples, so the mean over subsets is one MMD^2
    fake, real = digits.test[:150], digits.train[:150]
    got = sample_metrics(fake, digits.test_labels[:150], real, digits.classifier)
    a, b = _features(digits.classifier, real), _features(digits.classifier, fake)
    want = unbiased_mmd2(a, b)
    assert got["kid"] == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert got["kid_std"] == pytest.approx(0.0, abs=1e-6 * abs(want) + 1e-15)
    noise = torch.rand(150, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = sample_metrics(noise, digits.test_labels[:150], real, digits.classifier)
    assert got["kid"] == pytest.approx(unbiased_mmd2(a, _features(digits.classifier, noise)), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero(digits: Digits):
    held_out = sample_metrics(digits.test, digits.test_labels, digits.train, digits.classifier)["fid"]
    same = sample_metrics(digits.train, torch.zeros(len(digits.train), dtype=torch.long), digits.train,
                          digits.classifier)["fid"]
    assert held_out > 0
    assert abs(same) < 1e-6 * held_out


def test_noise_is_much_farther_from_the_digits_than_held_out_digits(digits: Digits):
    held = sample_metrics(digits.test, digits.test_labels, digits.train, digits.classifier)
    noise = torch.rand(len(digits.test), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = sample_metrics(noise, digits.test_labels, digits.train, digits.classifier)
    assert far["fid"] > 20 * held["fid"] > 0
    assert far["kid"] > 10 * abs(held["kid"]) and far["kid"] > 5 * far["kid_std"]
    assert held["class_accuracy"] > 0.4 > 0.2 > far["class_accuracy"]  # the features carry the digits
