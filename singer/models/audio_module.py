"""Hallo's audio module (``AudioTemporalBasicTransformerBlock`` in a ``Transformer3DModel``) and its masks.

Names (Hallo's ``denoising_unet.*.audio_modules.k`` keys)::

    audio_modules.k     AudioModule: norm, proj_in, transformer_blocks.0.{norm1, attn1, norm2, attn2_0/1/2,
                        zero_conv_full/face/lip, norm3, ff}, proj_out

Each row of the folded batch (``N = B * F``) cross-attends to its own frame's audio tokens; the three
cross-attentions are weighted by the full (background), face and lip masks (``MASK_NAMES``).

Initialisation. ``proj_out`` has PyTorch's default init, as in Hallo. Hallo zero-initialises the zero convs.
Here they start at ``ZERO_CONV_INIT_SCALE`` times PyTorch's default init (bias zero). The reason: the paper
preset trains the audio encoder, the audio projection, MSM and SFM with the audio modules frozen. A frozen
module whose output ignores the audio (exact zeros in ``zero_conv_*`` or ``proj_out``) has a zero derivative
with respect to the audio tokens. Every gradient to the audio side would then be exactly zero, and a model built
from scratch with those groups trainable could never learn them. So a fresh audio module is deliberately not
an identity: it is close to Hallo's fresh module and lets gradients through. Released Hallo weights overwrite
all of these layers (``singer convert``), so a model with pretrained audio modules computes the same as before.
Scaling the weights PyTorch has already drawn consumes no random numbers, so every other parameter of a
freshly built model is the same as with zero init.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from singer.models.attention import (
    Attention,
    FeedForward,
    fold_tokens,
    merge_heads,
    split_heads,
    unfold_tokens,
)

__all__ = [
    "MASK_NAMES", "ZERO_CONV_INIT_SCALE", "AudioMasks", "AudioModule", "AudioTransformerBlock", "resize_masks",
]

MASK_NAMES = ("full", "face", "lip")  # attn2_0, attn2_1, attn2_2 of the audio modules
ZERO_CONV_INIT_SCALE = 0.1  # the zero convs' init: this times PyTorch's default (Hallo's: 0); see the docstring


class AudioMasks(NamedTuple):
    """The masks of one block resolution, each (N, h*w, 1) in [0, 1], or None (weight 1 everywhere)."""

    full: torch.Tensor | None = None
    face: torch.Tensor | None = None
    lip: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> AudioMasks:
        return AudioMasks(*(None if mask is None else mask.to(dtype) for mask in self))


def resize_masks(
    masks: Mapping[str, torch.Tensor | None], batch: int, frames: int, sizes: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], AudioMasks]:
    """The masks at every block resolution: ``{(h, w): AudioMasks}`` (float32, frames folded into the batch).

    ``masks``: {"full" (or "pose"), "face", "lip"}, each either
    * (B, 1, H, W) (the same for every frame) or (B, F, 1, H, W), any resolution: downscaled with area, upscaled
      with bilinear interpolation; or
    * a list with one mask per level (``sizes``, largest first, as Hallo's pipeline gives them), each
      (B, F, h*w) or (B, 1 or F, h, w) at exactly that level's size.
    """
    levels = list(dict.fromkeys(sizes))
    base: dict[str, torch.Tensor] = {}
    given: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for name in MASK_NAMES:
        mask = masks.get(name)
        if mask is None and name == "full":
            mask = masks.get("pose")
        if mask is None:
            continue
        if isinstance(mask, (list, tuple)):
            given[name] = _per_level(name, mask, batch, frames, levels)
            continue
        if mask.ndim == 4 and mask.shape[:2] == (batch, 1):
            mask = repeat(mask, "b 1 h w -> (b f) 1 h w", f=frames)
        elif mask.ndim == 5 and mask.shape[:3] == (batch, frames, 1):
            mask = rearrange(mask, "b f 1 h w -> (b f) 1 h w")
        else:
            raise ValueError(f"mask {name!r}: expected (B, 1, H, W) or (B, F, 1, H, W), got {tuple(mask.shape)}")
        base[name] = mask.float()

    def level(name: str, size: tuple[int, int]) -> torch.Tensor | None:
        return given[name][size] if name in given else _resized(base.get(name), size)

    return {size: AudioMasks(*(level(name, size) for name in MASK_NAMES)) for size in levels}


def _per_level(name: str, masks: Sequence[torch.Tensor], batch: int, frames: int,
               levels: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """One mask per level -> {(h, w): (B*F, h*w, 1) float32}."""
    if len(masks) < len(levels):
        raise ValueError(f"mask {name!r}: {len(masks)} levels given, the UNet has {len(levels)} ({levels})")
    out = {}
    for (h, w), mask in zip(levels, masks):
        if mask.ndim == 3 and mask.shape == (batch, frames, h * w):
            flat = rearrange(mask, "b f l -> (b f) l 1")
        elif mask.ndim == 4 and mask.shape[0] == batch and mask.shape[1] in (1, frames) and mask.shape[2:] == (h, w):
            flat = repeat(mask, "b k h w -> (b k r) (h w) 1", r=frames // mask.shape[1])
        else:
            raise ValueError(
                f"mask {name!r} at level {h}x{w}: expected (B, F, {h * w}) or (B, 1|F, {h}, {w}), got {tuple(mask.shape)}"
            )
        out[(h, w)] = flat.float()
    return out


def _resized(mask: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """(N, 1, H, W) -> (N, h*w, 1)."""
    if mask is None:
        return None
    h, w = size
    if tuple(mask.shape[-2:]) != (h, w):
        if mask.shape[-2] >= h and mask.shape[-1] >= w:
            mask = F.interpolate(mask, size=(h, w), mode="area")
        else:
            mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    return rearrange(mask, "n 1 h w -> n (h w) 1")


class AudioTransformerBlock(nn.Module):
    """Hallo's audio block: spatial self-attention, then three per-frame cross-attentions to the audio tokens.

    ``attn2_0`` (weighted by the full/pose mask), ``attn2_1`` (face mask), ``attn2_2`` (lip mask), each followed by
    its mask and a 1x1 ``zero_conv_*`` (small at init, ``ZERO_CONV_INIT_SCALE``; Hallo's are zero), summed into
    the residual stream; then ``ff``.

    ``forward(tokens (N, L, C), *, audio_tokens (N, Na, Da), masks: AudioMasks) -> (N, L, C)``.
    """

    def __init__(self, dim: int, heads: int, audio_dim: int):
        super().__init__()
        self.zero_conv_full = nn.Conv2d(dim, dim, 1)
        self.zero_conv_face = nn.Conv2d(dim, dim, 1)
        self.zero_conv_lip = nn.Conv2d(dim, dim, 1)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2_0 = Attention(dim, heads, dim // heads, context_dim=audio_dim)
        self.attn2_1 = Attention(dim, heads, dim // heads, context_dim=audio_dim)
        self.attn2_2 = Attention(dim, heads, dim // heads, context_dim=audio_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)
        with torch.no_grad():  # small, not zero: see the module docstring
            for conv in (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip):
                conv.weight.mul_(ZERO_CONV_INIT_SCALE)
                conv.bias.zero_()

    def audio_attention(self, x: torch.Tensor, audio_tokens: torch.Tensor) -> list[torch.Tensor]:
        """The three cross-attention outputs (before masks and zero convs), computed in one SDPA call.

        ``x`` (N, L, C) normed tokens, ``audio_tokens`` (N, Na, Da) the tokens of each row's own frame;
        returns three (N, L, C).
        """
        attns = (self.attn2_0, self.attn2_1, self.attn2_2)
        heads = 3 * self.attn2_0.heads
        q = F.linear(x, torch.cat([a.to_q.weight for a in attns]))
        k = F.linear(audio_tokens, torch.cat([a.to_k.weight for a in attns]))
        v = F.linear(audio_tokens, torch.cat([a.to_v.weight for a in attns]))
        out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
        parts = merge_heads(out).chunk(3, dim=-1)
        return [a.to_out[1](a.to_out[0](p)) for a, p in zip(attns, parts)]

    def forward(self, tokens: torch.Tensor, *, audio_tokens: torch.Tensor, masks: AudioMasks,
                motion_scale: Sequence[float] | None = None) -> torch.Tensor:
        tokens = self.attn1(self.norm1(tokens)) + tokens
        outs = self.audio_attention(self.norm2(tokens), audio_tokens.to(tokens.dtype))
        convs = (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip)
        scales = (1.0, 1.0, 1.0) if motion_scale is None else tuple(motion_scale)
        branches = []
        for out, mask, conv, scale in zip(outs, masks, convs, scales):
            if mask is not None:
                out = out * mask.to(out.dtype)
            out = F.linear(out, conv.weight.flatten(1), conv.bias)  # the 1x1 conv, on tokens
            branches.append(out if scale == 1.0 else scale * out)
        # Hallo's order of the sum (``attention.py:885-890``): full + face + lip, then the residual
        tokens = branches[0] + branches[1] + branches[2] + tokens
        return self.ff(self.norm3(tokens)) + tokens


class AudioModule(nn.Module):
    """Hallo's audio module: ``norm`` (GroupNorm), ``proj_in`` (1x1, channels -> inner), one
    ``AudioTransformerBlock`` at width ``inner``, ``proj_out`` (1x1, inner -> channels), residual.

    Hallo's inner width is not always the block's width: it is the block's input width for the first layer of a
    down block and the up block's skip-input width for every layer of an up block (e.g. 640 -> 320 -> 640 in
    ``down_blocks.1.audio_modules.0``); ``singer.models.unet_blocks`` reproduces that.

    ``forward(x (N, C, H, W), *, audio_tokens (N, Na, Da), masks: AudioMasks | None) -> (N, C, H, W)``: the masks
    are (N, H*W, 1) in [0, 1] (None, or a None mask: weight 1 everywhere).

    ``proj_out`` has PyTorch's default init, like Hallo's. A fresh module is therefore not an identity, and
    its output depends on the audio even while it is frozen (see the module docstring). Released weights
    overwrite it.
    """

    def __init__(self, channels: int, heads: int, audio_dim: int, groups: int, inner: int | None = None):
        super().__init__()
        inner = inner or channels
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([AudioTransformerBlock(inner, heads, audio_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)  # PyTorch's default init, as in Hallo

    def forward(
        self, x: torch.Tensor, *, audio_tokens: torch.Tensor, masks: AudioMasks | None = None,
        motion_scale: Sequence[float] | None = None,
    ) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = fold_tokens(self.proj_in(self.norm(x)))
        tokens = self.transformer_blocks[0](tokens, audio_tokens=audio_tokens, masks=masks or AudioMasks(),
                                            motion_scale=motion_scale)
        return self.proj_out(unfold_tokens(tokens, h, w)) + x
