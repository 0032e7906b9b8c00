"""unCLIP's three networks (notes 2.6.2, eq. 49): a contrastive image–text encoder pair (CLIP), a diffusion
prior over CLIP image embeddings given the text embedding, and a decoder conditioned on the image embedding.

* ``clip`` (:class:`ClipModel`): image encoder = the classifier backbone (:class:`NoisyClassifier` at t = 0)
  whose linear head projects to ``embed_dim``; text encoder = a text encoder of :mod:`pipeline.models.text`
  (pooled) plus a linear projection. Both embeddings are L2-normalised; ``logit_scale`` is the learnable
  log inverse temperature of the contrastive loss (:func:`pipeline.objectives.contrastive.clip_loss`).
* ``clip_prior`` (:class:`EmbeddingPrior`): a residual MLP denoiser of the image embedding c_i (in
  diffusion space, see :func:`to_diffusion_space`) at timestep t, conditioned on the text embedding;
  models P(c_i | y) of eq. 49.
* ``clip_decoder`` (:class:`ClipImageDecoder`): a denoiser (``unet``) cross-attending to ``tokens``
  context tokens projected from c_i (eq. 47-48); models P(x | c_i) of eq. 49 (the optional text y is
  not used).

For both conditional models the zero vector is the ∅ condition of classifier-free guidance (eq. 40):
real embeddings have unit norm, so it cannot be mistaken for one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import build_model, register
from pipeline.models.classifier import NoisyClassifier
from pipeline.models.layers import TimestepEmbedder


def to_diffusion_space(embedding: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings (B, D) scaled by √D, so that each coordinate has unit mean square — the scale
    the noise schedules assume of data."""
    return embedding * math.sqrt(embedding.shape[-1])


def from_diffusion_space(x: torch.Tensor) -> torch.Tensor:
    """A sampled point of the prior (B, D) back to a unit-norm CLIP embedding."""
    return F.normalize(x.float(), dim=-1)


