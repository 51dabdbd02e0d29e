"""Convolutional blocks of the SINGER UNets, with diffusers' (SD-1.5's) names::

    resnets.k                       ResnetBlock: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
    downsamplers.0 / upsamplers.0   conv

Applied per frame, frames folded into the batch (``N = B * F``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["Downsample", "ResnetBlock", "Upsample"]


class ResnetBlock(nn.Module):
    """SD-1.5 ResNet block (diffusers ``ResnetBlock2D`` names), applied per frame.

    ``forward(x (N, C, H, W), *, temb (B, T), frames=F) -> (N, C_out, H, W)`` with ``N = B * F``; the time
    embedding projection is computed once per sample and broadcast over its frames.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, *, temb: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_emb_proj(F.silu(temb)).to(h.dtype)  # (B, C)
        h = rearrange(h, "(b f) c x y -> b f c x y", f=frames) + rearrange(t, "b c -> b 1 c 1 1")
        h = rearrange(h, "b f c x y -> (b f) c x y")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (``conv``): (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 (or to ``size``) then a 3x3 convolution (``conv``): (N, C, H, W) -> (N, C, 2H, 2W) or
    (N, C, *size)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, *, size: Sequence[int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
