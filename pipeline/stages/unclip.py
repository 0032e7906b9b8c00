"""unCLIP's stages (notes 2.6.2, eq. 49): `clip`, `clip_prior` and `unclip_decoder`.

* `clip`: trains the contrastive image–text pair on the captioned training split; evaluation is zero-shot
  classification of held-out images against one text embedding per class (the mean over the class's
  training captions), `eval/zero_shot_accuracy`.
* `clip_prior`: trains P(c_i | y) on the registered CLIP's embeddings; evaluation samples image embeddings
  for held-out captions and compares them with the true embeddings of the held-out images (cosine, and
  the text embedding itself as the no-prior baseline) and with the class text embeddings (zero-shot
  accuracy of the sampled embeddings).
* `unclip_decoder`: trains P(x | c_i); evaluation samples text → prior → decoder for held-out captions
  (a grid, one row per class caption; class accuracy / FID / KID with the job's eval classifier, with and
  without guidance) and decodes the true embeddings of held-out images (reconstruction accuracy, and a
  grid of variations: a held-out image, then decodings of its embedding).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import tracking
from pipeline.config import SpecError

log = logging.getLogger("pipeline")


def _load_clip(ref: tracking.ModelRef, name: str):
    from pipeline.train.export import load_exported

    model, meta = load_exported(tracking.download(ref))
    if meta["extra"].get("kind") != "clip":
        raise SpecError(f"stage '{name}' needs a CLIP model, but {ref.uri} is a {meta['extra'].get('kind')!r} model")
    return model, meta


def _class_embeddings(clip, train: dict[str, Any], num_classes: int) -> torch.Tensor:
    """One text embedding per class: the mean over the class's distinct training captions."""
    from pipeline.eval.unclip import class_text_embeddings

    return class_text_embeddings(clip, train["caption"], train["label"], num_classes)


def run_clip(ctx, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict[str, float]]:
    """Train the CLIP pair; zero-shot accuracy of held-out images against the class text embeddings."""
    from pipeline.data import TRAIN_SAMPLE_LIMIT, load_split, read_manifest
    from pipeline.eval.text import class_captions
    from pipeline.eval.unclip import cosine, encode_images, encode_texts
    from pipeline.objectives.contrastive import zero_shot_predict
    from pipeline.stages import _fit, pixel_dataset
    from pipeline.train.export import load_exported
    from pipeline.train.text_task import resolve_text_encoder

    stage = ctx.spec.stages[name]
    manifest = read_manifest(ctx.data_dir)
    train = load_split(ctx.data_dir, "train", on_corrupt=ctx.spec.data.on_corrupt, limit=TRAIN_SAMPLE_LIMIT)
    try:
        text_encoder = resolve_text_encoder(stage.text_encoder.model_dump(), train["caption"])
    except ValueError as exc:
        raise SpecError(f"stages.{name}.text_encoder: {exc}") from None
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir),
                  {"text_encoder": text_encoder, "in_channels": manifest.image_size[2]})
    clip, _ = load_exported(export)
    test = load_split(ctx.data_dir, "test", on_corrupt=ctx.spec.data.on_corrupt, limit=ctx.spec.eval.held_out_samples)
    labels = torch.from_numpy(test["label"]).long()
    image_emb = encode_images(clip, torch.from_numpy(test["image"]))
    ensemble = _class_embeddings(clip, train, manifest.num_classes)
    single = encode_texts(clip, class_captions(train["caption"], train["label"], manifest.num_classes))
    metrics = {
        "eval/zero_shot_accuracy": float((zero_shot_predict(image_emb, ensemble) == labels).float().mean()),
        "eval/zero_shot_accuracy_one_caption": float((zero_shot_predict(image_emb, single) == labels).float().mean()),
        "eval/pair_cosine": cosine(image_emb, encode_texts(clip, test["caption"])),
        "eval/temperature": float(torch.exp(-clip.logit_scale.detach().clamp(max=clip.max_log_scale))),
    }
    log.info("[%s] zero-shot accuracy on %d held-out images: %.3f", name, len(labels),
             metrics["eval/zero_shot_accuracy"])
    return export, metrics


