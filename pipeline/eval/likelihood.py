"""Negative log-likelihood of held-out data under a registered diffusion model, in bits/dim.

The bound is the full L_VLB = L_T + L_{T-1} + ... + L_0 (eq. 25-26): every one of the T terms is
evaluated (no timestep subsampling), via :func:`pipeline.diffusion.nll_bits_per_dim`.

* Pixel models see 8-bit images scaled to [-1, 1]; L_0 is the discretised Gaussian decoder, so the
  number is a proper bound on the discrete NLL and comparable with published bits/dim.
* Latent models see ``latent_scale · mean(encoder(x))`` (what the ``encode`` stage wrote). Latents are
  continuous, so L_0 is a Gaussian density and the number is a bound on the differential entropy of the
  latents per latent dimension. It is NOT comparable with pixel bits/dim (the autoencoder's own
  likelihood term is not included) and may be negative.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.diffusion import nll_bits_per_dim

log = logging.getLogger("pipeline.eval")


@dataclass
class NLLResult:
    """Bits/dim of a set of held-out examples."""

    bits_per_dim: float  # mean over examples
    stderr: float  # standard error of that mean
    per_example: torch.Tensor  # (N,)
    space: str  # "pixel" or "latent"
    decoder: str  # "discretized" or "gaussian" (L_0)
    dims: int  # dimensions per example the bound is divided by
    conditional: bool  # log p(x | y) with the true labels, else log p(x) with the null label

    def summary(self) -> dict[str, float]:
        """Metric dict for MLflow."""
        return {"nll/bits_per_dim": self.bits_per_dim, "nll/bits_per_dim_stderr": self.stderr,
                "nll/num_examples": float(len(self.per_example)), "nll/dims": float(self.dims)}


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Snap images in [-1, 1] onto the 256 bin centres the discretised decoder expects."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def model_inputs(gen: Any, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, str, str]:
    """What the diffusion model of ``gen`` is trained on, for ``images`` in [-1, 1] (N, C, H, W).

    Returns (x0, space, decoder): scaled latent means for a latent model (Gaussian L_0), the 8-bit
    quantised images for a pixel model (discretised L_0).
    """
    extra = gen.extra
    if extra.get("autoencoder"):
        if gen.decoder is None:
            raise ValueError("latent diffusion model without its autoencoder; load it with load_generator")
        scale = float(extra.get("latent_scale", 1.0))
        with torch.no_grad():
            z = torch.cat([gen.decoder.encode(chunk)[0] for chunk in images.split(batch_size)])
        x0, space, decoder = z * scale, "latent", "gaussian"
    else:
        x0, space, decoder = quantize_8bit(images), "pixel", "discretized"
    shape = extra.get("sample_shape")
    if shape is not None and tuple(x0.shape[1:]) != tuple(shape):
        raise ValueError(f"the data give model inputs of shape {tuple(x0.shape[1:])}, but the model was trained on "
                         f"{tuple(shape)}; point --data at the dataset the model was trained on")
    return x0.float(), space, decoder


@torch.no_grad()
def generator_nll(
    gen: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    conditional: bool = False,
    var_type: str = "beta",
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> NLLResult:
    """L_VLB (eq. 26) in bits/dim of ``images`` under the diffusion model of ``gen`` (a :class:`Generator`).

    ``conditional`` uses the true ``labels`` (a bound on −log p(x | y)); otherwise the null label (the
    model's unconditional branch, trained by label dropout), a bound on −log p(x).
    ``progress(done, total)`` is called after every batch.
    """
    d = gen.extra["diffusion"]
    s = gen.schedule
    if gen.extra.get("sampling_timesteps"):
        log.warning("this model was distilled to sample on %d timesteps only; its VLB over all %d terms "
                    "is not a meaningful likelihood", len(gen.extra["sampling_timesteps"]), s.num_timesteps)
    x0, space, decoder = model_inputs(gen, images)
    if conditional and labels is None:
        raise ValueError("conditional NLL needs the labels")
    num_classes = gen.extra.get("num_classes")
    g = torch.Generator().manual_seed(seed)
    out = []
    n = len(x0)
    for i in range(0, n, batch_size):
        xb = x0[i:i + batch_size]
        if conditional:
            y = labels[i:i + batch_size].long()
        elif num_classes:
            y = torch.full((len(xb),), int(num_classes), dtype=torch.long)  # the null label
        else:
            y = None

        def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = y) -> torch.Tensor:
            return gen.model(x, t, y=y) if y is not None else gen.model(x, t)

        out.append(nll_bits_per_dim(  # eq. 25-26: L_T + Σ L_t + L_0
            fn, s, xb, parameterization=d.get("parameterization", "eps"),
            learn_sigma=bool(d.get("learn_sigma", False)), var_type=var_type, decoder=decoder,
            noise_generator=g,
        ))
        if progress is not None:
            progress(min(i + batch_size, n), n)
    per = torch.cat(out).double()
    stderr = float(per.std() / math.sqrt(len(per))) if len(per) > 1 else float("nan")
    return NLLResult(float(per.mean()), stderr, per, space, decoder, int(x0[0].numel()), conditional)


def log_nll_run(ref: Any, result: NLLResult, params: dict[str, Any], experiment_id: str | None = None) -> str:
    """Record ``result`` as a NEW MLflow run in the experiment of the model version's training run.

    The run is tagged with the version (``pipeline.input.model`` = ``models:/NAME/VERSION``) and the
    version gets a tag ``pipeline.eval.nll_run`` pointing back at it; the training run is not modified.
    Returns the new run's id.
    """
    from mlflow.tracking import MlflowClient

    import mlflow

    client = MlflowClient()
    if experiment_id is None:
        if ref.run_id:
            experiment_id = client.get_run(ref.run_id).info.experiment_id
        else:
            experiment_id = mlflow.set_experiment(ref.name).experiment_id
    run = client.create_run(experiment_id, run_name=f"nll-{ref.name}-v{ref.version}", tags={
        "pipeline.eval": "nll", "pipeline.input.model": ref.uri, "pipeline.model_name": ref.name,
        "pipeline.model_version": str(ref.version), "pipeline.nll.space": result.space,
        "pipeline.nll.decoder": result.decoder, **({"pipeline.source_run": ref.run_id} if ref.run_id else {}),
    })
    run_id = run.info.run_id
    try:
        for k, v in params.items():
            client.log_param(run_id, k, str(v))
        for k, v in result.summary().items():
            client.log_metric(run_id, k, v)
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_model_version_tag(ref.name, str(ref.version), "pipeline.eval.nll_run", run_id)
    return run_id
