"""Attention layers of the SINGER UNets (DESIGN.md section 3), named like Hallo's so released weights load by name.

Every tensor inside a UNet keeps the frames folded into the batch: ``(N, C, H, W)`` with ``N = B * F``,
frame-major per sample (row ``b * F + f``); only the motion modules unfold the frame axis. Names (Hallo's
``denoising_unet.`` / ``reference_unet.`` keys, SD-1.5's)::

    attentions.k        SpatialTransformer: norm, proj_in, transformer_blocks.0.{norm1, attn1, norm2, attn2,
                        norm3, ff.net.0.proj, ff.net.2}, proj_out
    attn*               Attention: to_q, to_k, to_v, to_out.0

All attention goes through ``F.scaled_dot_product_attention``. The modules have no side effects, so they can be
wrapped by (non-reentrant) gradient checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

__all__ = [
    "GEGLU",
    "Attention",
    "FeedForward",
    "SpatialTransformer",
    "SpatialTransformerBlock",
    "broadcast_rows",
    "fold_tokens",
    "merge_heads",
    "split_heads",
    "unfold_tokens",
]


# --------------------------------------------------------------------------------------------------------------
# tensor helpers


def broadcast_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat each row of ``t`` ``rows // B`` times consecutively: (B, ...) -> (rows, ...).

    Matches the frame-major folding ``N = B * F``: sample ``b`` goes to rows ``b*F .. b*F + F - 1``.
    """
    b = t.shape[0]
    if b == rows:
        return t
    if rows % b:
        raise ValueError(f"cannot broadcast a batch of {b} to {rows} rows")
    return repeat(t, "b ... -> (b k) ...", k=rows // b)


def fold_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C)."""
    return rearrange(x, "n c h w -> n (h w) c")


def unfold_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H*W, C) -> (N, C, H, W) (contiguous)."""
    return rearrange(x, "n (h w) c -> n c h w", h=h, w=w).contiguous()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, heads*d) -> (N, heads, L, d)."""
    return rearrange(x, "n l (heads d) -> n heads l d", heads=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, L, heads*d)."""
    return rearrange(x, "n heads l d -> n l (heads d)")


