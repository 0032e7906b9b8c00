"""Text-conditioned latent diffusion: the training task and the stage runner behind `conditioning: text`.

The denoiser cross-attends to τ_θ(caption) (eq. 47-48). Captions reach the workers as fixed-width
UTF-8 byte tensors (``caption_bytes``, see :func:`pipeline.models.text.captions_to_bytes`); a
fraction ``diffusion.label_dropout`` of them is replaced by the empty caption, the ∅ condition of
classifier-free guidance (eq. 40). A trainable encoder is trained jointly with the denoiser (one
DeepSpeed engine, one EMA, one export); the frozen ``minilm`` encoder runs under ``no_grad`` and is
not part of the exported weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.diffusion import condition_dropout
from pipeline.models import build_model
from pipeline.models.text import build_vocab, bytes_to_captions
from pipeline.train.tasks import DiffusionTask

log = logging.getLogger("pipeline")


def batch_captions(batch: dict[str, Any], who: str) -> list[str]:
    """The captions of a training batch; a clear error naming ``who`` needs them when the data has none."""
    if "caption_bytes" not in batch:
        raise ValueError(f"{who} needs captions in the training batches (the data has no caption column)")
    return bytes_to_captions(batch["caption_bytes"])


def drop_captions(captions: list[str], drop: torch.Tensor) -> list[str]:
    """The captions with those where ``drop`` is True replaced by the empty caption (the CFG ∅)."""
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]


def resolve_text_encoder(spec: dict[str, Any], captions: list[str] | None) -> dict[str, Any]:
    """The text encoder spec a stage trains with: a `trainable` word-tokenizer encoder without a
    vocabulary gets one built from the training captions (stored in the model's recipe)."""
    spec = {"name": spec.get("name", "trainable"), "args": dict(spec.get("args") or {})}
    args = spec["args"]
    if spec["name"] == "trainable" and args.get("tokenizer", "word") == "word" and not args.get("vocab"):
        if not captions or not any(c.strip() for c in captions):
            raise ValueError("the training data has no captions to build the text encoder's word vocabulary "
                             "from; set text_encoder.args.tokenizer: byte")
        args["vocab"] = build_vocab(captions)
    return spec


class TextDiffusionTask(DiffusionTask):
    """DDPM training of a :class:`pipeline.models.text.TextConditioned` denoiser on captioned batches."""

    def __init__(self, stage: dict[str, Any], num_classes: int, data: dict[str, Any], text_encoder: dict[str, Any]):
        super().__init__(stage, num_classes, data)
        self.text_encoder = text_encoder

    def _recipe_args(self) -> dict[str, Any]:
        return {"denoiser": {"name": self.model_spec["name"], "args": dict(self.model_spec.get("args") or {})},
                "text_encoder": self.text_encoder}

    def build_model(self) -> nn.Module:
        return build_model("text_conditioned", **self._recipe_args())

    def loss(self, model, batch, gen):
        x0 = batch["image"]
        captions = batch_captions(batch, "conditioning: text")
        drop = condition_dropout(len(x0), self.diffusion.get("label_dropout", 0.1), x0.device, gen)
        captions = drop_captions(captions, drop)  # classifier-free guidance's ∅ condition (eq. 40)
        return self.denoising_loss(lambda xt, tt: model(xt, tt, captions=captions), x0, gen)

    def model_recipe(self):
        return "text_conditioned", self._recipe_args()

    def export_extra(self):
        return {**super().export_extra(), "conditioning": "text", "text_encoder_name": self.text_encoder["name"]}


def run_text_diffusion(ctx, name: str, key: str, run_id: str, data_dir: Path, num_classes: int,
                       data_info: dict[str, Any]) -> tuple[Path, dict[str, float]]:
    """Stage runner for a `diffusion` stage with `conditioning: text`: train on captioned latents (or
    pixels) with Ray Train, then sample from held-out captions and measure the samples."""
    from pipeline.data import TRAIN_SAMPLE_LIMIT, load_split
    from pipeline.eval.text import evaluate_text_generator
    from pipeline.stages import _fit, pixel_dataset

    stage = ctx.spec.stages[name]
    captions = load_split(data_dir, "train", on_corrupt=ctx.spec.data.on_corrupt, limit=TRAIN_SAMPLE_LIMIT)["caption"]
    text_encoder = resolve_text_encoder(stage.text_encoder.model_dump(), captions)
    if "vocab" in text_encoder["args"]:
        log.info("[%s] text encoder %s, word vocabulary of %d from %d training captions", name,
                 text_encoder["name"], len(text_encoder["args"]["vocab"]), len(captions))
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, data_dir),
                  {"num_classes": num_classes, "data_info": data_info, "text_encoder": text_encoder})
    s = stage.sampling
    metrics = evaluate_text_generator(ctx, run_id, export, data_dir, steps=s.steps, guidance=s.guidance,
                                      num_samples=min(s.num_samples, ctx.spec.eval.num_samples),
                                      sampler=s.sampler, eta=s.eta)
    return export, metrics
