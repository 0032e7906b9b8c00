"""The contrastive objective of CLIP (the image–text encoder pair of unCLIP, notes 2.6.2), as pure functions.

Symmetric InfoNCE: with unit-norm image embeddings I (B, D), text embeddings T (B, D) and the learnable
log inverse temperature s, the logits are L = e^s · I Tᵀ (B, B); the loss is the mean of the cross-entropy
of each image over the texts (rows of L) and of each text over the images (columns of L), the target of
a row being its own pair. Captions that occur more than once in a batch are the same text: with
``groups`` (one id per pair, equal ids for equal captions) a row's target is spread uniformly over every
pair of its group instead of being its own pair alone, so identical captions are not pushed apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def contrastive_targets(groups: torch.Tensor | None, n: int, device: torch.device | None = None) -> torch.Tensor:
    """Target distributions (n, n): row i uniform over {j : groups[j] == groups[i]} (the identity without groups)."""
    if groups is None:
        return torch.eye(n, device=device)
    same = (groups[:, None] == groups[None, :]).float()
    return same / same.sum(1, keepdim=True)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE of unit-norm embeddings (B, D) at temperature exp(-logit_scale).

    Returns ``(loss, {"image_to_text_accuracy", "temperature"})``; the accuracy is the share of images
    whose most similar text in the batch belongs to their own group.
    """
    logits = logit_scale.exp() * image_emb.float() @ text_emb.float().t()  # (B, B)
    target = contrastive_targets(groups, len(logits), logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target.t()))
    hit = target.gather(1, logits.argmax(1, keepdim=True)).squeeze(1) > 0
    return loss, {"image_to_text_accuracy": hit.float().mean().detach(),
                  "temperature": (-logit_scale).exp().detach()}


def caption_groups(captions: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """One integer id per caption, equal for equal captions (B,) long."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long, device=device)


def zero_shot_predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """For each image embedding (N, D), the index of the most similar class text embedding (K, D): (N,) long."""
    return (image_emb.float() @ class_emb.float().t()).argmax(-1)


__all__ = ["caption_groups", "clip_loss", "contrastive_targets", "zero_shot_predict"]
