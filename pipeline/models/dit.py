"""Diffusion Transformer (DiT, notes section 2.7.3) with adaLN-Zero conditioning.

Latent (B, C, H, W) -> patchify (conv, patch p) -> (B, T, D) tokens + fixed 2-D sin-cos positions
-> ``depth`` transformer blocks modulated by c = emb(t) + emb(y) -> final adaLN layer -> unpatchify.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models import register
from pipeline.models.layers import TimestepEmbedder, multihead_attention


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding, (grid_size**2, dim), row-major over (row, col).

    Half of the channels encode the row index and half the column index, each with 1-D sin-cos
    features at frequencies 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed_1d(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * freqs[None]  # (T, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (T, dim/2)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: x + gate * f(LN(x) * (1 + scale) + shift) for attention and MLP.

    The modulation linear is zero-initialised, so all gates are zero and the block is the identity
    at initialisation. Optional cross-attention to a context (eq. 47-48) sits between self-attention
    and the MLP; its output projection is zero-initialised as well.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_proj = nn.Linear(hidden_size, hidden_size)
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_q = nn.Linear(hidden_size, hidden_size)  # W_Q, eq. 48
            self.cross_kv = nn.Linear(context_dim, 2 * hidden_size)  # W_K, W_V, eq. 48
            self.cross_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        # Input is SiLU(c), applied once in DiT.forward for all blocks.
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, T, d_h)
        out = F.scaled_dot_product_attention(q, k, v)  # eq. 47
        return self.attn_proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) tokens, c: (B, D) already SiLU-activated conditioning, context: (B, M, ctx)."""
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa)
        x = torch.addcmul(x, gate_msa, self.self_attention(h))
        if self.context_dim is not None and context is not None:
            q = self.cross_q(self.norm_cross(x))  # eq. 48: Q from image tokens
            k, v = self.cross_kv(context).chunk(2, dim=-1)  # eq. 48: K, V from context
            x = x + self.cross_proj(multihead_attention(q, k, v, self.num_heads))  # eq. 47
        h = torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp)
        return torch.addcmul(x, gate_mlp, self.mlp(h))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear projection to p*p*out_channels per token (zero-initialised)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm(x), 1 + scale))


class DiT(nn.Module):
    """Diffusion Transformer: ``forward(x, t, y=None, context=None) -> (B, out_channels, H, W)``.

    ``y`` holds class indices in [0, num_classes]; index ``num_classes`` (or ``y=None``) is the null
    label for classifier-free guidance. ``num_classes=0``/``None`` gives an unconditional model.
    With ``learn_sigma`` the output has 2 * in_channels channels (mean/eps prediction, then the
    variance interpolation values). ``context`` (B, M, context_dim) is used by cross-attention
    when ``context_dim`` is set.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 1000,
        learn_sigma: bool = True,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.context_dim = context_dim
        self.use_checkpoint = use_checkpoint
        self.grid_size = input_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Index num_classes is the "no label" embedding (classifier-free guidance).
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False
        )  # (1, T, D)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN modulation and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
            if block.context_dim is not None:
                nn.init.zeros_(block.cross_proj.weight)
                nn.init.zeros_(block.cross_proj.bias)
        for layer in (self.final_layer.adaLN_modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        b, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.view(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) float/long, y: (B,) long or None, context: (B, M, context_dim)."""
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(
                f"DiT built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)
        c = F.silu(c)  # shared SiLU of every adaLN modulation MLP
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, c, context, use_reentrant=False)
            else:
                h = block(h, c, context)
        return self.unpatchify(self.final_layer(h, c))


# name: (hidden_size, depth, num_heads)
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
_FIXED = ("patch_size", "hidden_size", "depth", "num_heads")


def _make_factory(size: str, patch_size: int) -> Callable[..., DiT]:
    hidden_size, depth, num_heads = DIT_SIZES[size]

    def factory(**kwargs) -> DiT:
        return DiT(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads, **kwargs)

    # Advertise DiT's own arguments minus the ones fixed by the size, so build_model validates kwargs.
    sig = inspect.signature(DiT)
    factory.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in sig.parameters.items() if name not in _FIXED]
    )
    factory.__name__ = factory.__qualname__ = f"DiT_{size}_{patch_size}"
    factory.__doc__ = f"DiT-{size}/{patch_size}: hidden {hidden_size}, depth {depth}, {num_heads} heads."
    return factory


register("dit")(DiT)
for _size in DIT_SIZES:
    for _patch in (2, 4, 8):
        register(f"DiT-{_size}/{_patch}")(_make_factory(_size, _patch))


def dit_param_count(name: str, **kwargs) -> int:
    """Number of parameters of a registered DiT, counted on the meta device (no memory used)."""
    from pipeline.models import build_model

    with torch.device("meta"):
        model = build_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


__all__ = ["DiT", "DiTBlock", "DIT_SIZES", "dit_param_count", "sincos_pos_embed_2d"]
