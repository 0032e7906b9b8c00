"""Tasks: what a training stage optimises — a model to build and a loss on a batch.

A task is built inside each worker from plain data (the stage spec as a dict plus local
paths of input weights), so it travels to Ray workers without pickling modules.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion import Schedule, classifier_free, condition_dropout, diffusion_loss, drop_labels
from pipeline.diffusion.distill import progressive_distillation_target
from pipeline.models import build_model


class Task(Protocol):
    """A model to train and the loss that trains it."""

    def build_model(self) -> nn.Module: ...

    def loss(self, model: Any, batch: dict[str, Any], gen: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def model_recipe(self) -> tuple[str, dict[str, Any]]: ...

    def export_extra(self) -> dict[str, Any]: ...


class AutoencoderTask:
    """An autoencoder-family model trained by the objective named in `objective.type`.

    The objectives live in :mod:`pipeline.objectives` (default `kl_vae`: the LDM first stage).
    """

    def __init__(self, stage: dict[str, Any]):
        from pipeline.objectives import get_objective

        self.model_spec = stage["model"]
        self.cfg = dict(stage.get("objective") or {})
        self.objective = get_objective(self.cfg.get("type", "kl_vae"))

    def build_model(self) -> nn.Module:
        return build_model(self.model_spec["name"], **self.model_spec["args"])

    def loss(self, model, batch, gen):
        return self.objective.loss(model, batch, gen, self.cfg)

    def model_recipe(self):
        return self.model_spec["name"], self.model_spec["args"]

    def export_extra(self):
        return {"kind": "autoencoder", "objective": self.cfg}


class ClassifierTask:
    """Cross-entropy classifier; with `noisy`, trained on x_t ~ q(x_t|x_0) (eq. 17) for guidance."""

    def __init__(self, stage: dict[str, Any]):
        self.model_spec = stage["model"]
        self.noisy = bool(stage.get("noisy", False))
        self.schedule = Schedule.make("cosine", 1000) if self.noisy else None

    def build_model(self) -> nn.Module:
        return build_model(self.model_spec["name"], **self.model_spec["args"])

    def loss(self, model, batch, gen):
        x, y = batch["image"], batch["label"]
        if self.noisy:
            self.schedule = on_device(self.schedule, x.device)
            t = torch.randint(0, self.schedule.num_timesteps, (len(x),), device=x.device, generator=gen)
            x = self.schedule.q_sample(x, t, torch.randn(x.shape, device=x.device, generator=gen))
        else:
            t = torch.zeros(len(x), dtype=torch.long, device=x.device)
        logits = model(x, t)
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"accuracy": acc}

    def model_recipe(self):
        return self.model_spec["name"], self.model_spec["args"]

    def export_extra(self):
        return {"kind": "classifier", "noisy": self.noisy}


def on_device(schedule: Schedule, device: torch.device) -> Schedule:
    """The schedule with its tables on the batch's device (moved once, not on every lookup)."""
    return schedule if schedule.betas.device == device else schedule.to(device)


def guided_teacher(teacher: nn.Module, y: torch.Tensor, num_classes: int, guidance: float):
    """The teacher's denoiser ``(x, t) -> output`` for labels ``y``; classifier-free guided when ``guidance > 0``."""
    if guidance == 0:
        return lambda x, t: teacher(x, t, y=y)
    return classifier_free(lambda x, t, yy: teacher(x, t, y=yy), y, num_classes, guidance)


def extra_guidance(meta: dict[str, Any]) -> float:
    """The guidance weight already distilled into a model (0 for an undistilled one)."""
    return float(meta["extra"].get("distilled_guidance", 0.0))


def make_schedule(diffusion: dict[str, Any]) -> Schedule:
    """The noise schedule of a diffusion spec."""
    return Schedule.make(diffusion.get("schedule", "cosine"), int(diffusion.get("timesteps", 1000)))


