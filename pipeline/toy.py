"""Toy experiments: a small MLP DDPM on the 2-D Swiss roll (study notes, fig. 2-3), logged to MLflow.

``pipeline toy swissroll`` trains :class:`TimeMLP` with :func:`train_ddpm`, samples with the chosen
samplers (1000-step ancestral, 50-step strided ancestral, 50-step DDIM by default; 50-level annealed Langevin,
eq. 32-33, on request), and logs the sliced
Wasserstein distance of each sampler's output to held-out data, the VLB in bits/dim (continuous data, so
L_0 is a Gaussian density and the number is a differential entropy per dimension) and a PNG scatter plot.
Nothing here imports ray or deepspeed; MLflow is imported only by :func:`run_swissroll`.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import SpecError
from pipeline.data.swissroll import sliced_wasserstein, swiss_roll
from pipeline.diffusion import (
    SamplerOptions,
    Schedule,
    diffusion_loss,
    nll_bits_per_dim,
    run_sampler,
    uniform_timesteps,
)

log = logging.getLogger("pipeline.toy")

SAMPLERS = ("ancestral", "strided", "ddim", "langevin")
DEFAULT_SAMPLERS = ("ancestral", "strided", "ddim")


class TimeMLP(nn.Module):
    """ε_θ(x_t, t) (or x₀/v): an MLP on [x_t, sinusoidal embedding of t].

    With ``learn_sigma`` the output has 2·dim channels: the prediction, then v of eq. 35.
    """

    def __init__(self, hidden: int = 128, emb: int = 32, dim: int = 2, learn_sigma: bool = False):
        super().__init__()
        self.emb = emb
        out = 2 * dim if learn_sigma else dim
        self.net = nn.Sequential(
            nn.Linear(dim + emb, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, out),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.emb // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.net(torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1))


def train_ddpm(
    model: nn.Module,
    s: Schedule,
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 512,
    lr: float = 1e-3,
    max_lr: float = 3e-3,
    seed: int = 0,
    parameterization: str = "eps",
    loss_type: str = "simple",
    lambda_vlb: float = 0.001,
    learn_sigma: bool = False,
    var_type: str = "beta",
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Algorithm 1 on ``data`` (N, d) with Adam + one-cycle LR; returns the per-step mean losses.

    The L_0 term of a hybrid loss uses the Gaussian decoder (the data are continuous).
    ``on_step(step, loss)`` is called after every step.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    model.train()
    losses = []
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch_size,), generator=gen)]  # Algorithm 1, line 2
        t = uniform_timesteps(batch_size, s.num_timesteps, gen)  # Algorithm 1, line 3
        noise = torch.randn(x0.shape, generator=gen)  # Algorithm 1, line 4
        loss = diffusion_loss(  # eq. 30 (simple) or eq. 30 + λ·T·L_t (hybrid, eq. 26)
            model, s, x0, t, noise, parameterization=parameterization, loss_type=loss_type,
            lambda_vlb=lambda_vlb, learn_sigma=learn_sigma, var_type=var_type, decoder="gaussian",
        )["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def sample_points(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    s: Schedule,
    sampler: str,
    n: int,
    *,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 1,
    parameterization: str = "eps",
    learn_sigma: bool = False,
    var_type: str = "beta",
    dim: int = 2,
    langevin_steps: int = 3,
    langevin_step_ratio: float = 0.5,
) -> np.ndarray:
    """``n`` points from ``sampler``: "ancestral" (all T steps, Algorithm 2), "strided" (ancestral on
    ``s.respace(steps)``), "ddim" (``steps`` DDIM steps with ``eta``, eq. 41-43) or "langevin" (``steps``
    noise levels of annealed Langevin, eq. 32-33, ``langevin_steps`` steps of δ = ``langevin_step_ratio``·σ²
    each), all through the sampler registry :func:`pipeline.diffusion.run_sampler`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    gen = torch.Generator().manual_seed(seed)
    opts = SamplerOptions(parameterization=parameterization, learn_sigma=learn_sigma, var_type=var_type, eta=eta,
                          langevin_steps=langevin_steps, langevin_step_ratio=langevin_step_ratio, generator=gen)
    xT = torch.randn((n, dim), generator=gen)
    name = "ancestral" if sampler == "strided" else sampler  # strided = ancestral on s.respace(steps)
    n_steps = s.num_timesteps if sampler == "ancestral" else steps
    with torch.no_grad():
        x = run_sampler(name, model_fn, s, xT, n_steps, opts)
    return x.numpy()


