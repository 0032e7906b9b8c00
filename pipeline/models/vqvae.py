"""VQ-VAE and the two-level VQ-VAE-2 (notes 1.3.2, eq. 11-13; van den Oord et al. 2017, Razavi et al. 2019).

The quantiser keeps its codebook as buffers and updates it by EMA (eq. 13) inside its forward pass in
training mode, so the training loop needs nothing special: the statistics of every worker are summed with
``torch.distributed.all_reduce`` when a process group is up, and restarts of dead codes (and the
codebook's initialisation from data) are drawn on rank 0 and broadcast, so every rank holds the same
codebook. The arithmetic is in :mod:`pipeline.objectives.vq`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.models import register
from pipeline.models.autoencoder import _Decoder, _Encoder
from pipeline.objectives.vq import (
    code_stats,
    ema_update,
    nearest_code,
    normalised_codebook,
    random_rows,
    restart_codes,
    straight_through,
)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(nn.Module):
    """A codebook of `num_codes` vectors of size `dim`; maps (B, dim, H, W) maps to their nearest codes (eq. 11).

    ``ema=True``: the codebook is a buffer updated by eq. 13 with decay γ=`decay` and Laplace smoothing `eps`;
    ``ema=False``: it is a parameter trained by the codebook term of eq. 12. Either way, a code no encoder
    output chose for `restart_after` training steps in a row (over all workers) is re-initialised from an
    encoder output of the current batch (0 turns restarts off); with `data_init` the codebook starts from
    encoder outputs of the first training batch.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, restart_after: int = 20,
                 ema: bool = True, data_init: bool = True) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes ({num_codes}) and dim ({dim}) must be positive")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim, self.decay, self.eps = num_codes, dim, decay, eps
        self.restart_after, self.ema, self.data_init = restart_after, ema, data_init
        # the same initial codebook on every rank (DeepSpeed broadcasts parameters, not buffers)
        init = torch.randn(num_codes, dim, generator=torch.Generator().manual_seed(num_codes * 1009 + dim))
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("unused", torch.zeros(num_codes, dtype=torch.long))  # steps since last chosen
        self.register_buffer("initialized", torch.tensor(0 if data_init else 1, dtype=torch.long))

    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of a (B, dim, H, W) map, never updating anything: (z_q, codes (B, H, W))."""
        b, d, h, w = z.shape
        codes = nearest_code(z.detach().permute(0, 2, 3, 1).reshape(-1, d), self.codebook).view(b, h, w)
        return self.embed(codes).to(z.dtype), codes

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> their vectors (B, dim, H, W)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through z_q, z_q, codes). In training mode the codebook is updated after the lookup."""
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        if self.training and not bool(self.initialized):
            self._init_from(flat)
        z_q, codes = self.lookup(z_e)
        if self.training:
            self._update(flat, codes.flatten())
        return straight_through(z_e, z_q), z_q, codes

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        rows = _broadcast(random_rows(flat, self.num_codes))
        self.codebook.data.copy_(rows)
        if self.ema:
            self.embed_sum.copy_(rows)
            self.cluster_size.fill_(1.0)
        self.initialized.fill_(1)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        counts, sums = code_stats(flat, codes, self.num_codes)  # eq. 13: n_i and Σ_j z_ij of this batch
        if _world() > 1:  # the statistics of the global batch: identical on every rank
            stats = torch.cat([counts[:, None], sums], 1)
            dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        self.unused.copy_(torch.where(counts > 0, torch.zeros_like(self.unused), self.unused + 1))
        if self.ema:
            n, m = ema_update(self.cluster_size, self.embed_sum, counts, sums, self.decay)  # eq. 13
            self.cluster_size.copy_(n)
            self.embed_sum.copy_(m)
            self.codebook.copy_(normalised_codebook(n, m, self.eps))  # eq. 13
        if self.restart_after > 0:
            dead = self.unused >= self.restart_after
            if bool(dead.any()):  # the same decision on every rank: `unused` follows the all-reduced counts
                candidates = _broadcast(random_rows(flat, self.num_codes))
                if self.ema:
                    e, n, m = restart_codes(self.codebook, self.cluster_size, self.embed_sum, dead, candidates)
                    self.cluster_size.copy_(n)
                    self.embed_sum.copy_(m)
                else:
                    e = torch.where(dead[:, None], candidates, self.codebook)
                self.codebook.data.copy_(e)
                self.unused.masked_fill_(dead, 0)


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank (a no-op in one process)."""
    if _world() > 1:
        t = t.contiguous()
        dist.broadcast(t, src=0)
    return t


class _VQBase(nn.Module):
    """What the `vq` objective and the prior stage use: per-level code counts, codes in and out."""

    level_names: tuple[str, ...] = ()
    quantizers: nn.ModuleList

    @property
    def codes_per_level(self) -> list[int]:
        """Codebook size of each level, in the order of `encode_codes`."""
        return [q.num_codes for q in self.quantizers]

    @property
    def ema(self) -> bool:
        """True when the codebooks follow eq. 13 (no codebook term in the loss)."""
        return all(q.ema for q in self.quantizers)


def _quantizer(num_codes: int, dim: int, decay: float, eps: float, restart_after: int, ema: bool
               ) -> VectorQuantizer:
    return VectorQuantizer(num_codes, dim, decay=decay, eps=eps, restart_after=restart_after, ema=ema)


@register("vq_vae")
class VQVAE(_VQBase):
    """Convolutional VQ-VAE: encoder → nearest code (eq. 11) → decoder, one latent map at 1/2^(levels-1).

    ``latent_channels`` is the code dimension (so it can replace `kl_vae` as the LDM first stage with the
    same arguments). For latent diffusion, :meth:`encode` gives the pre-quantisation latents and
    :meth:`decode` quantises before decoding (the VQ variant of LDM).
    """

    level_names = ("codes",)

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, latent_channels: int = 4, num_codes: int = 128, decay: float = 0.99,
                 eps: float = 1e-5, restart_after: int = 20, ema: bool = True) -> None:
        super().__init__()
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = _Encoder(in_channels, base_channels, channel_mult, num_res_blocks, latent_channels)
        self.quantizers = nn.ModuleList([_quantizer(num_codes, latent_channels, decay, eps, restart_after, ema)])
        self.decoder = _Decoder(latent_channels, base_channels, channel_mult, num_res_blocks, in_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x (B, C, H, W) -> (z_e (B, latent_channels, H/f, W/f), None): latents before quantisation."""
        return self.encoder(x), None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise continuous latents to their nearest codes, then decode (never updates the codebook)."""
        z_q, _ = self.quantizers[0].lookup(z)
        return self.decoder(z_q)

    def encode_codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[codes (B, h, w)]."""
        return [self.quantizers[0].lookup(self.encoder(x))[1]]

    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Images from code indices."""
        return self.decoder(self.quantizers[0].embed(codes[0]))

    def forward(self, x: torch.Tensor):
        """(x_hat, [z_e], [z_q], [codes]); the decoder sees the straight-through z_q."""
        z_e = self.encoder(x)
        z_st, z_q, codes = self.quantizers[0](z_e)
        return self.decoder(z_st), [z_e], [z_q], [codes]


@register("vq_vae2")
class VQVAE2(_VQBase):
    """Two-level VQ-VAE-2 (Razavi et al.): a top map (global shape) and a bottom map (local detail).

    bottom features h_b = E_b(x) at 1/2^(len(channel_mult)-1); top latents z_t = E_t(h_b), a further
    1/2^(len(top_channel_mult)-1); the bottom latents are quantised from [h_b, D_t(q(z_t))]; the decoder
    sees [q(z_b), upsampled q(z_t)]. `num_codes` is one size for both codebooks or [top, bottom].
    """

    level_names = ("top", "bottom")

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 top_channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, latent_channels: int = 4,
                 num_codes: int | Sequence[int] = 64, decay: float = 0.99, eps: float = 1e-5,
                 restart_after: int = 20, ema: bool = True) -> None:
        super().__init__()
        if len(top_channel_mult) < 2:
            raise ValueError("top_channel_mult needs at least two entries (the top map is downsampled at least 2x)")
        k_top, k_bottom = (num_codes, num_codes) if isinstance(num_codes, int) else tuple(num_codes)
        d, hidden = latent_channels, base_channels * channel_mult[-1]
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.enc_b = _Encoder(in_channels, base_channels, channel_mult, num_res_blocks, hidden)
        self.enc_t = _Encoder(hidden, base_channels, top_channel_mult, num_res_blocks, d)
        self.dec_t = _Decoder(d, base_channels, top_channel_mult, num_res_blocks, d)  # top → bottom resolution
        self.pre_b = nn.Conv2d(hidden + d, d, 1)
        ups: list[nn.Module] = []
        for i in range(len(top_channel_mult) - 1):
            ups += [nn.ReLU()] if i else []
            ups.append(nn.ConvTranspose2d(d, d, 4, stride=2, padding=1))
        self.up_t = nn.Sequential(*ups)
        self.quantizers = nn.ModuleList([_quantizer(k, d, decay, eps, restart_after, ema) for k in (k_top, k_bottom)])
        self.decoder = _Decoder(2 * d, base_channels, channel_mult, num_res_blocks, in_channels)

    def encode_codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[top codes (B, h_t, w_t), bottom codes (B, h_b, w_b)]."""
        h_b = self.enc_b(x)
        z_qt, top = self.quantizers[0].lookup(self.enc_t(h_b))
        _, bottom = self.quantizers[1].lookup(self.pre_b(torch.cat([h_b, self.dec_t(z_qt)], 1)))
        return [top, bottom]

    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Images from [top, bottom] code indices."""
        z_t, z_b = self.quantizers[0].embed(codes[0]), self.quantizers[1].embed(codes[1])
        return self.decoder(torch.cat([z_b, self.up_t(z_t)], 1))

    def forward(self, x: torch.Tensor):
        """(x_hat, [z_e top, z_e bottom], [z_q top, z_q bottom], [codes top, codes bottom])."""
        h_b = self.enc_b(x)
        z_et = self.enc_t(h_b)
        st_t, z_qt, top = self.quantizers[0](z_et)
        z_eb = self.pre_b(torch.cat([h_b, self.dec_t(st_t)], 1))
        st_b, z_qb, bottom = self.quantizers[1](z_eb)
        x_hat = self.decoder(torch.cat([st_b, self.up_t(st_t)], 1))
        return x_hat, [z_et, z_eb], [z_qt, z_qb], [top, bottom]


__all__ = ["VQVAE", "VQVAE2", "VectorQuantizer"]