def drop_embeddings(embedding: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``embedding`` (B, D) with the rows where ``drop`` (B,) is True set to zero: the ∅ condition (eq. 40)."""
    return embedding * (~drop).to(embedding.dtype).unsqueeze(-1)


@register("clip")
class ClipModel(nn.Module):
    """``forward(images, captions) -> (image_emb (B, D), text_emb (B, D), logit_scale ())``; embeddings unit-norm.

    ``text_encoder`` is ``{"name": "trainable" | "minilm", "args": {...}}`` (a trainable encoder's word
    vocabulary included, see :func:`pipeline.train.text_task.resolve_text_encoder`).
    """

    def __init__(self, text_encoder: dict[str, Any], embed_dim: int = 32, in_channels: int = 1,
                 model_channels: int = 32, channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (), num_heads: int = 4,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        from pipeline.models.text import build_text_encoder

        if embed_dim < 2:
            raise ValueError(f"embed_dim must be at least 2, got {embed_dim}")
        if not 0 < init_temperature < 1:
            raise ValueError(f"init_temperature must be in (0, 1), got {init_temperature}")
        self.embed_dim = embed_dim
        self.image_encoder = NoisyClassifier(in_channels, embed_dim, model_channels, channel_mult, num_res_blocks,
                                             attention_resolutions, num_heads)
        self.text_encoder = build_text_encoder(text_encoder)
        self.text_proj = nn.Linear(int(self.text_encoder.dim), embed_dim)
        # (1,), not a 0-dim tensor: DeepSpeed broadcasts parameters as byte views
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) of images (B, C, H, W) in [-1, 1]."""
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def encode_text(self, captions: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """Unit-norm text embeddings (B, D) of captions."""
        device = self.text_proj.weight.device if device is None else device
        _, pooled = self.text_encoder(list(captions), device=device)
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)).float(), dim=-1)

    def forward(self, images: torch.Tensor, captions: Sequence[str]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = self.logit_scale.clamp(max=self.max_log_scale).squeeze(0)  # CLIP's cap on 1/temperature
        return self.encode_image(images), self.encode_text(captions, device=images.device), scale


class _CondBlock(nn.Module):
    """Residual MLP block: x + W2 SiLU(W1 (LN(x)(1 + scale) + shift)), scale/shift from the conditioning."""

    def __init__(self, width: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.SiLU(), nn.Linear(mlp_ratio * width, width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)
        nn.init.zeros_(self.mlp[2].weight)  # the block starts as the identity
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(cond).chunk(2, dim=-1)
        return x + self.mlp(torch.addcmul(shift, self.norm(x), 1 + scale))


@register("clip_prior")
class EmbeddingPrior(nn.Module):
    """Diffusion prior denoiser ``forward(x, t, y=None) -> (B, embed_dim)`` (P(c_i | y), eq. 49).

    ``x``: noisy image embeddings (B, embed_dim) in diffusion space; ``y``: text embeddings (B, text_dim),
    zero rows (or ``None``) being the ∅ condition. The text embedding enters twice: added to the input
    tokens and, with the timestep, as the modulation of every block.
    """

    def __init__(self, embed_dim: int = 32, text_dim: int | None = None, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.embed_dim = embed_dim
        self.text_dim = text_dim or embed_dim
        self.in_proj = nn.Linear(embed_dim, width)
        self.text_in = nn.Linear(self.text_dim, width)
        self.text_cond = nn.Linear(self.text_dim, width)
        self.time_embed = TimestepEmbedder(width, frequency_size=min(256, 2 * width))
        self.blocks = nn.ModuleList(_CondBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, D), t: (B,), y: (B, text_dim) or None -> (B, D)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if y is None:
            y = torch.zeros(x.shape[0], self.text_dim, device=x.device, dtype=x.dtype)
        y = y.to(self.in_proj.weight.dtype)
        h = self.in_proj(x.to(self.in_proj.weight.dtype)) + self.text_in(y)
        cond = self.time_embed(t) + self.text_cond(y)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)


@register("clip_decoder")
class ClipImageDecoder(nn.Module):
    """A denoiser conditioned on a CLIP image embedding: ``forward(x, t, y=None, embedding=None)``.

    The embedding (B, embed_dim) is projected to ``tokens`` context tokens of width ``context_dim`` that
    the denoiser cross-attends to (eq. 47-48); a zero row (or ``embedding=None``) is the ∅ condition.
    """

    def __init__(self, denoiser: dict[str, Any], embed_dim: int = 32, tokens: int = 4, context_dim: int = 64) -> None:
        super().__init__()
        args = dict(denoiser.get("args") or {})
        if args.get("num_classes"):
            raise ValueError("the unCLIP decoder is conditioned on the CLIP image embedding, not on class labels: "
                             "remove num_classes from its model args")
        if args.get("context_dim") not in (None, context_dim):
            raise ValueError(f"the denoiser's context_dim ({args['context_dim']}) differs from the decoder's "
                             f"context_dim ({context_dim}); leave it out of the denoiser's args")
        if tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {tokens}")
        args["context_dim"] = context_dim
        self.embed_dim, self.tokens, self.context_dim = embed_dim, tokens, context_dim
        self.denoiser = build_model(denoiser["name"], **args)
        self.to_tokens = nn.Linear(embed_dim, tokens * context_dim)
        self.token_norm = nn.LayerNorm(context_dim)

    def context(self, embedding: torch.Tensor) -> torch.Tensor:
        """The context sequence (B, tokens, context_dim) of image embeddings (B, embed_dim)."""
        ctx = self.to_tokens(embedding.to(self.to_tokens.weight.dtype))
        return self.token_norm(ctx.view(len(embedding), self.tokens, self.context_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                embedding: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), embedding: (B, embed_dim) or None -> (B, C, H, W)."""
        if y is not None:
            raise ValueError("the unCLIP decoder takes a CLIP image embedding, not class labels")
        if embedding is None:
            embedding = torch.zeros(x.shape[0], self.embed_dim, device=x.device, dtype=x.dtype)
        return self.denoiser(x, t, context=self.context(embedding))


__all__ = ["ClipImageDecoder", "ClipModel", "EmbeddingPrior", "drop_embeddings", "from_diffusion_space",
           "to_diffusion_space"]
