"""Noise conditioning augmentation (notes 2.6.1) and the super-resolution task's inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.diffusion.cond_aug import (
    augment,
    blur_augment,
    downsample,
    from_residual,
    gaussian_blur,
    gaussian_kernel1d,
    level_index,
    noise_augment,
    random_levels,
    to_residual,
    upsample_bicubic,
)
from pipeline.train.superres_task import SuperResTask, sample_stage, sr_condition, sr_inputs, sr_model_args


def test_noise_augment_is_eq17_with_gamma_as_noise_std():
    x = torch.tensor([[[[0.5, -1.0]]], [[[0.2, 0.8]]]])
    eps = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 0.5]]]])
    gamma = torch.tensor([0.0, 0.6])
    z = noise_augment(x, gamma, eps)
    assert torch.equal(z[0], x[0])  # level 0: untouched
    # hand computation: sqrt(1 - 0.36) = 0.8
    torch.testing.assert_close(z[1], torch.tensor([[[0.8 * 0.2 - 0.6, 0.8 * 0.8 + 0.6 * 0.5]]]))


def test_noise_augment_preserves_unit_variance():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(20000, 1, 1, 1, generator=g), torch.randn(20000, 1, 1, 1, generator=g)
    z = noise_augment(x, torch.full((20000,), 0.7), eps)
    assert abs(float(z.var()) - 1.0) < 0.03
    assert abs(float((z * x).mean()) - math.sqrt(1 - 0.49)) < 0.03  # correlation with the clean input


def test_gaussian_kernel_closed_form():
    w = gaussian_kernel1d(1.0)
    assert len(w) == 7  # radius ceil(3 sigma) = 3
    k = torch.arange(-3, 4, dtype=torch.float64)
    expected = torch.exp(-k**2 / 2)
    torch.testing.assert_close(w, expected / expected.sum())
    assert torch.equal(gaussian_kernel1d(0.0), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError):
        gaussian_kernel1d(-1.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_gaussian_blur_matches_scipy(sigma):
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    ours = gaussian_blur(x, sigma)
    # scipy's mode="mirror" (d c b | a b c d) is torch's "reflect" padding; truncate=3 gives the same radius
    ref = gaussian_filter(x.numpy().astype(np.float64), sigma=(0, 0, sigma, sigma), truncate=3.0, mode="mirror")
    torch.testing.assert_close(ours, torch.from_numpy(ref).float(), rtol=1e-5, atol=1e-5)


def test_blur_keeps_constants_and_mean_and_is_per_sample():
    x = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.2), x)
    imgs = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    out = blur_augment(imgs, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(out[0], imgs[0]) and torch.equal(out[2], imgs[2])
    torch.testing.assert_close(out[1:2], gaussian_blur(imgs[1:2], 1.0))
    assert float(out[1].std()) < float(imgs[1].std())  # a low-pass filter
    with pytest.raises(ValueError, match="unknown conditioning augmentation"):
        augment(imgs, "jpeg", torch.zeros(3))


def test_down_and_bicubic_up():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    d = downsample(x, 2)
    torch.testing.assert_close(d, torch.tensor([[[[x[0, 0, :2, :2].mean(), x[0, 0, :2, 2:].mean()],
                                                 [x[0, 0, 2:, :2].mean(), x[0, 0, 2:, 2:].mean()]]]]))
    with pytest.raises(ValueError, match="integer factor"):
        downsample(torch.zeros(1, 1, 6, 6), 4)
    # bicubic reproduces a constant image and is torch's bicubic kernel otherwise, clamped to [-1, 1]
    torch.testing.assert_close(upsample_bicubic(torch.full((1, 3, 4, 4), 0.25), 8), torch.full((1, 3, 8, 8), 0.25))
    big = torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]])
    up = upsample_bicubic(big, 8)
    assert up.shape == (1, 1, 8, 8) and float(up.abs().max()) <= 1.0
    ref = torch.nn.functional.interpolate(big, size=(8, 8), mode="bicubic", align_corners=False)
    assert float(ref.abs().max()) > 1.0  # the overshoot the clamp removes
    torch.testing.assert_close(up, ref.clamp(-1, 1))


def test_levels():
    levels = [0.0, 0.1, 0.3]
    assert [level_index(v, levels) for v in (0.0, 0.04, 0.06, 0.25, 5.0)] == [0, 0, 1, 2, 2]
    idx, values = random_levels(3000, levels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(values, torch.tensor(levels)[idx])
    counts = torch.bincount(idx, minlength=3).float() / 3000
    assert float((counts - 1 / 3).abs().max()) < 0.04  # uniform over the levels


def test_sr_inputs_shapes_and_conditioning():
    imgs = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    target, cond, idx = sr_inputs(imgs, 16, 8, "noise", [0.0], torch.Generator().manual_seed(1))
    assert target.shape == cond.shape == (6, 3, 16, 16) and idx.tolist() == [0] * 6
    torch.testing.assert_close(target, imgs)
    # level 0 only: the conditioning is exactly the bicubic upsampling of the area-downsampled image
    torch.testing.assert_close(cond, upsample_bicubic(downsample(imgs, 8), 16))
    # a downsampled target (size < data resolution)
    target, cond, _ = sr_inputs(imgs, 8, 4, "blur", [0.5, 1.0], torch.Generator().manual_seed(1))
    assert target.shape == cond.shape == (6, 3, 8, 8)
    torch.testing.assert_close(target, downsample(imgs, 8))


def test_blur_conditioning_is_an_independent_gaussian_blur_at_each_drawn_sigma():
    """sr_inputs with `kind: blur`: every sample's conditioning is the bicubic upsampling of its low-res image
    blurred (scipy, not our kernel) at its own σ, drawn per sample from the configured levels; σ = 0 is identity."""
    imgs = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    levels = [0.0, 0.5, 1.2]
    _, cond, idx = sr_inputs(imgs, 16, 8, "blur", levels, torch.Generator().manual_seed(4))
    assert set(idx.tolist()) == {0, 1, 2}  # per-sample draws cover the range, not one σ for the batch
    low = downsample(imgs, 8).numpy().astype(np.float64)
    for i, k in enumerate(idx.tolist()):
        s = levels[k]
        blurred = low[i] if s == 0 else gaussian_filter(low[i], sigma=(0, s, s), truncate=3.0, mode="mirror")
        ref = upsample_bicubic(torch.from_numpy(blurred).float()[None], 16)[0]
        torch.testing.assert_close(cond[i], ref, rtol=1e-5, atol=1e-5)
    identity = idx == 0
    torch.testing.assert_close(cond[identity], upsample_bicubic(downsample(imgs[identity], 8), 16))
    # the sampling-time conditioning at a fixed σ blurs every sample at that σ
    cond_s, idx_s = sr_condition(downsample(imgs[:4], 8), 16, "blur", levels, 0.45)
    assert idx_s.tolist() == [1] * 4
    ref = gaussian_filter(low[:4], sigma=(0, 0, 0.5, 0.5), truncate=3.0, mode="mirror")
    torch.testing.assert_close(cond_s, upsample_bicubic(torch.from_numpy(ref).float(), 16), rtol=1e-5, atol=1e-5)


def test_sampling_condition_snaps_the_level():
    low = torch.zeros(4, 3, 8, 8)
    cond, idx = sr_condition(low, 16, "noise", [0.0, 0.2, 0.5], 0.22, torch.Generator().manual_seed(0))
    assert idx.tolist() == [1] * 4 and cond.shape == (4, 3, 16, 16)
    noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cond, upsample_bicubic(0.2 * noise, 16))


def test_model_args_filled_in_and_contradictions_rejected():
    assert sr_model_args({"model_channels": 8}, 3, 8, 5, 7) == {
        "model_channels": 8, "in_channels": 6, "out_channels": 3, "num_classes": 5}
    assert sr_model_args({}, 3, None, 5, 7) == {"in_channels": 3, "out_channels": 3, "num_classes": 7}
    with pytest.raises(ValueError, match="in_channels"):
        sr_model_args({"in_channels": 3}, 3, 8, 5, 7)


STAGE = {"size": 8, "low_res": 4, "augment": {"kind": "noise", "levels": [0.0, 0.3, 0.6]},
         "model": {"name": "unet", "args": {"model_channels": 16, "channel_mult": [1, 2], "num_heads": 2}},
         "diffusion": {"timesteps": 100, "parameterization": "v"}}


def test_task_feeds_low_res_and_level_to_the_model():
    task = SuperResTask(STAGE, num_classes=7, data={"channels": 3, "cascade_input": None})
    model = task.build_model()
    assert model.conv_in.in_channels == 6 and model.label_embed.num_embeddings == 3 + 1
    seen = {}

    def spy(module, args, kwargs):
        seen["x"], seen["y"] = args[0], kwargs["y"]

    model.register_forward_pre_hook(spy, with_kwargs=True)
    imgs = torch.rand(5, 3, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(3)
    loss, parts = task.loss(model, {"image": imgs, "label": torch.zeros(5, dtype=torch.long)}, gen)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # replay the task's random draws: levels first, then the augmentation noise
    _, cond, idx = sr_inputs(imgs, 8, 4, "noise", [0.0, 0.3, 0.6], torch.Generator().manual_seed(3))
    assert torch.equal(seen["y"], idx)  # the level index is the class-like input
    torch.testing.assert_close(seen["x"][:, 3:], cond)  # channels 3..5: the upsampled augmented low-res
    assert seen["x"].shape == (5, 6, 8, 8)
    # the level embedding changes the output: the model is told the level
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(1, 6, 8, 8), torch.tensor([10])
        assert not torch.allclose(model(x, t, y=torch.tensor([0])), model(x, t, y=torch.tensor([2])))


def test_sampling_a_stage_gives_images_at_its_size():
    task = SuperResTask(STAGE, num_classes=7, data={"channels": 3, "cascade_input": None})
    model = task.build_model().eval()
    meta = {"extra": task.export_extra()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised output: conditioning shows in the samples
            p.add_(0.05 * torch.randn_like(p))
    out = sample_stage(model, meta, n=3, steps=2, seed=0, low=torch.zeros(3, 3, 4, 4), level=0.3)
    # the same draw by hand: augmentation noise of the low-res input first (γ = 0.3 on zeros: 0.3·ε), torch's
    # bicubic upsampling clamped, then x_T, 2 DDIM steps of the v-model on [x_t ‖ cond] at level index 1
    from pipeline.diffusion import Schedule, sample_ddim

    g = torch.Generator().manual_seed(0)
    cond = torch.nn.functional.interpolate(0.3 * torch.randn(3, 3, 4, 4, generator=g), size=(8, 8),
                                           mode="bicubic", align_corners=False).clamp(-1, 1)
    x_t = torch.randn(3, 3, 8, 8, generator=g)
    with torch.no_grad():
        raw = sample_ddim(lambda x, t: model(torch.cat([x, cond], 1), t, y=torch.ones(3, dtype=torch.long)),
                          Schedule.make("cosine", 100), x_t, 2, parameterization="v", generator=g)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, raw.clamp(-1, 1))
    assert float(raw.abs().max()) > 1.0  # the clamp is exercised


def test_residual_round_trip_and_task_target():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    cond = torch.rand(2, 3, 8, 8) * 2 - 1
    r = to_residual(x, cond, 0.2)
    torch.testing.assert_close(r, (x - cond) / 0.2)
    torch.testing.assert_close(from_residual(r, cond, 0.2), x)
    task = SuperResTask({**STAGE, "residual_scale": 0.2}, num_classes=7, data={"channels": 3, "cascade_input": None})
    imgs = torch.rand(4, 3, 16, 16) * 2 - 1
    x0, c, idx = task.inputs(imgs, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(5))
    target, cond, idx2 = sr_inputs(imgs, 8, 4, "noise", [0.0, 0.3, 0.6], torch.Generator().manual_seed(5))
    torch.testing.assert_close(x0, (target - cond) / 0.2)
    assert torch.equal(c, cond) and torch.equal(idx, idx2)
    assert task.export_extra()["residual_scale"] == 0.2


TEXT_ENC = {"name": "trainable", "args": {"tokenizer": "byte", "width": 16, "depth": 1, "heads": 2, "max_length": 12}}
CAPS = ["a handwritten digit three", "a handwritten seven", "the digit one", "a small scan of a five"]


def _text_task(low_res: int | None):
    stage = {**STAGE, "low_res": low_res, "conditioning": "text", "diffusion": {**STAGE["diffusion"],
                                                                              "label_dropout": 0.5}}
    return SuperResTask(stage, num_classes=7, data={"channels": 3, "cascade_input": None}, text_encoder=TEXT_ENC)


@pytest.mark.parametrize("low_res", [None, 4])
def test_text_stage_feeds_captions_with_cfg_dropout(low_res):
    """Imagen-style stage: the U-Net sees the caption context (∅ = "" for dropped captions), SR also the level."""
    from pipeline.models.text import captions_to_bytes

    task = _text_task(low_res)
    model = task.build_model()
    assert model.denoiser.context_dim == 16
    assert (model.denoiser.label_embed is None) == (low_res is None)  # a text base takes no class labels
    seen = {}
    model.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.zeros(4, dtype=torch.long),
             "caption_bytes": captions_to_bytes(CAPS)}
    loss, _ = task.loss(model, batch, gen)
    assert torch.isfinite(loss)
    ctx, _ = model.encode_text(CAPS)
    null, _ = model.encode_text([""] * 4)
    kept = [torch.allclose(seen["context"][i], ctx[i]) for i in range(4)]
    dropped = [torch.allclose(seen["context"][i], null[i]) for i in range(4)]
    assert all(k != d for k, d in zip(kept, dropped, strict=True))  # each caption is kept XOR replaced by ∅
    assert any(kept) and any(dropped)  # label_dropout 0.5 over 4 captions with this seed
    assert (seen.get("y") is None) == (low_res is None)
    with pytest.raises(ValueError, match="no caption column"):
        task.loss(model, {k: v for k, v in batch.items() if k != "caption_bytes"}, gen)


def test_text_stage_sampling_is_cfg_of_the_two_predictions():
    """sample_stage with guidance w on a text base = DDIM on (1+w)·f(x, c) − w·f(x, ∅) (eq. 40), computed directly."""
    from pipeline.diffusion import sample_ddim
    from pipeline.train.tasks import make_schedule

    task = _text_task(None)
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    meta = {"extra": task.export_extra()}
    out = sample_stage(model, meta, n=2, steps=3, seed=4, captions=CAPS[:2], guidance=2.0, threshold=0.9)
    g = torch.Generator().manual_seed(4)
    xT = torch.randn((2, 3, 8, 8), generator=g)
    ctx, _ = model.encode_text(CAPS[:2])
    null, _ = model.encode_text(["", ""])

    def fn(x, t):
        return 3.0 * model(x, t, context=ctx) - 2.0 * model(x, t, context=null)

    ref = sample_ddim(fn, make_schedule(task.diffusion), xT, 3, parameterization="v", threshold=0.9).clamp(-1, 1)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="samples from 2 captions"):
        sample_stage(model, meta, n=2, steps=1, seed=0)


def test_cascade_spec_rules_for_guidance_and_thresholds():
    from pydantic import ValidationError

    from pipeline.config import SuperResStage

    base = {"kind": "superres", "size": 16, "low_res": 8, "needs": ["b"], "model": {"name": "unet"},
            "train": {"steps": 1, "batch_size": 2},
            "register": {"name": "sr", "gate": {"metric": "eval/psnr_gain", "min": 0.0}}}
    SuperResStage(**{**base, "sampling": {"dynamic_threshold": 0.995}})
    for extra, msg in [({"sampling": {"guidance": 2.0}}, "no ∅ condition"),
                       ({"residual_scale": 0.2, "sampling": {"dynamic_threshold": 0.99}}, "predicts a residual"),
                       ({"sampling": {"dynamic_threshold": 0.3}}, "greater than 0.5"),
                       ({"sampling": {"sampler": "ancestral"}}, "DDIM"),
                       ({"conditioning": "text", "model": {"name": "unet", "args": {"num_classes": 3}}},
                        "takes no class labels")]:
        with pytest.raises(ValidationError, match=msg):
            SuperResStage(**{**base, **extra})
    text = SuperResStage(**{**base, "conditioning": "text", "sampling": {"guidance": 2.0}})
    assert text.text_encoder.name == "trainable"  # guidance on the caption is allowed, the encoder defaulted


def _cascade_stage(size: int, low_res: int | None, augment: dict, seed: int):
    """A tiny untrained cascade stage (1 channel) with perturbed weights, so its output depends on its input."""
    stage = {**STAGE, "size": size, "low_res": low_res, "augment": augment, "sampling": {"steps": 3}}
    task = SuperResTask(stage, num_classes=7, data={"channels": 1, "cascade_input": None})
    torch.manual_seed(seed)
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, {"extra": task.export_extra()}


def test_three_stage_cascade_feeds_each_stage_the_previous_output():
    """sample_cascade 4 → 8 → 16: every SR stage is sampled on the previous stage's output at its sample_level."""
    from pipeline.stages.superres import sample_cascade

    chain = [_cascade_stage(4, None, {}, 0),
             _cascade_stage(8, 4, {"kind": "noise", "levels": [0.0, 0.1], "sample_level": 0.1}, 1),
             _cascade_stage(16, 8, {"kind": "blur", "levels": [0.0, 0.5], "sample_level": 0.5}, 2)]
    labels = torch.tensor([1, 2])
    outs = sample_cascade(chain, labels, seed=5)
    assert [tuple(o.shape) for o in outs] == [(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 16, 16)]
    (m0, e0), (m1, e1), (m2, e2) = chain
    base = sample_stage(m0, e0, n=2, steps=3, seed=5, labels=labels)
    sr8 = sample_stage(m1, e1, n=2, steps=3, seed=6, low=base, level=0.1)
    sr16 = sample_stage(m2, e2, n=2, steps=3, seed=7, low=sr8, level=0.5)
    for got, want in zip(outs, (base, sr8, sr16), strict=True):
        torch.testing.assert_close(got, want)
    # the last stage's output depends on which image it was given (so the equality above is not vacuous)
    other = sample_stage(m2, e2, n=2, steps=3, seed=7, low=upsample_bicubic(base, 8), level=0.5)
    assert float((other - sr16).abs().max()) > 1e-3
