"""Classifier guidance with a registered noisy classifier (eq. 36-38, notes fig. 2-7).

The classifier must live in the diffusion model's input space: a pixel model needs a classifier trained
on noisy pixels, a latent model one trained on the same scaled latents the diffusion model was trained on
(a ``classifier`` stage with ``noisy: true`` that ``needs`` the ``encode`` stage). A noisy classifier is
trained on x_t ~ q(x_t | x_0) (eq. 17) with its own schedule (cosine, T = 1000: see
``pipeline.train.tasks.ClassifierTask``); the diffusion model's timesteps are mapped onto the classifier's
by matching ᾱ, i.e. the same noise level, so any schedule/T of the diffusion model works.

Guidance is switched off where ᾱ_t < ``min_alpha_bar`` (default 1e-3: signal-to-noise below 1e-3, in
practice the last timestep(s) of a cosine schedule, whose β is clipped to 0.999 so ᾱ_T ≈ 4e-6 at T = 50 and
≈ 6e-9 at T = 1000). There x_t is pure noise, so the classifier has nothing to read, and DDIM's x̂₀
(eq. 41) divides the eq. 38 correction by √ᾱ_t: one guided first step moves x by √(ᾱ_prev/ᾱ_T)·w·∇log f,
hundreds of times the gradient, and the samples explode (measured on the tiny test model: DDIM at
w = 0.3 went from |x| ≤ 1.7 to |x| ≈ 35 and class accuracy from 0.86 to 0.56). Pass 0 for the notes'
Algorithm 2 verbatim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.diffusion import Schedule, classifier_grad

CondFnY = Callable[[Tensor, Tensor, Tensor], Tensor]


class GuidanceError(ValueError):
    """A classifier that cannot guide this diffusion model."""


def noisy_classifier_schedule() -> Schedule:
    """The schedule noisy classifiers are trained with (read from the training task itself)."""
    from pipeline.train.tasks import ClassifierTask

    return ClassifierTask({"model": {}, "noisy": True}).schedule


def noise_level_map(model_schedule: Schedule, classifier_schedule: Schedule) -> Tensor:
    """For each timestep of ``model_schedule``, the classifier timestep with the nearest ᾱ (eq. 17)."""
    a = model_schedule.alphas_cumprod
    b = classifier_schedule.alphas_cumprod
    return (a[:, None] - b[None, :]).abs().argmin(dim=1)


def check_classifier(classifier: nn.Module, classifier_meta: dict[str, Any], gen: Any) -> None:
    """Raise :class:`GuidanceError` when ``classifier`` cannot guide the diffusion model of ``gen``."""
    extra = classifier_meta.get("extra", {})
    if extra.get("kind") not in (None, "classifier"):
        raise GuidanceError(f"the guidance model is a '{extra.get('kind')}' model, not a classifier")
    if not extra.get("noisy", False):
        raise GuidanceError("the classifier was trained on clean images only; classifier guidance needs a noisy "
                            "classifier (a `classifier` stage with `noisy: true`)")
    c_in = getattr(classifier, "in_channels", None) or classifier_meta.get("args", {}).get("in_channels")
    shape = gen.extra.get("sample_shape")
    m_in = int(shape[0]) if shape else getattr(gen.model, "in_channels", None)
    if c_in is not None and m_in is not None and int(c_in) != int(m_in):
        space = "latent" if gen.extra.get("autoencoder") else "pixel"
        raise GuidanceError(
            f"the classifier takes {c_in} input channels but the diffusion model's {space} inputs have {m_in}: "
            "the classifier must be trained on the diffusion model's own input space"
            + (" (the scaled latents of its `encode` stage)" if space == "latent" else " (noisy pixels)"))
    c_cls = getattr(classifier, "num_classes", None)
    if c_cls is not None and gen.extra.get("num_classes") and int(c_cls) != int(gen.extra["num_classes"]):
        raise GuidanceError(f"the classifier has {c_cls} classes, the diffusion model {gen.extra['num_classes']}")


def classifier_cond_fn(classifier: Callable[[Tensor, Tensor], Tensor], model_schedule: Schedule,
                       classifier_schedule: Schedule | None = None, min_alpha_bar: float = 1e-3) -> CondFnY:
    """``cond_fn(x, t, y) = ∇_x log f(y | x_t)`` (eq. 36) for :func:`pipeline.eval.generate`.

    ``t`` are timesteps of ``model_schedule``; the classifier gets the timestep of its own schedule at
    the same noise level (its default is :func:`noisy_classifier_schedule`). The gradient is zero where
    ᾱ_t < ``min_alpha_bar`` (see the module docstring).
    """
    tmap = noise_level_map(model_schedule, classifier_schedule or noisy_classifier_schedule())
    active = model_schedule.alphas_cumprod >= min_alpha_bar

    def cond_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        def f(xx: Tensor, tt: Tensor) -> Tensor:
            return classifier(xx, tmap.to(tt.device)[tt.long()])

        grad = classifier_grad(f, y)(x, t)  # eq. 36: ∇_x log f_φ(y | x_t)
        keep = active.to(t.device)[t.long()].to(grad.dtype)
        return grad * keep.reshape(-1, *([1] * (grad.ndim - 1)))

    return cond_fn


def registered_cond_fn(ref: Any, gen: Any) -> CondFnY:
    """:func:`classifier_cond_fn` of the registered noisy classifier ``ref`` (a ``tracking.ModelRef``) for the
    generator ``gen``; :class:`GuidanceError` when it cannot guide it (:func:`check_classifier`)."""
    from pipeline import tracking
    from pipeline.train.export import load_exported

    classifier, meta = load_exported(tracking.download(ref))
    check_classifier(classifier, meta, gen)
    return classifier_cond_fn(classifier, gen.schedule)


@torch.no_grad()
def mean_log_prob(classifier: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                  batch_size: int = 500) -> float:
    """Mean log f(y | x, t = 0) of clean samples ``x``: how strongly they read as their target class."""
    out = []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        t = torch.zeros(len(xb), dtype=torch.long, device=xb.device)
        lp = torch.log_softmax(classifier(xb, t).float(), dim=-1)
        out.append(lp[torch.arange(len(yb)), yb])
    return float(torch.cat(out).mean())
