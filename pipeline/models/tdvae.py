"""TD-VAE (Gregor et al. 2019, "Temporal Difference Variational Auto-Encoder"; study notes 1.3.3).

A state-space model trained between two time points t1 < t2 (eq. 14), with four distributions:

* belief   p_B(z_t | b_t): b_t is the state of an LSTM run forward over the (encoded) frames x_1..x_t;
* transition p_T(z_t2 | z_t1, δ): a Gaussian jump of δ = t2 − t1 steps (δ in 1..max_jump, given as a
  one-hot input), mean z_t1 + f(z_t1, δ), so a single call predicts δ steps ahead;
* decoder  p_D(x_t | z_t): Bernoulli logits over the frame's pixels (data in [-1, 1] maps to [0, 1]);
* smoothing posterior q_S(z_t1 | z_t2, b_t1, b_t2) (the notes' p_S).

Sequences arrive as filmstrip images (B, C, H, T·W) (see :mod:`pipeline.data.procedural`); the model
splits them into frames. ``forward`` is deterministic given the jump times and the standard-normal noise,
so that the objective (:mod:`pipeline.objectives.tdvae`) owns every random draw. Rollouts
(:meth:`TDVAE.predict`) jump straight from the last belief to each horizon without simulating the
intermediate steps: a k-step prediction calls the transition ceil(k / max_jump) times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import register

LOGVAR_MIN, LOGVAR_MAX = -10.0, 6.0
INIT_LOGVAR = -4.0


class GaussianHead(nn.Module):
    """MLP input -> (mean, logvar) of a diagonal Gaussian over ``z_dim``."""

    def __init__(self, in_dim: int, hidden: int, z_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, 2 * z_dim))
        with torch.no_grad():  # start with small variances (std e^-2): the sampled z carries its mean's signal
            self.net[-1].bias[z_dim:].fill_(INIT_LOGVAR)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(h).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mean + sigma * eps with eps ~ N(0, I) (the reparameterisation trick)."""
    return mean + (0.5 * logvar).exp() * eps


