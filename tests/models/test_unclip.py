"""unCLIP (notes 2.6.2, eq. 49): the contrastive loss, the CLIP pair, the embedding prior, the decoder, sampling
and the spec checks of jobs/unclip.yaml. Fast: tiny models, no Ray."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import SpecError, parse_spec, read_yaml
from pipeline.diffusion import Schedule, sample_ddim
from pipeline.eval.unclip import class_text_embeddings, sample_decoder, sample_prior
from pipeline.models import build_model
from pipeline.models.clip import drop_embeddings, from_diffusion_space, to_diffusion_space
from pipeline.models.text import build_vocab, captions_to_bytes
from pipeline.objectives.contrastive import caption_groups, clip_loss, contrastive_targets, zero_shot_predict
from pipeline.train.unclip_task import ClipDecoderTask, ClipPriorTask, ClipTask

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a handwritten digit zero", "a handwritten digit one", "the digit two, written by hand",
            "a handwritten digit three"]


def _text_encoder() -> dict:
    return {"name": "trainable", "args": {"vocab": build_vocab(CAPTIONS), "width": 16, "depth": 1, "heads": 2,
                                          "max_length": 8}}


def _clip(embed_dim: int = 8):
    return build_model("clip", text_encoder=_text_encoder(), embed_dim=embed_dim, in_channels=1, model_channels=8,
                       channel_mult=[1], num_res_blocks=1)


# ----------------------------------------------------------------------------- contrastive loss


def test_clip_loss_matches_a_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 · I Tᵀ = [[2, 1.2], [0, 1.6]]; each row's / column's CE is log(1 + e^-(margin))
    rows = math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))
    cols = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))
    loss, parts = clip_loss(image, text, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx(0.25 * (rows + cols), rel=1e-6)
    assert parts["temperature"].item() == pytest.approx(0.5)
    assert parts["image_to_text_accuracy"].item() == 1.0  # both images prefer their own caption


def test_clip_loss_with_repeated_captions_spreads_the_target_over_the_group():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(3, 4), dim=-1)
    text = F.normalize(torch.randn(3, 4), dim=-1)
    groups = caption_groups(["a", "b", "a"])
    assert groups.tolist() == [0, 1, 0]
    target = contrastive_targets(groups, 3)
    assert target.tolist() == [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    logits = 3.0 * image @ text.t()
    by_hand = 0.0
    for lg in (logits, logits.t()):
        for i in range(3):
            logz = math.log(sum(math.exp(v) for v in lg[i].tolist()))
            by_hand += sum(-target[i, j].item() * (lg[i, j].item() - logz) for j in range(3)) / 3
    loss, _ = clip_loss(image, text, torch.tensor(math.log(3.0)), groups)
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-5)


def test_clip_loss_is_small_when_aligned_and_large_when_swapped():
    e = torch.eye(4)
    aligned, parts = clip_loss(e, e, torch.tensor(math.log(50.0)))
    swapped, parts_swapped = clip_loss(e, e.flip(0), torch.tensor(math.log(50.0)))
    assert aligned.item() < 1e-6 and swapped.item() > 40
    assert parts["image_to_text_accuracy"] == 1.0 and parts_swapped["image_to_text_accuracy"] == 0.0


def test_zero_shot_predict_picks_the_most_similar_class():
    classes = torch.eye(3)
    images = F.normalize(torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.1, 0.7], [1.0, 0.5, 0.4]]), dim=-1)
    assert zero_shot_predict(images, classes).tolist() == [1, 2, 0]


# ----------------------------------------------------------------------------- CLIP model


def test_clip_model_embeds_to_unit_norm_and_equal_captions_embed_equally():
    model = _clip(embed_dim=8).eval()
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    image_emb, text_emb, scale = model(images, [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]])
    assert image_emb.shape == text_emb.shape == (3, 8)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_emb[0], text_emb[2]) and not torch.allclose(text_emb[0], text_emb[1])
    assert scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-5)


def test_clip_training_aligns_images_with_their_captions():
    torch.manual_seed(0)
    model = _clip(embed_dim=8)
    images = torch.stack([torch.full((1, 8, 8), v) for v in (-0.9, -0.3, 0.3, 0.9)])  # four distinct images
    images = images + 0.05 * torch.randn_like(images)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, parts = clip_loss(*model(images, CAPTIONS))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    assert parts["image_to_text_accuracy"].item() == 1.0
    assert model.logit_scale.grad is not None  # the temperature is learned


def test_class_text_embeddings_average_each_class_distinct_captions():
    model = _clip().eval()
    captions = ["a handwritten digit zero", "the digit two, written by hand", "a handwritten digit zero",
                "a handwritten digit one"]
    classes = class_text_embeddings(model, captions, [0, 1, 0, 0], 3)
    e = model.encode_text(["a handwritten digit zero", "a handwritten digit one", "the digit two, written by hand"])
    assert torch.allclose(classes[0], F.normalize(e[0] + e[1], dim=-1), atol=1e-5)  # duplicates count once
    assert torch.allclose(classes[1], e[2], atol=1e-5)
    assert torch.equal(classes[2], torch.zeros(8))  # no caption of class 2


# ----------------------------------------------------------------------------- prior and decoder


def test_embedding_scaling_round_trips_and_has_unit_mean_square():
    e = F.normalize(torch.randn(5, 32), dim=-1)
    x = to_diffusion_space(e)
    assert torch.allclose(x.pow(2).mean(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(from_diffusion_space(x), e, atol=1e-6)


def test_drop_embeddings_zeroes_exactly_the_dropped_rows():
    e = torch.randn(4, 3)
    out = drop_embeddings(e, torch.tensor([True, False, True, False]))
    assert torch.equal(out[[0, 2]], torch.zeros(2, 3)) and torch.equal(out[[1, 3]], e[[1, 3]])


def test_prior_output_shape_and_null_condition():
    prior = build_model("clip_prior", embed_dim=8, width=16, depth=2)
    with torch.no_grad():
        for p in prior.parameters():  # leave the zero initialisation so the text embedding matters
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(3, 8), torch.tensor([0, 500, 999])
    y = F.normalize(torch.randn(3, 8), dim=-1)
    out = prior(x, t, y=y)
    assert out.shape == (3, 8)
    assert torch.allclose(prior(x, t), prior(x, t, y=torch.zeros(3, 8)))  # None is the ∅ condition
    assert not torch.allclose(out, prior(x, t))


def test_decoder_cross_attends_to_the_embedding():
    dec = build_model("clip_decoder", denoiser={"name": "unet", "args": {
        "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [2], "num_heads": 2}},
        embed_dim=8, tokens=2, context_dim=16)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    assert torch.equal(dec(x, t, embedding=torch.randn(2, 8)), torch.zeros(2, 1, 8, 8))  # zero-initialised output
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.05 * torch.randn_like(p))
    e = F.normalize(torch.randn(2, 8), dim=-1)
    out = dec(x, t, embedding=e)
    assert out.shape == (2, 1, 8, 8)
    assert not torch.allclose(out, dec(x, t, embedding=e.flip(0)))
    assert torch.allclose(dec(x, t), dec(x, t, embedding=torch.zeros(2, 8)))
    with pytest.raises(ValueError, match="not on class labels"):
        build_model("clip_decoder", denoiser={"name": "unet", "args": {"in_channels": 1, "num_classes": 10}})


def _meta(shape, parameterization="x0"):
    return {"extra": {"diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": parameterization},
                      "sample_shape": shape}}


def test_guidance_is_classifier_free_against_the_zero_embedding():
    """sample_prior / sample_decoder with guidance w: DDIM on (1 + w) ε(c) − w ε(0) (eq. 40), from the seed's x_T."""
    prior = build_model("clip_prior", embed_dim=8, width=16, depth=1).eval()
    for p in prior.parameters():  # non-zero blocks, so that the condition matters
        torch.nn.init.normal_(p, std=0.2)
    text, w = F.normalize(torch.randn(3, 8), dim=-1), 1.5

    def direct(model_fn_c, shape, parameterization):
        g = torch.Generator().manual_seed(3)
        xT = torch.randn((3, *shape), generator=g)
        fn = lambda x, t: ((1 + w) * model_fn_c(x, t, text) - w * model_fn_c(x, t, torch.zeros_like(text)))  # noqa: E731
        with torch.no_grad():
            return sample_ddim(fn, Schedule.make("cosine", 100), xT, 4, parameterization=parameterization, generator=g)

    got = sample_prior(prior, _meta([8]), text, steps=4, guidance=w, seed=3)
    want = F.normalize(direct(lambda x, t, c: prior(x, t, y=c), [8], "x0"), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unguided = sample_prior(prior, _meta([8]), text, steps=4, guidance=0.0, seed=3)
    assert (unguided - got).abs().max() > 1e-3

    dec = build_model("clip_decoder", denoiser={"name": "unet", "args": {
        "in_channels": 1, "model_channels": 8, "channel_mult": [1], "attention_resolutions": [1], "num_heads": 2}},
        embed_dim=8, tokens=1, context_dim=8).eval()
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.2)
    got = sample_decoder(dec, _meta([1, 8, 8], "v"), text, steps=4, guidance=w, seed=3)
    want = direct(lambda x, t, c: dec(x, t, embedding=c), [1, 8, 8], "v").clamp(-1, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sample_prior_gives_unit_norm_embeddings_reproducibly():
    prior = build_model("clip_prior", embed_dim=8, width=16, depth=1).eval()
    text = F.normalize(torch.randn(5, 8), dim=-1)
    a = sample_prior(prior, _meta([8]), text, steps=4, guidance=2.0, seed=3, batch_size=2)
    b = sample_prior(prior, _meta([8]), text, steps=4, guidance=2.0, seed=3, batch_size=2)
    assert a.shape == (5, 8) and torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(a, b)


def test_sample_decoder_is_the_clamped_guided_ddim_draw():
    dec = build_model("clip_decoder", denoiser={"name": "unet", "args": {
        "in_channels": 1, "model_channels": 8, "channel_mult": [1], "attention_resolutions": [1], "num_heads": 2}},
        embed_dim=8, tokens=1, context_dim=8).eval()
    torch.manual_seed(0)
    for p in dec.parameters():  # large non-zero weights: draws reach outside [-1, 1] before the clamp
        torch.nn.init.normal_(p, std=0.2)
    emb = F.normalize(torch.randn(3, 8), dim=-1)
    x = sample_decoder(dec, _meta([1, 8, 8], "v"), emb, steps=3, guidance=1.0)
    g = torch.Generator().manual_seed(0)  # the default seed's x_T, then DDIM on (1 + w) f(c) − w f(0), w = 1
    x_t = torch.randn((3, 1, 8, 8), generator=g)
    with torch.no_grad():
        raw = sample_ddim(lambda v, t: 2 * dec(v, t, embedding=emb) - dec(v, t, embedding=torch.zeros_like(emb)),
                          Schedule.make("cosine", 100), x_t, 3, parameterization="v", generator=g)
    assert x.shape == (3, 1, 8, 8)
    assert (raw.abs() > 1).any() and (raw.abs() < 0.9).any()  # the clamp cuts some values and keeps others
    torch.testing.assert_close(x, raw.clamp(-1, 1), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- tasks


def _batch(n: int = 4) -> dict:
    return {"image": torch.rand(n, 1, 8, 8) * 2 - 1, "label": torch.arange(n),
            "caption_bytes": captions_to_bytes(CAPTIONS[:n])}


def test_clip_task_fills_channels_and_rejects_a_conflicting_value():
    stage = {"model": {"name": "clip", "args": {"embed_dim": 8, "model_channels": 8, "channel_mult": [1]}}}
    task = ClipTask(stage, _text_encoder(), in_channels=1)
    model = task.build_model()
    loss, parts = task.loss(model, _batch(), torch.Generator().manual_seed(0))
    assert loss.isfinite() and set(parts) == {"image_to_text_accuracy", "temperature"}
    assert task.model_recipe()[1]["text_encoder"]["args"]["vocab"][:3] == ["<pad>", "<bos>", "<unk>"]
    bad = copy.deepcopy(stage)
    bad["model"]["args"]["in_channels"] = 3
    with pytest.raises(ValueError, match="in_channels=3 but the images have 1"):
        ClipTask(bad, _text_encoder(), in_channels=1)
    with pytest.raises(ValueError, match="needs captions"):
        task.loss(model, {"image": torch.zeros(2, 1, 8, 8), "label": torch.zeros(2)}, torch.Generator())


class _Spy(torch.nn.Module):
    """A denoiser that records the condition it was given."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(y)
        return self.lin(x)


def test_prior_task_trains_on_scaled_image_embeddings_and_drops_text_for_cfg():
    clip = _clip(embed_dim=8)
    meta = {"name": "clip", "extra": {"kind": "clip"}}
    stage = {"model": {"name": "clip_prior", "args": {"width": 16, "depth": 1}},
             "diffusion": {"timesteps": 50, "parameterization": "x0", "label_dropout": 1.0}}
    task = ClipPriorTask(stage, clip, meta)
    assert task.model_recipe()[1] == {"width": 16, "depth": 1, "embed_dim": 8, "text_dim": 8}
    spy = _Spy(8)
    loss, _ = task.loss(spy, _batch(), torch.Generator().manual_seed(0))
    assert loss.isfinite() and torch.equal(spy.seen[-1], torch.zeros(4, 8))  # every caption dropped to ∅
    task.diffusion["label_dropout"] = 0.0
    task.loss(spy, _batch(), torch.Generator().manual_seed(0))
    assert torch.allclose(spy.seen[-1].norm(dim=-1), torch.ones(4), atol=1e-5)  # unit-norm text embeddings
    with pytest.raises(ValueError, match="L_simple|loss: simple"):
        ClipPriorTask({**stage, "diffusion": {"loss": "hybrid"}}, clip, meta)
    with pytest.raises(ValueError, match="needs a CLIP model"):
        ClipDecoderTask({"model": {"name": "unet", "args": {}}}, torch.nn.Linear(2, 2), {"name": "unet"}, {})


# ----------------------------------------------------------------------------- spec validation


def _raw() -> dict:
    return read_yaml(ROOT / "jobs" / "unclip.yaml")


def test_unclip_job_parses():
    spec = parse_spec(_raw(), "unclip.yaml")
    assert [s.kind for s in spec.stages.values()] == ["classifier", "clip", "clip_prior", "unclip_decoder"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["stages"]["prior"].update(needs=["classifier"]),
     "stages.prior.needs: a clip_prior stage needs a clip stage, but 'classifier' is a classifier stage"),
    (lambda r: r["stages"]["decoder"].update(needs=["clip"]),
     "needs exactly two stages: the clip stage and the clip_prior"),
    (lambda r: r["stages"]["decoder"].update(needs=["clip", "classifier"]),
     "needs one clip stage and one clip_prior stage, got clip (clip), classifier (classifier)"),
    (lambda r: r["stages"]["prior"]["diffusion"].update(loss="hybrid", learn_sigma=True), "diffusion.loss: simple"),
    (lambda r: r["stages"]["clip"]["model"].update(name="unet"), "a clip stage trains the `clip` model"),
    (lambda r: r["stages"]["decoder"]["sampling"].update(classifier="classifier", classifier_scale=1.0),
     "classifier-free guidance only"),
    (lambda r: r["stages"]["clip"]["text_encoder"]["args"].update(colour="red"), "unknown argument(s) 'colour'"),
])
def test_bad_unclip_specs_name_the_problem(edit, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "unclip.yaml")
    assert message in str(info.value)


def test_decoder_and_prior_must_share_the_clip_stage():
    raw = _raw()
    raw["stages"] = {"clip": raw["stages"]["clip"], "clip2": copy.deepcopy(raw["stages"]["clip"]),
                     "prior": raw["stages"]["prior"], "decoder": raw["stages"]["decoder"]}
    raw["stages"]["clip2"]["register"]["name"] = "other-clip"
    raw["stages"]["decoder"]["needs"] = ["clip2", "prior"]
    raw["eval"]["classifier"] = None
    with pytest.raises(SpecError, match="the clip_prior stage 'prior' was trained on 'clip', not on 'clip2'"):
        parse_spec(raw, "unclip.yaml")