def spec_diffusion_loss(model_fn, schedule: Schedule, diffusion: dict[str, Any], x0: torch.Tensor,
                        gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The diffusion spec's loss of the conditioned ``model_fn(x_t, t)`` at uniformly drawn t (Algorithm 1)."""
    t = torch.randint(0, schedule.num_timesteps, (len(x0),), device=x0.device, generator=gen)
    noise = torch.randn(x0.shape, device=x0.device, generator=gen)
    out = diffusion_loss(
        model_fn, schedule, x0, t, noise,
        parameterization=diffusion.get("parameterization", "eps"),
        loss_type=diffusion.get("loss", "simple"),
        lambda_vlb=float(diffusion.get("lambda_vlb", 0.001)),
        learn_sigma=bool(diffusion.get("learn_sigma", False)),
    )
    return out["loss"].mean(), {"mse": out["mse"].mean()}


class DiffusionTask:
    """DDPM training (Algorithm 1) with classifier-free label dropout; loss per the spec."""

    def __init__(self, stage: dict[str, Any], num_classes: int, data: dict[str, Any]):
        self.model_spec = stage["model"]
        self.diffusion = stage.get("diffusion", {})
        self.schedule = make_schedule(self.diffusion)
        self.num_classes = num_classes
        self.data = data  # sample_shape, latent_scale, autoencoder URI (for decoding samples)

    def build_model(self) -> nn.Module:
        return build_model(self.model_spec["name"], **self.model_spec["args"])

    def loss(self, model, batch, gen):
        x0, y = batch["image"], batch["label"]
        self.schedule = on_device(self.schedule, x0.device)
        drop = condition_dropout(len(y), self.diffusion.get("label_dropout", 0.1), y.device, gen)
        y = drop_labels(y, drop, self.num_classes)
        return self.denoising_loss(lambda xt, tt: model(xt, tt, y=y), x0, gen)

    def denoising_loss(self, model_fn, x0: torch.Tensor, gen: torch.Generator):
        """The spec's diffusion loss of the conditioned ``model_fn(x_t, t)`` at random t (the hook that
        :class:`pipeline.train.text_task.TextDiffusionTask` conditions on captions)."""
        self.schedule = on_device(self.schedule, x0.device)
        return spec_diffusion_loss(model_fn, self.schedule, self.diffusion, x0, gen)

    def model_recipe(self):
        return self.model_spec["name"], self.model_spec["args"]

    def export_extra(self):
        return {"kind": "diffusion", "diffusion": self.diffusion, "num_classes": self.num_classes,
                **self.data}


class DistillTask:
    """One halving of progressive distillation (Salimans & Ho).

    The teacher samples on `teacher_timesteps` (2N sorted original timesteps) with DDIM; the
    student (initialised from the teacher) learns to take one step where the teacher, with
    classifier-free guidance `guidance`, takes two. The student samples on every other
    timestep, `student_timesteps` (N of them), ending at clean data.
    """

    def __init__(self, stage: dict[str, Any], teacher: nn.Module, teacher_meta: dict[str, Any],
                 teacher_timesteps: list[int]):
        self.teacher_meta = teacher_meta
        extra = teacher_meta["extra"]
        self.diffusion = dict(extra["diffusion"])
        self.teacher_param = self.diffusion.get("parameterization", "eps")
        self.parameterization = stage.get("parameterization", "v")
        self.num_classes = int(extra["num_classes"])
        # guidance already distilled into the teacher is not applied twice
        self.guidance = 0.0 if extra.get("distilled_guidance") else float(stage.get("guidance", 0.0))
        self.teacher_timesteps = sorted(teacher_timesteps)
        self.student_timesteps = self.teacher_timesteps[1::2]
        self.student_steps = len(self.student_timesteps)
        self.teacher_sched = make_schedule(self.diffusion).respace(self.teacher_timesteps)
        self.teacher = teacher.eval().requires_grad_(False)

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self.teacher).train().requires_grad_(True)

    def _teacher_fn(self, y: torch.Tensor):
        return guided_teacher(self.teacher, y, self.num_classes, self.guidance)

    def loss(self, model, batch, gen):
        x0, y = batch["image"], batch["label"]
        s = self.teacher_sched = on_device(self.teacher_sched, x0.device)
        n = len(x0)
        # student step i ∈ [1, student_steps] goes from teacher index 2i−1 to 2i−3 (−1 = data)
        i = torch.randint(1, self.student_steps + 1, (n,), device=x0.device, generator=gen)
        t, t_mid, t_next = 2 * i - 1, 2 * i - 2, 2 * i - 3
        noise = torch.randn(x0.shape, device=x0.device, generator=gen)
        xt = s.q_sample(x0, t, noise)
        with torch.no_grad():
            target = progressive_distillation_target(
                s, self._teacher_fn(y), xt, t, t_mid, t_next,
                teacher_parameterization=self.teacher_param, parameterization=self.parameterization)
        out = model(xt, s.timestep_map.to(x0.device)[t], y=y)
        loss = F.mse_loss(out.float(), target.float())
        return loss, {}

    def model_recipe(self):
        return self.teacher_meta["name"], self.teacher_meta["args"]

    def export_extra(self):
        diffusion = dict(self.diffusion, parameterization=self.parameterization)
        return {**self.teacher_meta["extra"], "diffusion": diffusion,
                "sampling_timesteps": self.student_timesteps,
                "distilled_guidance": self.guidance or extra_guidance(self.teacher_meta)}
