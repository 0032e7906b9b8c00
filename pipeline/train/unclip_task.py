"""unCLIP's training tasks (notes 2.6.2, eq. 49): the CLIP pair, the diffusion prior, the decoder.

* :class:`ClipTask` trains image and text encoders together with the symmetric contrastive loss on the
  captioned training images (:func:`pipeline.objectives.contrastive.clip_loss`).
* :class:`ClipPriorTask` learns P(c_i | y): DDPM (Algorithm 1) over the frozen CLIP's image embedding
  c_i of each training image (scaled to diffusion space, :func:`pipeline.models.clip.to_diffusion_space`),
  conditioned on the text embedding of its caption, dropped to ∅ at rate ``diffusion.label_dropout``.
* :class:`ClipDecoderTask` learns P(x | c_i): DDPM over the images conditioned on their own CLIP image
  embedding, dropped to ∅ at the same rate (classifier-free guidance, eq. 40).

The prior and the decoder get the registered CLIP model (frozen, eval mode) like the VQ prior gets its
autoencoder; its embeddings are computed from each batch and are not part of their exported weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.diffusion import condition_dropout
from pipeline.models import build_model
from pipeline.models.clip import drop_embeddings, to_diffusion_space
from pipeline.objectives.contrastive import caption_groups, clip_loss
from pipeline.train.tasks import make_schedule, on_device, spec_diffusion_loss
from pipeline.train.text_task import batch_captions


def clip_args(spec_args: dict[str, Any], text_encoder: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """The `clip` model's constructor arguments: the spec's, plus the resolved text encoder and the data's
    channel count (a conflicting value in the spec is an error)."""
    args = dict(spec_args)
    if "text_encoder" in args:
        raise ValueError("set the CLIP text encoder with the stage's `text_encoder` key, not model.args.text_encoder")
    if args.get("in_channels", in_channels) != in_channels:
        raise ValueError(f"model.args.in_channels={args['in_channels']} but the images have {in_channels} "
                         "channel(s); leave it out, the clip stage fills it in")
    return {**args, "in_channels": in_channels, "text_encoder": text_encoder}


class ClipTask:
    """Contrastive training of the `clip` image–text encoder pair.

    Each worker contrasts the pairs of its own micro-batch (``train.batch_size / workers`` of them); the
    negatives are not gathered across workers.
    """

    def __init__(self, stage: dict[str, Any], text_encoder: dict[str, Any], in_channels: int):
        self.model_spec = stage["model"]
        self.args = clip_args(self.model_spec.get("args") or {}, text_encoder, in_channels)

    def build_model(self) -> nn.Module:
        return build_model(self.model_spec["name"], **self.args)

    def loss(self, model, batch, gen):
        captions = batch_captions(batch, "a clip stage")
        image_emb, text_emb, logit_scale = model(batch["image"], captions)
        return clip_loss(image_emb, text_emb, logit_scale, caption_groups(captions, image_emb.device))

    def model_recipe(self):
        return self.model_spec["name"], self.args

    def export_extra(self):
        return {"kind": "clip", "embed_dim": int(self.args.get("embed_dim", 32))}


class _FrozenClip:
    """A frozen CLIP model moved to the batch's device on first use."""

    def __init__(self, clip: nn.Module, clip_meta: dict[str, Any], kind: str):
        if not hasattr(clip, "encode_image") or not hasattr(clip, "encode_text"):
            raise ValueError(f"a {kind} stage needs a CLIP model (kind clip); its input is a "
                             f"{clip_meta.get('name')!r}")
        self.clip = clip.eval().requires_grad_(False)
        self.meta = clip_meta
        self.embed_dim = int(clip.embed_dim)

    @torch.no_grad()
    def images(self, x: torch.Tensor) -> torch.Tensor:
        self._to(x.device)
        return self.clip.encode_image(x.float())

    @torch.no_grad()
    def texts(self, captions: list[str], device: torch.device) -> torch.Tensor:
        self._to(device)
        return self.clip.encode_text(captions, device=device)

    def _to(self, device: torch.device) -> None:
        if next(self.clip.parameters()).device != device:
            self.clip = self.clip.to(device)