def filmstrip_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, C, H, T·W) filmstrip -> (B, T, C, H, W) frames."""
    b, c, h, tw = x.shape
    if tw % frames:
        raise ValueError(f"a filmstrip of width {tw} does not hold {frames} frames")
    return x.view(b, c, h, frames, tw // frames).permute(0, 3, 1, 2, 4)


@register("td_vae")
class TDVAE(nn.Module):
    """TD-VAE over sequences of ``frames`` frames of ``channels`` x ``frame_size`` x ``frame_size`` pixels."""

    def __init__(self, frames: int = 12, frame_size: int = 16, channels: int = 1, z_dim: int = 8,
                 belief_dim: int = 64, hidden: int = 128, max_jump: int = 4) -> None:
        super().__init__()
        if frames < 2 or not 1 <= max_jump < frames:
            raise ValueError(f"need frames >= 2 and 1 <= max_jump < frames, got frames={frames}, "
                             f"max_jump={max_jump}")
        self.frames, self.frame_size, self.channels = frames, frame_size, channels
        self.z_dim, self.max_jump = z_dim, max_jump
        pixels = channels * frame_size * frame_size
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU())
        self.lstm = nn.LSTM(hidden, belief_dim, batch_first=True)
        self.belief_dim = belief_dim + hidden  # b_t = [LSTM state, features of x_t]
        self.belief_head = GaussianHead(self.belief_dim, hidden, z_dim)  # p_B(z | b)
        self.smooth_head = GaussianHead(z_dim + 2 * self.belief_dim, hidden, z_dim)  # q_S(z1 | z2, b1, b2)
        self.transition_head = GaussianHead(z_dim + max_jump, hidden, z_dim)  # p_T(z2 | z1, δ)
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                     nn.Linear(hidden, pixels))  # p_D(x | z): Bernoulli logits
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # training steps (KL warm-up)

    # ------------------------------------------------------------------ the four distributions

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """Filmstrip (B, C, H, T·W) -> frames (B, T, C, H, W)."""
        return filmstrip_frames(x, self.frames)

    def beliefs(self, frames: torch.Tensor) -> torch.Tensor:
        """Belief states b_1..b_T (B, T, belief_dim + hidden) of frames (B, T, C, H, W).

        b_t is the LSTM's state after x_1..x_t, concatenated with the features of x_t itself (a short path
        from the newest frame, which keeps the model from settling on the mean frame early in training).
        """
        h = self.encoder(frames.flatten(2))
        return torch.cat([self.lstm(h)[0], h], dim=-1)

    def belief(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_B(z | b): (mean, logvar)."""
        return self.belief_head(b)

    def smoothing(self, z2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_S(z_t1 | z_t2, b_t1, b_t2): (mean, logvar)."""
        return self.smooth_head(torch.cat([z2, b1, b2], dim=-1))

    def transition(self, z1: torch.Tensor, jump: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_T(z_t2 | z_t1, δ) for jumps δ (B,) in 1..max_jump: (mean, logvar), mean = z_t1 + f(z_t1, δ)."""
        if bool(((jump < 1) | (jump > self.max_jump)).any()):
            raise ValueError(f"jump lengths must be in 1..{self.max_jump}, got {jump.tolist()}")
        onehot = F.one_hot(jump.long() - 1, self.max_jump).to(z1.dtype)
        delta, logvar = self.transition_head(torch.cat([z1, onehot], dim=-1))
        return z1 + delta, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """p_D(x | z): Bernoulli logits (B, C, H, W)."""
        return self.decoder(z).view(-1, self.channels, self.frame_size, self.frame_size)

    # ------------------------------------------------------------------ training pass

    def forward(self, x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, eps2: torch.Tensor,
                eps1: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything eq. 14 needs for the pairs (t1, t2) (B,), given N(0, I) noise eps2, eps1 (B, z_dim).

        z_t2 ~ p_B(· | b_t2), z_t1 ~ q_S(· | z_t2, b_t1, b_t2) (both reparameterised); returns the frames
        x_t2, the decoder logits of z_t2, both samples and the (mean, logvar) of p_B(·|b_t1), p_B(·|b_t2),
        q_S and p_T(·|z_t1, t2 − t1).
        """
        frames = self.split(x)
        b = self.beliefs(frames)
        rows = torch.arange(len(x), device=x.device)
        b1, b2 = b[rows, t1], b[rows, t2]
        pb2 = self.belief(b2)
        z2 = reparameterize(*pb2, eps2)
        qs = self.smoothing(z2, b1, b2)
        z1 = reparameterize(*qs, eps1)
        pb1 = self.belief(b1)
        pt = self.transition(z1, t2 - t1)
        return {"x2": frames[rows, t2], "x2_logits": self.decode(z2), "z1": z1, "z2": z2,
                "pb1_mean": pb1[0], "pb1_logvar": pb1[1], "pb2_mean": pb2[0], "pb2_logvar": pb2[1],
                "qs_mean": qs[0], "qs_logvar": qs[1], "pt_mean": pt[0], "pt_logvar": pt[1]}

    # ------------------------------------------------------------------ inference

    def jump(self, z: torch.Tensor, steps: int, gen: torch.Generator | None = None,
             sample: bool = True) -> torch.Tensor:
        """z_{t+steps} from z_t by jumps of at most ``max_jump``: ceil(steps / max_jump) transition calls."""
        left = steps
        while left > 0:
            d = min(left, self.max_jump)
            mean, logvar = self.transition(z, torch.full((len(z),), d, device=z.device, dtype=torch.long))
            z = reparameterize(mean, logvar, _randn(mean, gen)) if sample else mean
            left -= d
        return z

    @torch.no_grad()
    def predict(self, context: torch.Tensor, horizons: Sequence[int], gen: torch.Generator | None = None,
                samples: int = 1) -> dict[int, torch.Tensor]:
        """Frames k steps after the last of ``context`` (B, Tc, C, H, W), for each k in ``horizons``.

        z_t ~ p_B(· | b_t) at the last context frame, then one jump per horizon straight to t + k
        (p_T with δ = k, chained only when k > max_jump), decoded as Bernoulli means mapped to [-1, 1].
        With ``samples`` > 1 the frames are averaged over that many draws (the predictive mean).
        Returns {k: (samples, B, C, H, W)}.
        """
        b = self.beliefs(context)[:, -1]
        mean, logvar = self.belief(b)
        out: dict[int, list[torch.Tensor]] = {int(k): [] for k in horizons}
        for _ in range(samples):
            z = reparameterize(mean, logvar, _randn(mean, gen))
            for k in out:
                out[k].append(torch.sigmoid(self.decode(self.jump(z, k, gen))) * 2 - 1)
        return {k: torch.stack(v) for k, v in out.items()}

    @torch.no_grad()
    def filter_reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        """Each frame decoded from the mean of its belief p_B(z_t | b_t) -> (B, T, C, H, W) in [-1, 1]."""
        b = self.beliefs(frames)
        z = self.belief(b)[0]
        recon = torch.sigmoid(self.decode(z.flatten(0, 1))) * 2 - 1
        return recon.view(*frames.shape)


def _randn(like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


def jumps_needed(steps: int, max_jump: int) -> int:
    """Transition calls for a ``steps``-ahead prediction: ceil(steps / max_jump)."""
    return math.ceil(steps / max_jump)