def run_clip_prior(ctx, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict[str, float]]:
    """Train the prior on the registered CLIP's embeddings; score sampled embeddings for held-out captions."""
    from pipeline.data import TRAIN_SAMPLE_LIMIT, load_split, read_manifest
    from pipeline.eval.unclip import class_centroids, cosine, encode_images, encode_texts, sample_prior
    from pipeline.objectives.contrastive import zero_shot_predict
    from pipeline.stages import _fit, pixel_dataset
    from pipeline.train.export import load_exported

    stage = ctx.spec.stages[name]
    (_, clip_ref), = inputs.items()
    clip, _ = _load_clip(clip_ref, name)
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir),
                  {"inputs": {"clip": {"uri": clip_ref.source}}, "data_info": {"clip": clip_ref.uri}})
    prior, meta = load_exported(export)

    test = load_split(ctx.data_dir, "test", on_corrupt=ctx.spec.data.on_corrupt, limit=ctx.spec.eval.held_out_samples)
    train = load_split(ctx.data_dir, "train", on_corrupt=ctx.spec.data.on_corrupt, limit=TRAIN_SAMPLE_LIMIT)
    n = min(stage.sampling.num_samples, ctx.spec.eval.num_samples, len(test["label"]))
    labels = torch.from_numpy(test["label"][:n]).long()
    true_emb = encode_images(clip, torch.from_numpy(test["image"][:n]))
    text_emb = encode_texts(clip, test["caption"][:n])
    num_classes = read_manifest(ctx.data_dir).num_classes
    classes = _class_embeddings(clip, train, num_classes)
    centroids = class_centroids(encode_images(clip, torch.from_numpy(train["image"])),
                                torch.from_numpy(train["label"]), num_classes)
    s = stage.sampling
    metrics: dict[str, float] = {
        "eval/text_cosine_baseline": cosine(text_emb, true_emb),  # the text embedding itself as c_i: no prior
        "eval/true_zero_shot_accuracy": float((zero_shot_predict(true_emb, classes) == labels).float().mean()),
    }
    for prefix, guidance in (("", s.guidance), ("unguided_", 0.0)):
        if prefix and not s.guidance:
            break
        t0 = time.perf_counter()
        sampled = sample_prior(prior, meta, text_emb, steps=s.steps, guidance=guidance, sampler=s.sampler, eta=s.eta,
                               seed=ctx.spec.seed)
        metrics.update({
            f"eval/{prefix}cosine_to_true": cosine(sampled, true_emb),
            f"eval/{prefix}zero_shot_accuracy": float((zero_shot_predict(sampled, classes) == labels).float().mean()),
            f"eval/{prefix}centroid_accuracy": float((zero_shot_predict(sampled, centroids) == labels).float().mean()),
        })
        if not prefix:
            metrics["eval/samples_per_sec"] = n / (time.perf_counter() - t0)
    log.info("[%s] sampled image embeddings for %d held-out captions: cosine to the true ones %.3f (text "
             "embedding: %.3f), zero-shot accuracy %.3f", name, n, metrics["eval/cosine_to_true"],
             metrics["eval/text_cosine_baseline"], metrics["eval/zero_shot_accuracy"])
    return export, metrics


def _split_inputs(ctx, name: str, inputs: dict[str, tracking.ModelRef]) -> tuple[str, tracking.ModelRef, str,
                                                                                   tracking.ModelRef]:
    kinds = {n: ctx.spec.stages[n].kind for n in inputs}
    clip_name = next(n for n, k in kinds.items() if k == "clip")
    prior_name = next(n for n, k in kinds.items() if k == "clip_prior")
    return clip_name, inputs[clip_name], prior_name, inputs[prior_name]