def check_simple_diffusion(diffusion: dict[str, Any], kind: str) -> None:
    """unCLIP's diffusion models train with L_simple and a fixed variance (the hybrid VLB measures pixels)."""
    if diffusion.get("loss", "simple") != "simple" or diffusion.get("learn_sigma"):
        raise ValueError(f"a {kind} stage trains with diffusion.loss: simple and learn_sigma: false")


class ClipPriorTask:
    """DDPM over CLIP image embeddings given the text embedding: P(c_i | y) of eq. 49."""

    def __init__(self, stage: dict[str, Any], clip: nn.Module, clip_meta: dict[str, Any],
                 data: dict[str, Any] | None = None):
        self.clip = _FrozenClip(clip, clip_meta, "clip_prior")
        self.model_spec = stage["model"]
        self.diffusion = dict(stage.get("diffusion") or {})
        check_simple_diffusion(self.diffusion, "clip_prior")
        self.schedule = make_schedule(self.diffusion)
        self.data = dict(data or {})  # the CLIP model's registry URI
        args = dict(self.model_spec.get("args") or {})
        for key in ("embed_dim", "text_dim"):
            if args.get(key, self.clip.embed_dim) != self.clip.embed_dim:
                raise ValueError(f"model.args.{key}={args[key]} but the CLIP model embeds in {self.clip.embed_dim} "
                                 "dimensions; leave it out, the clip_prior stage fills it in")
            args[key] = self.clip.embed_dim
        self.args = args

    def build_model(self) -> nn.Module:
        return build_model(self.model_spec["name"], **self.args)

    def loss(self, model, batch, gen):
        captions = batch_captions(batch, "a clip_prior stage")
        x = batch["image"]
        c_i = to_diffusion_space(self.clip.images(x))  # (B, D): the prior's x_0
        c_t = self.clip.texts(captions, x.device)  # (B, D)
        drop = condition_dropout(len(x), self.diffusion.get("label_dropout", 0.1), x.device, gen)
        c_t = drop_embeddings(c_t, drop)  # ∅ condition of classifier-free guidance (eq. 40)
        self.schedule = on_device(self.schedule, x.device)
        return spec_diffusion_loss(lambda xt, tt: model(xt, tt, y=c_t), self.schedule, self.diffusion, c_i, gen)

    def model_recipe(self):
        return self.model_spec["name"], self.args

    def export_extra(self):
        return {"kind": "clip_prior", "diffusion": self.diffusion, "sample_shape": [self.clip.embed_dim],
                **self.data}


class ClipDecoderTask:
    """DDPM over images conditioned on their CLIP image embedding: P(x | c_i) of eq. 49."""

    def __init__(self, stage: dict[str, Any], clip: nn.Module, clip_meta: dict[str, Any], data: dict[str, Any]):
        self.clip = _FrozenClip(clip, clip_meta, "unclip_decoder")
        self.model_spec = stage["model"]
        self.diffusion = dict(stage.get("diffusion") or {})
        check_simple_diffusion(self.diffusion, "unclip_decoder")
        self.schedule = make_schedule(self.diffusion)
        self.data = dict(data)  # sample_shape and the CLIP model's registry URI
        self.args = {"denoiser": {"name": self.model_spec["name"], "args": dict(self.model_spec.get("args") or {})},
                     "embed_dim": self.clip.embed_dim, "tokens": int(stage.get("embedding_tokens", 4)),
                     "context_dim": int(stage.get("context_dim", 64))}

    def build_model(self) -> nn.Module:
        return build_model("clip_decoder", **self.args)

    def loss(self, model, batch, gen):
        x0 = batch["image"]
        c_i = self.clip.images(x0)  # (B, D)
        drop = condition_dropout(len(x0), self.diffusion.get("label_dropout", 0.1), x0.device, gen)
        c_i = drop_embeddings(c_i, drop)  # ∅ condition of classifier-free guidance (eq. 40)
        self.schedule = on_device(self.schedule, x0.device)
        return spec_diffusion_loss(lambda xt, tt: model(xt, tt, embedding=c_i), self.schedule, self.diffusion, x0,
                                   gen)

    def model_recipe(self):
        return "clip_decoder", self.args

    def export_extra(self):
        return {"kind": "unclip_decoder", "diffusion": self.diffusion, **self.data}
