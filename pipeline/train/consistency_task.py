"""The consistency-model training task (Song et al. 2023; notes eq. 44-46): distillation or training.

``mode: distill`` (CD, eq. 45): the student starts as a copy of the registered teacher; for x_{t_{n+1}} from
q(x_t | x₀) (eq. 17) the teacher takes one DDIM step to t_n and the target is f_{θ⁻}(x̂^φ_{t_n}, t_n).
``mode: train`` (CT, eq. 46): no teacher; x_{t_{n+1}} and x_{t_n} share the same noise z. In both, the
loss is d = mean squared error with λ(t_n) = 1, and θ⁻ is the task's own EMA of θ, distinct from the loop's
export EMA (``train.ema_decay``): θ⁻ ← μθ⁻ + (1−μ)θ once per optimiser step, applied at the start of the next
step's loss. CD uses fixed ``levels`` and μ = ``target_ema``; CT follows the paper's curriculum: at step k of
K = ``train.steps`` it draws pairs from N(k) levels and the update after step k uses μ(k) (see
:func:`pipeline.diffusion.consistency.ct_num_levels`). The step k is the optimiser's (the LR scheduler's count,
which a resumed run restores), or the number of losses taken for a plain module. A resumed run restarts θ⁻
from the resumed θ.
See :mod:`pipeline.diffusion.consistency` for the VP ↔ σ mapping.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.diffusion.consistency import (
    adjacent_levels,
    cd_teacher_step,
    consistency_levels,
    consistency_output,
    ct_num_levels,
    ct_pair,
    ct_target_ema,
    ema_update_,
    vp_sigmas,
)
from pipeline.diffusion.guidance import condition_dropout, drop_labels
from pipeline.models import build_model
from pipeline.train.tasks import guided_teacher, make_schedule, on_device


def _module(model: Any) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine or a plain module


def _optimizer_step(model: Any) -> int | None:
    """Optimiser steps taken so far by a DeepSpeed engine (its LR scheduler's count), None for a plain module."""
    sched = getattr(model, "lr_scheduler", None)
    return None if sched is None else int(sched.last_epoch)


class ConsistencyTask:
    """One consistency-model stage: CD from ``teacher`` (with its export ``teacher_meta``) or CT from scratch."""

    def __init__(self, stage: dict[str, Any], *, teacher: nn.Module | None = None,
                 teacher_meta: dict[str, Any] | None = None, num_classes: int | None = None,
                 data: dict[str, Any] | None = None):
        self.stage = stage
        self.mode = stage["mode"]
        if self.mode == "distill":
            if teacher is None or teacher_meta is None:
                raise ValueError("consistency distillation needs a teacher")
            extra = teacher_meta["extra"]
            self.diffusion = dict(extra["diffusion"])
            self.num_classes = int(extra["num_classes"])
            self.data = {k: extra[k] for k in ("latent_scale", "autoencoder", "sample_shape") if k in extra}
            self.teacher = teacher.eval().requires_grad_(False)
            self.teacher_param = self.diffusion.get("parameterization", "eps")
            self.parameterization = self.teacher_param  # the student is the teacher's network
            self.recipe = (teacher_meta["name"], teacher_meta["args"])
            # guidance already distilled into the teacher is not applied twice
            self.guidance = 0.0 if extra.get("distilled_guidance") else float(stage.get("guidance", 0.0))
            self.inherited_guidance = float(extra.get("distilled_guidance", 0.0))
        else:
            self.diffusion = dict(stage.get("diffusion") or {})
            self.num_classes = int(num_classes or 0)
            self.data = dict(data or {})
            self.teacher = None
            self.parameterization = "v"  # the network's output is read as v (F_θ = −v)
            self.recipe = (stage["model"]["name"], stage["model"]["args"])
            self.guidance = 0.0
            self.inherited_guidance = 0.0
        self.schedule = make_schedule(self.diffusion)
        self._level_cache: dict[int, list[int]] = {}
        if self.mode == "train":  # CT: N(k) and μ(k) of the curriculum over K steps
            cur = {"s0": 2, "s1": 150, "mu0": 0.9, **(stage.get("curriculum") or {})}
            self.s0, self.s1, self.mu0 = int(cur["s0"]), int(cur["s1"]), float(cur["mu0"])
            self.total_steps = int(stage["train"]["steps"])
            self.levels = self.levels_at(self.total_steps)  # the final discretisation, N(K) = s1 + 1
        else:
            self.levels = self._levels(int(stage.get("levels", 18)))
        self.sigma_data = float(stage.get("sigma_data", 1.0))
        self.sigma_min = float(vp_sigmas(self.schedule)[self.levels[0]])
        self.mu = float(stage.get("target_ema", 0.95))
        self.calls = 0  # losses taken: the step count of a plain module
        self.label_dropout = 0.0 if self.guidance else float(stage.get("label_dropout", 0.1))
        self.target: nn.Module | None = None  # θ⁻, made from θ on the first step

    def _levels(self, n: int) -> list[int]:
        if n not in self._level_cache:
            self._level_cache[n] = consistency_levels(self.schedule, n, float(self.stage.get("sigma_max", 80.0)),
                                                      float(self.stage.get("rho", 7.0)))
        return self._level_cache[n]

    def levels_at(self, k: int) -> list[int]:
        """The timestep indices pairs are drawn from at step ``k``: N(k) levels for CT, the fixed ones for CD."""
        if self.mode != "train":
            return self.levels
        return self._levels(ct_num_levels(min(k, self.total_steps), self.total_steps, self.s0, self.s1))

    def mu_at(self, k: int) -> float:
        """The target EMA rate of the update after step ``k``: μ(k) for CT, ``target_ema`` for CD."""
        if self.mode != "train":
            return self.mu
        return ct_target_ema(ct_num_levels(min(k, self.total_steps), self.total_steps, self.s0, self.s1),
                             self.s0, self.mu0)

    def build_model(self) -> nn.Module:
        if self.teacher is not None:
            return copy.deepcopy(self.teacher).train().requires_grad_(True)
        return build_model(*self.recipe[:1], **self.recipe[1])

    def _update_target(self, model: Any, mu: float) -> nn.Module:
        from pipeline.train.engine import gathered_params

        online = _module(model)
        ctx = gathered_params(model) if hasattr(model, "zero_optimization_stage") else torch.no_grad()
        with ctx:
            if self.target is None:
                self.target = copy.deepcopy(online).eval().requires_grad_(False)
            else:
                ema_update_(self.target, online, mu)
        return self.target

    def f(self, net, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x_t, t) of eq. 44 for a network ``net`` (θ or θ⁻), in the σ frame."""
        out = net(x_t, self.schedule.timestep_map.to(x_t.device)[t], y=y)
        return consistency_output(self.schedule, out, x_t, t, self.parameterization, self.sigma_data,
                                  self.sigma_min)

    def loss(self, model, batch, gen):
        x0, y = batch["image"], batch["label"]
        s = self.schedule = on_device(self.schedule, x0.device)
        engine_step = _optimizer_step(model)
        k = self.calls if engine_step is None else engine_step
        self.calls += 1
        target_net = self._update_target(model, self.mu_at(max(k - 1, 0)))  # θ⁻ after step k−1 used μ(k−1)
        if self.label_dropout:
            y = drop_labels(y, condition_dropout(len(y), self.label_dropout, y.device, gen), self.num_classes)
        levels = torch.tensor(self.levels_at(k), device=x0.device)
        t_cur, t_next = adjacent_levels(levels, len(x0), gen)
        noise = torch.randn(x0.shape, device=x0.device, generator=gen)
        if self.mode == "distill":
            x_next = s.q_sample(x0, t_next, noise)  # eq. 17
            teacher = guided_teacher(self.teacher, y, self.num_classes, self.guidance)
            x_cur = cd_teacher_step(s, teacher, x_next, t_next, t_cur, self.teacher_param)  # eq. 45
        else:
            x_next, x_cur = ct_pair(s, x0, t_next, t_cur, noise)  # eq. 46: the same z for both levels
        with torch.no_grad():
            target = self.f(target_net, x_cur, t_cur, y)  # f_{θ⁻}(x_{t_n}, t_n)
        pred = self.f(model, x_next, t_next, y)  # f_θ(x_{t_{n+1}}, t_{n+1})
        loss = F.mse_loss(pred.float(), target.float())  # eq. 45/46 with d = L2, λ = 1
        return loss, {}

    def model_recipe(self):
        return self.recipe

    def export_extra(self):
        diffusion = dict(self.diffusion, parameterization=self.parameterization)
        return {"kind": "consistency", "mode": self.mode, "diffusion": diffusion, "num_classes": self.num_classes,
                **self.data,
                "consistency": {"timesteps": self.levels, "sigma_data": self.sigma_data,
                                "sigma_min_index": self.levels[0]},
                "sampling_timesteps": [self.levels[-1]],  # one step by default
                "distilled_guidance": self.guidance or self.inherited_guidance}


def build_consistency_task(config: dict[str, Any], download) -> ConsistencyTask:
    """The task of a ``consistency`` stage inside a Ray worker (``download(uri, tracking_uri) -> dir``)."""
    from pipeline.train.export import load_exported

    stage = config["stage"]
    if stage["mode"] == "distill":
        teacher_dir = download(config["inputs"]["teacher"]["uri"], config.get("tracking_uri"))
        teacher, meta = load_exported(teacher_dir)
        return ConsistencyTask(stage, teacher=teacher, teacher_meta=meta)
    return ConsistencyTask(stage, num_classes=config["num_classes"], data=config["data_info"])