# --------------------------------------------------------------------------------------------------------------
# attention and feed-forward


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    ``forward(x, *, context=None, extra=None) -> (N, L, C)``:

    * ``x`` (N, L, C) are the queries (and the keys/values when ``context`` is None).
    * ``context`` (Nc, Lc, Cc) with ``N % Nc == 0``: keys/values shared by groups of ``N // Nc`` consecutive rows
      (face tokens of a clip are shared by its frames). The frames are then folded into the query length
      instead of copying the context per frame, which is exact because attention is per query.
    * ``extra`` (Ne, Le, C) with ``N % Ne == 0``: extra keys/values appended to those of ``x`` (or of
      ``context``), shared by groups of rows the same way (reference-only attention: a frame's own tokens plus
      the reference image's tokens). Their projections are computed once per group, then broadcast.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(
        self, x: torch.Tensor, *, context: torch.Tensor | None = None, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, length, _ = x.shape
        src = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(src)
        v = self.to_v(src)
        if extra is not None:
            rows = k.shape[0]
            k = torch.cat([k, broadcast_rows(self.to_k(extra), rows)], dim=1)
            v = torch.cat([v, broadcast_rows(self.to_v(extra), rows)], dim=1)
        groups = k.shape[0]
        if groups != n:  # keys/values shared by n // groups consecutive rows: fold them into the queries
            if n % groups:
                raise ValueError(f"{n} query rows cannot share {groups} key/value rows")
            q = rearrange(q, "(g k) l d -> g (k l) d", g=groups)
        out = F.scaled_dot_product_attention(
            split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        )
        out = rearrange(merge_heads(out), "g (k l) d -> (g k) l d", l=length)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """``proj`` then ``a * gelu(gate)`` (diffusers' GEGLU names): (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with diffusers' names (``net.0.proj``, ``net.2``): (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------------------
# spatial transformer (self-attention with reference keys/values + cross-attention to face tokens)


class SpatialTransformerBlock(nn.Module):
    """``norm1 -> attn1`` (self, + reference K/V) ``-> norm2 -> attn2`` (face tokens) ``-> norm3 -> ff``.

    Holds the weights only; ``SpatialTransformer`` runs them (it needs the attn1 input in between).
    """

    def __init__(self, dim: int, heads: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)


class SpatialTransformer(nn.Module):
    """SD-1.5 ``Transformer2DModel`` (conv ``proj_in``/``proj_out``), per frame, with reference-only attention.

    ``forward(x, *, face_tokens=None, reference=None) -> (N, C, H, W)`` (the denoising UNet):

    * ``x`` (N, C, H, W), ``N = B * F``.
    * ``face_tokens`` (B or N, Nf, D), the keys/values of ``attn2``; None skips it.
    * ``reference`` (B, L, C): extra keys/values of every frame's ``attn1`` (the reference UNet's attn1 inputs
      at this layer, ``L = R*H*W`` for R images; which of them, the caller decides).
    * ``reference_keep`` (B,) bool or None (all): the samples that attend to ``reference``; the frames of the
      others run plain self-attention (the unconditional branch of classifier-free guidance, as in Hallo).
    * ``reference_rows`` (N,) long or None: the sample whose ``reference`` each row attends to (default: its
      own). Only to reproduce Hallo's reference-to-frame assignment (see ``DenoisingUNet3D.forward``).

    ``forward_with_attn1_input(x, *, face_tokens=None) -> ((N, C, H, W), (N, H*W, C))`` (the reference UNet): the
    output and the input of ``attn1`` (the LayerNorm-ed tokens, what the denoising UNet attends to).

    ``attn1_input_only`` (set at construction, for the reference UNet's last layer, the last operation of that
    UNet): only the attn1 input is needed, so ``forward_with_attn1_input`` returns ``x`` unchanged as the
    output, and ``attn1``, ``norm2``, ``attn2``, ``norm3``, ``ff`` and ``proj_out`` never run (their weights
    exist so that checkpoints map one to one).
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, groups: int,
                 attn1_input_only: bool = False):
        super().__init__()
        self.attn1_input_only = attn1_input_only
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([SpatialTransformerBlock(channels, heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def unused_parameter_names(self) -> list[str]:
        """Parameters that never run (only with ``attn1_input_only``), relative to this module."""
        if not self.attn1_input_only:
            return []
        keep = ("norm.", "proj_in.", "transformer_blocks.0.norm1.")
        return [name for name, _ in self.named_parameters() if not name.startswith(keep)]

    def forward(
        self,
        x: torch.Tensor,
        *,
        face_tokens: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        reference_keep: torch.Tensor | None = None,
        reference_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = fold_tokens(self.proj_in(self.norm(x)))
        normed = self.transformer_blocks[0].norm1(tokens)
        if reference is not None and reference_rows is not None:
            reference = reference[reference_rows]  # (N, L, C): each row its own sample's, unless told otherwise
        return self._transform(x, tokens, normed, face_tokens, reference, reference_keep)

    def forward_with_attn1_input(
        self, x: torch.Tensor, *, face_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = fold_tokens(self.proj_in(self.norm(x)))
        attn1_input = self.transformer_blocks[0].norm1(tokens)
        if self.attn1_input_only:
            return x, attn1_input
        return self._transform(x, tokens, attn1_input, face_tokens, None), attn1_input

    def _transform(self, x: torch.Tensor, tokens: torch.Tensor, normed: torch.Tensor,
                   face_tokens: torch.Tensor | None, reference: torch.Tensor | None,
                   reference_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of the layer from the tokens (N, H*W, C) and the attn1 input ``normed``: -> (N, C, H, W).

        ``reference_keep`` (B,) bool: samples whose frames attend to ``reference``; the others redo plain
        self-attention (Hallo's unconditional rows, ``mutual_self_attention.py`` ``uc_mask``)."""
        block = self.transformer_blocks[0]
        keep = None if reference is None or reference_keep is None else reference_keep.to(torch.bool)
        if reference is None or (keep is not None and not bool(keep.any())):
            attended = block.attn1(normed)
        elif keep is None or bool(keep.all()):
            attended = block.attn1(normed, extra=reference.to(normed.dtype))
        else:  # some samples with the reference, the others without: each group in its own call
            rows = broadcast_rows(keep, normed.shape[0])
            attended = torch.zeros_like(normed)
            chosen = reference[rows] if reference.shape[0] == normed.shape[0] else reference[keep]
            attended[rows] = block.attn1(normed[rows], extra=chosen.to(normed.dtype))
            attended[~rows] = block.attn1(normed[~rows])
        tokens = attended + tokens
        if face_tokens is not None:
            tokens = block.attn2(block.norm2(tokens), context=face_tokens.to(tokens.dtype)) + tokens
        tokens = block.ff(block.norm3(tokens)) + tokens
        return self.proj_out(unfold_tokens(tokens, x.shape[-2], x.shape[-1])) + x
