"""Sampling unCLIP (notes 2.6.2): text → CLIP text embedding → prior → image embedding → decoder → image.

Eq. 49, P(x | y) = P(x | c_i, y) P(c_i | y): c_i is drawn from the diffusion prior given the text embedding
of y, then x from the decoder given c_i. Both are DDIM (eq. 43) or ancestral samplers over the model's own
schedule, with classifier-free guidance (eq. 40) against the zero embedding, their ∅ condition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.eval import Generator, generate
from pipeline.models.clip import from_diffusion_space


def _draw(model: Callable[..., Tensor], meta: dict[str, Any], conds: Tensor, *, steps: int, guidance: float,
          sampler: str, eta: float, seed: int, batch_size: int) -> Tensor:
    """Samples of ``meta``'s sample_shape, one per row of ``conds`` (B, D): :func:`pipeline.eval.generate` with the
    embeddings as its conditions, ``model(x, t, y=embeddings)``. Their ∅ is the zero vector, which generate's
    classifier-free guidance (eq. 40) takes as its null "label" when ``num_classes`` is 0."""
    gen = Generator(model, {**meta, "extra": {**meta["extra"], "num_classes": 0}})
    return generate(gen, conds, steps=steps, guidance=guidance, sampler=sampler, eta=eta, seed=seed,
                    batch_size=batch_size)


@torch.no_grad()
def sample_prior(prior: nn.Module, meta: dict[str, Any], text_emb: Tensor, *, steps: int, guidance: float = 0.0,
                 sampler: str = "ddim", eta: float = 0.0, seed: int = 0, batch_size: int = 500) -> Tensor:
    """Unit-norm image embeddings (N, D) drawn from the prior P(c_i | y) given text embeddings (N, D)."""
    x = _draw(prior, meta, text_emb, steps=steps, guidance=guidance, sampler=sampler, eta=eta, seed=seed,
              batch_size=batch_size)
    return from_diffusion_space(x)


@torch.no_grad()
def sample_decoder(decoder: nn.Module, meta: dict[str, Any], image_emb: Tensor, *, steps: int,
                   guidance: float = 0.0, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
                   batch_size: int = 250) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] drawn from the decoder P(x | c_i) given image embeddings (N, D)."""
    x = _draw(lambda x, t, y: decoder(x, t, embedding=y), meta, image_emb, steps=steps, guidance=guidance,
              sampler=sampler, eta=eta, seed=seed, batch_size=batch_size)
    return x.clamp(-1, 1)


@torch.no_grad()
def text_to_image(clip: nn.Module, prior: nn.Module, prior_meta: dict[str, Any], decoder: nn.Module,
                  decoder_meta: dict[str, Any], captions: Sequence[str], *, prior_kw: dict[str, Any],
                  decoder_kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """unCLIP sampling (eq. 49): ``(images (N, C, H, W), the image embeddings they were decoded from (N, D))``.

    ``prior_kw`` / ``decoder_kw``: keyword arguments of :func:`sample_prior` / :func:`sample_decoder`
    (steps, guidance, sampler, eta, seed).
    """
    text_emb = encode_texts(clip, captions)
    image_emb = sample_prior(prior, prior_meta, text_emb, **prior_kw)  # c_i ~ P(c_i | y)
    return sample_decoder(decoder, decoder_meta, image_emb, **decoder_kw), image_emb  # x ~ P(x | c_i)


@torch.no_grad()
def encode_images(clip: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Unit-norm CLIP image embeddings (N, D) of images (N, C, H, W)."""
    return torch.cat([clip.encode_image(x.float()) for x in images.split(batch_size)])


@torch.no_grad()
def encode_texts(clip: nn.Module, captions: Sequence[str], batch_size: int = 500) -> Tensor:
    """Unit-norm CLIP text embeddings (N, D) of captions."""
    captions = list(captions)
    return torch.cat([clip.encode_text(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)])


@torch.no_grad()
def class_text_embeddings(clip: nn.Module, captions: Sequence[str], labels: Sequence[int], num_classes: int
                          ) -> Tensor:
    """One unit-norm text embedding per class (K, D): the normalised mean of the embeddings of that class's
    distinct captions (CLIP's prompt ensembling). A class without captions gets the zero vector."""
    per_class: dict[int, list[str]] = {}
    for c, y in zip(captions, labels, strict=True):
        if c not in per_class.setdefault(int(y), []):
            per_class[int(y)].append(str(c))
    dim = int(clip.embed_dim)
    rows = [F.normalize(encode_texts(clip, per_class[k]).mean(0), dim=-1) if per_class.get(k) else torch.zeros(dim)
            for k in range(num_classes)]
    return torch.stack(rows)


def class_centroids(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Unit-norm mean embedding of each class (K, D) (zero for a class without samples)."""
    sums = torch.zeros(num_classes, embeddings.shape[1]).index_add_(0, labels.long(), embeddings.float())
    return F.normalize(sums, dim=-1)


def cosine(a: Tensor, b: Tensor) -> float:
    """Mean row-wise cosine similarity of (N, D) tensors."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def cycle_indices(n: int, available: int) -> np.ndarray:
    """Indices 0..available-1 repeated cyclically to length n."""
    return np.arange(n) % available
