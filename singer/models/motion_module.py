"""AnimateDiff v2 / Hallo motion module (``VanillaTemporalModule``): temporal self-attention over frames.

Names (AnimateDiff's ``mm_sd_v15_v2.ckpt`` / Hallo's ``denoising_unet.*.motion_modules.k`` keys)::

    motion_modules.k    MotionModule: temporal_transformer.{norm, proj_in, transformer_blocks.0.{
                        attention_blocks.0/1 (+ pos_encoder.pe), norms.0/1, ff, ff_norm}, proj_out}
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from singer.models.attention import Attention, FeedForward

__all__ = ["MotionModule", "PositionalEncoding", "TemporalAttention", "TemporalTransformer",
           "TemporalTransformerBlock"]


class PositionalEncoding(nn.Module):
    """Sinusoidal temporal positions; persistent buffer ``pe`` (1, max_len, C), added to the input (N, F, C)."""

    def __init__(self, dim: int, max_len: int = 32):
        super().__init__()
        self.register_buffer("pe", self.table(dim, max_len), persistent=True)

    @staticmethod
    def table(dim: int, max_len: int) -> torch.Tensor:
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)[:, : dim // 2]
        return pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.pe.shape[1]:
            raise ValueError(f"{length} frames exceed the positional encoding's max_len {self.pe.shape[1]}")
        return x + self.pe[:, :length].to(x.dtype)


class TemporalAttention(Attention):
    """Self-attention over frames with the positions added to its input (``pos_encoder``): (N, F, C) -> same."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__(dim, heads, dim // heads)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(self.pos_encoder(x))


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions (``attention_blocks.0/1`` with ``norms.0/1``), then ``ff`` (``ff_norm``):
    (N, F, C) -> same."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    """``norm`` (GroupNorm per frame), ``proj_in`` (Linear), blocks over the frames of each pixel, ``proj_out``
    (Linear, zero-initialised), residual.

    ``forward(x (B*F, C, H, W), *, frames=F) -> (B*F, C, H, W)``.
    """

    def __init__(self, channels: int, heads: int, max_len: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, max_len)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, *, frames: int) -> torch.Tensor:
        _, _, h, w = x.shape
        t = self.proj_in(rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=frames))
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        return rearrange(t, "(b h w) f c -> (b f) c h w", h=h, w=w) + x


class MotionModule(nn.Module):
    """AnimateDiff motion module (``temporal_transformer``): temporal self-attention over the frames of each
    pixel; an exact identity at initialisation (zero ``proj_out``).

    ``forward(x (B*F, C, H, W), *, frames=F, prefix=None) -> (B*F, C, H, W)``: ``prefix`` (B*M, C, H, W) frames
    (Hallo's motion frames, from the reference UNet) are prepended to each sample's frames for the attention
    and dropped after.
    """

    def __init__(self, channels: int, heads: int, max_len: int, groups: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, max_len, groups)

    def forward(self, x: torch.Tensor, *, frames: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is None:
            return self.temporal_transformer(x, frames=frames)
        b = x.shape[0] // frames
        m = prefix.shape[0] // b
        both = torch.cat(
            [rearrange(prefix, "(b m) c h w -> b m c h w", b=b), rearrange(x, "(b f) c h w -> b f c h w", b=b)], dim=1
        )
        out = self.temporal_transformer(rearrange(both, "b f c h w -> (b f) c h w"), frames=m + frames)
        return rearrange(rearrange(out, "(b f) c h w -> b f c h w", b=b)[:, m:], "b f c h w -> (b f) c h w")