def run_unclip_decoder(ctx, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict[str, float]]:
    """Train the decoder on the registered CLIP's image embeddings; sample text → prior → decoder (eq. 49)."""
    from mlflow.tracking import MlflowClient

    from pipeline.data import load_split, read_manifest
    from pipeline.eval import classify, image_grid, sample_metrics
    from pipeline.eval.text import class_captions
    from pipeline.eval.unclip import cosine, cycle_indices, encode_images, encode_texts, sample_decoder, text_to_image
    from pipeline.stages import _classifier, _fit, _log_png, pixel_dataset
    from pipeline.train.export import load_exported

    stage = ctx.spec.stages[name]
    clip_name, clip_ref, prior_name, prior_ref = _split_inputs(ctx, name, inputs)
    clip, _ = _load_clip(clip_ref, name)
    prior, prior_meta = load_exported(tracking.download(prior_ref))
    if prior_meta["extra"].get("clip") != clip_ref.uri:
        raise SpecError(f"stage '{name}': the prior {prior_ref.uri} was trained on {prior_meta['extra'].get('clip')}, "
                        f"not on {clip_ref.uri} (stage '{clip_name}'); re-run stage '{prior_name}'")
    manifest = read_manifest(ctx.data_dir)
    h, w, c = manifest.image_size
    ps = ctx.spec.stages[prior_name].sampling
    pri_kw = {"steps": ps.steps, "guidance": ps.guidance, "sampler": ps.sampler, "eta": ps.eta}
    data_info = {"sample_shape": [c, h, w], "clip": clip_ref.uri, "prior": prior_ref.uri, "prior_sampling": pri_kw}
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir),
                  {"inputs": {"clip": {"uri": clip_ref.source}}, "data_info": data_info})
    decoder, meta = load_exported(export)

    s = stage.sampling
    dec_kw = {"steps": s.steps, "guidance": s.guidance, "sampler": s.sampler, "eta": s.eta}
    test = load_split(ctx.data_dir, "test", on_corrupt=ctx.spec.data.on_corrupt, limit=ctx.spec.eval.held_out_samples)
    n = min(s.num_samples, ctx.spec.eval.num_samples)
    idx = cycle_indices(n, len(test["label"]))
    captions = [test["caption"][i] for i in idx]
    labels = torch.from_numpy(test["label"][idx]).long()
    real = torch.from_numpy(test["image"])

    t0 = time.perf_counter()
    fake, _ = text_to_image(clip, prior, prior_meta, decoder, meta, captions,
                            prior_kw={**pri_kw, "seed": ctx.spec.seed}, decoder_kw={**dec_kw, "seed": ctx.spec.seed})
    secs = time.perf_counter() - t0
    text_emb = encode_texts(clip, captions)
    real_emb = encode_images(clip, real[idx])
    metrics: dict[str, float] = {"eval/samples_per_sec": n / secs,
                                 "eval/clip_similarity": cosine(encode_images(clip, fake), text_emb),
                                 "eval/real_clip_similarity": cosine(real_emb, text_emb)}
    rows = class_captions(test["caption"], test["label"], manifest.num_classes)
    grid, _ = text_to_image(clip, prior, prior_meta, decoder, meta, [r for r in rows for _ in range(8)],
                            prior_kw={**pri_kw, "seed": ctx.spec.seed + 1},
                            decoder_kw={**dec_kw, "seed": ctx.spec.seed + 1})
    _log_png(run_id, image_grid(grid, nrow=8, scale=4), "samples/grid.png")
    MlflowClient().log_text(run_id, "\n".join(f"row {k}: {r}" for k, r in enumerate(rows)), "samples/grid_captions.txt")
    # variations: a held-out image, then 7 decodings of its CLIP image embedding
    k = min(8, len(real))
    emb = encode_images(clip, real[:k])
    variations = sample_decoder(decoder, meta, emb.repeat_interleave(7, 0), seed=ctx.spec.seed + 2, **dec_kw)
    shown = torch.cat([real[:k, None], variations.view(k, 7, *variations.shape[1:])], dim=1).flatten(0, 1)
    _log_png(run_id, image_grid(shown, nrow=8, scale=4), "samples/variations_grid.png")

    classifier = _classifier(ctx)
    if classifier is not None:
        metrics.update({f"eval/{m}": v for m, v in sample_metrics(fake, labels, real, classifier).items()})
        recon = sample_decoder(decoder, meta, real_emb, seed=ctx.spec.seed, **dec_kw)
        metrics["eval/reconstruction_class_accuracy"] = float((classify(classifier, recon) == labels).float().mean())
        if s.guidance or ps.guidance:
            plain, _ = text_to_image(clip, prior, prior_meta, decoder, meta, captions,
                                     prior_kw={**pri_kw, "guidance": 0.0, "seed": ctx.spec.seed},
                                     decoder_kw={**dec_kw, "guidance": 0.0, "seed": ctx.spec.seed})
            metrics["eval/unguided_class_accuracy"] = float((classify(classifier, plain) == labels).float().mean())
        log.info("[%s] text → image class accuracy on %d held-out captions: %.3f (from true image embeddings: "
                 "%.3f)", name, n, metrics["eval/class_accuracy"], metrics["eval/reconstruction_class_accuracy"])
    return export, metrics


def sample_unclip(decoder_dir: str | Path, captions: list[str], *, steps: int | None = None, guidance: float = 0.0,
                  sampler: str = "ddim", eta: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Text → image (eq. 49) from a registered unCLIP decoder with the CLIP model and prior its export names;
    the prior samples with the settings of the prior stage the decoder was evaluated with."""
    from pipeline.eval.unclip import text_to_image
    from pipeline.train.export import load_exported

    decoder, meta = load_exported(decoder_dir)
    extra = meta["extra"]
    clip, _ = load_exported(tracking.download(tracking.resolve(extra["clip"])))
    prior, prior_meta = load_exported(tracking.download(tracking.resolve(extra["prior"])))
    prior_kw = {"steps": 32, "guidance": 1.0, "sampler": "ddim", "eta": 0.0, **extra.get("prior_sampling", {})}
    images, _ = text_to_image(clip, prior, prior_meta, decoder, meta, captions, prior_kw={**prior_kw, "seed": seed},
                              decoder_kw={"steps": steps or 25, "guidance": guidance, "sampler": sampler, "eta": eta,
                                          "seed": seed})
    return images


def unclip_runners() -> dict[str, Any]:
    """The stage runners of this module, by stage kind."""
    return {"clip": run_clip, "clip_prior": run_clip_prior, "unclip_decoder": run_unclip_decoder}
