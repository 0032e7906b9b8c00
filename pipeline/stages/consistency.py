"""The `consistency` stage: consistency distillation from the registered teacher, or consistency training.

``mode: distill`` needs a diffusion stage (the teacher, from the registry) and trains on the teacher's data
(latents or pixels); ``mode: train`` needs the data's ``encode`` stage (or nothing, for pixels) and builds the
network from ``model``. Each trained model is evaluated with 1 and 2 sampling steps (or the stage's
``sampling.steps`` list): a grid per step count and FID/KID/class accuracy with the job's classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data import read_manifest


def run_consistency(ctx, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict[str, float]]:
    """Train a consistency model (CD or CT), then evaluate it at each of its sampling step counts."""
    from pipeline.stages import _eval_generator, _fit, data_dir_of, pixel_dataset
    from pipeline.stages.encode import latent_info

    stage = ctx.spec.stages[name]
    extra: dict[str, Any]
    if stage.mode == "distill":
        teacher_stage = next(n for n in stage.needs if ctx.spec.stages[n].kind in ("diffusion", "distill"))
        data_dir = data_dir_of(ctx, teacher_stage)
        extra = {"inputs": {"teacher": {"uri": inputs[teacher_stage].source}}}
    else:
        data_dir = data_dir_of(ctx, name)
        if data_dir != ctx.data_dir:
            info = latent_info(data_dir)
            data_info = {"latent_scale": info["latent_scale"], "autoencoder": info["autoencoder"]}
        else:
            data_info = {"latent_scale": 1.0}
        manifest = read_manifest(data_dir)
        h, w, c = manifest.image_size
        data_info["sample_shape"] = [c, h, w]
        extra = {"num_classes": manifest.num_classes, "data_info": data_info}
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, data_dir), extra)
    s = stage.sampling
    n = min(s.num_samples, ctx.spec.eval.num_samples)
    metrics: dict[str, float] = {}
    for steps in stage.eval_steps:
        metrics.update(_eval_generator(ctx, run_id, export, steps=steps, guidance=s.guidance, num_samples=n,
                                       prefix=f"{steps}step_"))
    first = f"{stage.eval_steps[0]}step_"  # the gate reads the first step count under stable names
    metrics.update({k.replace(first, ""): v for k, v in list(metrics.items()) if first in k})
    return export, metrics