def sampler_label(sampler: str, num_timesteps: int, steps: int) -> str:
    """A metric-friendly name such as ``ancestral_1000``, ``strided_50`` or ``ddim_50``."""
    return f"{sampler}_{num_timesteps if sampler == 'ancestral' else steps}"


def gaussian_bits_per_dim(x: np.ndarray) -> float:
    """Differential entropy (bits/dim) of the best single Gaussian fitted to ``x`` (a reference for the VLB)."""
    cov = np.atleast_2d(np.cov(np.asarray(x, dtype=np.float64).T))
    d = cov.shape[0]
    return float(0.5 * math.log2((2 * math.pi * math.e) ** d * np.linalg.det(cov)) / d)


def scatter_png(data: np.ndarray, samples: dict[str, np.ndarray], title: str = "") -> bytes:
    """PNG bytes of held-out data next to each sampler's points (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = [("held-out data", data), *samples.items()]
    fig = Figure(figsize=(3.2 * len(panels), 3.4))
    lim = 2.5
    for i, (name, pts) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:gray" if i == 0 else "tab:blue")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


@dataclass
class SwissRollConfig:
    """Everything ``pipeline toy swissroll`` can change (one CLI flag each)."""

    schedule: str = "linear"
    timesteps: int = 1000
    parameterization: str = "eps"
    loss: str = "simple"
    lambda_vlb: float = 0.001
    learn_sigma: bool = False
    var_type: str = "beta"
    steps: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    max_lr: float = 3e-3
    hidden: int = 128
    train_points: int = 20_000
    samplers: Sequence[str] = field(default_factory=lambda: list(DEFAULT_SAMPLERS))
    sample_steps: int = 50
    eta: float = 0.0
    langevin_steps: int = 3
    langevin_step_ratio: float = 0.5
    num_samples: int = 2000
    nll_points: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss == "hybrid" and not self.learn_sigma:
            raise SpecError("--loss hybrid needs learned Σ: add --learn-sigma (L_hybrid = L_simple + λ L_VLB trains "
                            "Σ_θ of eq. 35 through L_VLB; with a fixed Σ it would silently train L_simple)")


@dataclass
class SwissRollResult:
    """What a Swiss-roll run measured, and where it was logged."""

    metrics: dict[str, float]
    samples: dict[str, np.ndarray]
    heldout: np.ndarray
    run_id: str | None = None
    experiment_id: str | None = None


def swissroll_experiment(cfg: SwissRollConfig, log_every: int = 100,
                         on_metric: Callable[[str, float, int], None] | None = None) -> SwissRollResult:
    """Train, sample and measure (no tracking). ``on_metric(key, value, step)`` receives training losses."""
    for name in cfg.samplers:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    s = Schedule.make(cfg.schedule, cfg.timesteps)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = TimeMLP(hidden=cfg.hidden, learn_sigma=cfg.learn_sigma)
    data = torch.from_numpy(swiss_roll(cfg.train_points, seed=cfg.seed + 1))
    heldout = swiss_roll(cfg.num_samples, seed=cfg.seed + 2)

    def on_step(step: int, loss: float) -> None:
        if on_metric is not None and (step % log_every == 0 or step == cfg.steps - 1):
            on_metric("train/loss", loss, step)

    t0 = time.perf_counter()
    losses = train_ddpm(model, s, data, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, max_lr=cfg.max_lr,
                        seed=cfg.seed, parameterization=cfg.parameterization, loss_type=cfg.loss,
                        lambda_vlb=cfg.lambda_vlb, learn_sigma=cfg.learn_sigma, var_type=cfg.var_type,
                        on_step=on_step)
    metrics: dict[str, float] = {"train_seconds": time.perf_counter() - t0,
                                 "train/final_loss": float(np.mean(losses[-min(100, len(losses)):]))}
    samples: dict[str, np.ndarray] = {}
    for name in cfg.samplers:
        label = sampler_label(name, s.num_timesteps, cfg.sample_steps)
        t0 = time.perf_counter()
        pts = sample_points(model, s, name, cfg.num_samples, steps=cfg.sample_steps, eta=cfg.eta,
                            seed=cfg.seed + 1, parameterization=cfg.parameterization,
                            learn_sigma=cfg.learn_sigma, var_type=cfg.var_type, langevin_steps=cfg.langevin_steps,
                            langevin_step_ratio=cfg.langevin_step_ratio)
        samples[label] = pts
        metrics[f"sample_seconds/{label}"] = time.perf_counter() - t0
        metrics[f"sw/{label}"] = sliced_wasserstein(pts, heldout) if np.isfinite(pts).all() else float("inf")
    # References: a second draw of the data (the floor) and N(0, I) (what an untrained sampler looks like).
    metrics["sw/data_vs_data"] = sliced_wasserstein(swiss_roll(cfg.num_samples, seed=cfg.seed + 3), heldout)
    gauss = np.random.default_rng(cfg.seed).standard_normal((cfg.num_samples, 2))
    metrics["sw/gaussian"] = sliced_wasserstein(gauss, heldout)
    x0 = torch.from_numpy(heldout[: cfg.nll_points])
    bpd = nll_bits_per_dim(  # eq. 25-26, L_0 as a Gaussian density (continuous data)
        model, s, x0, parameterization=cfg.parameterization, learn_sigma=cfg.learn_sigma, var_type=cfg.var_type,
        decoder="gaussian", noise_generator=torch.Generator().manual_seed(cfg.seed),
    )
    metrics["bits_per_dim"] = float(bpd.mean())
    metrics["gaussian_bits_per_dim"] = gaussian_bits_per_dim(heldout)
    return SwissRollResult(metrics, samples, heldout)


def run_swissroll(cfg: SwissRollConfig, *, tracking_uri: str | None = None, experiment: str = "toy-swissroll",
                  run_name: str | None = None) -> SwissRollResult:
    """:func:`swissroll_experiment` inside an MLflow run: config as params, metrics, ``swissroll.png``."""
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import tracking

    tracking.connect(tracking.tracking_uri(tracking_uri))
    exp = mlflow.set_experiment(experiment)
    client = MlflowClient()
    run = client.create_run(exp.experiment_id, run_name=run_name or f"swissroll-{cfg.parameterization}-{cfg.loss}",
                            tags={"pipeline.toy": "swissroll", "pipeline.code_version": tracking.code_version()})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        params = {k: (",".join(v) if isinstance(v, list | tuple) else v) for k, v in asdict(cfg).items()}
        tracking.log_params_flat(run_id, params)
        result = swissroll_experiment(cfg, on_metric=lambda k, v, step: client.log_metric(run_id, k, v, step=step))
        for k, v in result.metrics.items():
            client.log_metric(run_id, k, v)
        title = (f"{cfg.schedule} T={cfg.timesteps}, {cfg.parameterization}, {cfg.loss}"
                 f"{', learned Σ' if cfg.learn_sigma else ''}, {cfg.steps} steps; "
                 f"{result.metrics['bits_per_dim']:.3f} bits/dim")
        png = scatter_png(result.heldout, result.samples, title)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "swissroll.png"
            path.write_bytes(png)
            client.log_artifact(run_id, str(path))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    result.run_id, result.experiment_id = run_id, exp.experiment_id
    return result
