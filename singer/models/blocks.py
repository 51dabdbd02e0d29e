"""Building blocks of the SINGER UNets (DESIGN.md section 3), named like Hallo's so released weights load by name.

Every tensor inside a UNet is kept with the frames folded into the batch: ``(N, C, H, W)`` with ``N = B * F``,
frame-major per sample (row ``b * F + f``). Only the motion modules unfold the frame axis. Module and parameter
names follow Hallo's ``denoising_unet.`` / ``reference_unet.`` keys (SD-1.5 names plus ``motion_modules`` and
``audio_modules``), e.g.::

    attentions.k            SpatialTransformer: norm, proj_in, transformer_blocks.0.{norm1, attn1, norm2, attn2,
                            norm3, ff}, proj_out
    audio_modules.k         AudioModule: norm, proj_in, transformer_blocks.0.{norm1, attn1, norm2, attn2_0/1/2,
                            zero_conv_full/face/lip, norm3, ff}, proj_out
    motion_modules.k        MotionModule: temporal_transformer.{norm, proj_in, transformer_blocks.0.{
                            attention_blocks.0/1 (+ pos_encoder.pe), norms.0/1, ff, ff_norm}, proj_out}
    resnets.k               ResnetBlock: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
    downsamplers.0 / upsamplers.0   conv

All attention goes through ``F.scaled_dot_product_attention``. Every module here only takes positional tensor
arguments and has no side effects, so it can be wrapped by (non-reentrant) gradient checkpointing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "AudioModule",
    "AudioTransformerBlock",
    "Downsample",
    "FeedForward",
    "MotionModule",
    "PositionalEncoding",
    "ResnetBlock",
    "SpatialTransformer",
    "SpatialTransformerBlock",
    "TemporalTransformer",
    "TemporalTransformerBlock",
    "Upsample",
    "broadcast_rows",
    "fold_tokens",
    "unfold_tokens",
]


# --------------------------------------------------------------------------------------------------------------
# helpers


def broadcast_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat each row of ``t`` (B, ...) ``rows // B`` times consecutively: (B, ...) -> (rows, ...).

    Matches the frame-major folding ``N = B * F``: sample ``b`` goes to rows ``b*F .. b*F + F - 1``.
    """
    b = t.shape[0]
    if b == rows:
        return t
    if rows % b:
        raise ValueError(f"cannot broadcast a batch of {b} to {rows} rows")
    return t.unsqueeze(1).expand(b, rows // b, *t.shape[1:]).reshape(rows, *t.shape[1:])


def fold_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def unfold_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H*W, C) -> (N, C, H, W) (contiguous)."""
    n, _, c = x.shape
    return x.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, H*d) -> (N, H, L, d)."""
    n, length, inner = x.shape
    return x.view(n, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, H, L, d) -> (N, L, H*d)."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


# --------------------------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    ``forward(x, context=None, extra=None)``:

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
        self, x: torch.Tensor, context: torch.Tensor | None = None, extra: torch.Tensor | None = None
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
            q = q.reshape(groups, (n // groups) * length, -1)
        out = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
        out = _merge_heads(out).reshape(n, length, -1)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """``proj`` then ``a * gelu(gate)`` (diffusers' GEGLU names)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with diffusers' names: ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------------------
# convolutional blocks


class ResnetBlock(nn.Module):
    """SD-1.5 ResNet block (diffusers ``ResnetBlock2D`` names), applied per frame.

    ``forward(x (N, C, H, W), temb (B, T), frames)`` with ``N = B * frames``; the time embedding projection is
    computed once per sample and broadcast over its frames.
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

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_emb_proj(F.silu(temb)).to(h.dtype)  # (B, C)
        n, c, hh, ww = h.shape
        h = (h.view(n // frames, frames, c, hh, ww) + t[:, None, :, None, None]).view(n, c, hh, ww)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 (or to ``size``) then a 3x3 convolution (``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


# --------------------------------------------------------------------------------------------------------------
# spatial transformer (self-attention with reference keys/values + cross-attention to face tokens)


class SpatialTransformerBlock(nn.Module):
    """``norm1 -> attn1`` (self, + reference K/V) ``-> norm2 -> attn2`` (face tokens) ``-> norm3 -> ff``."""

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

    ``forward(x, face_tokens, reference, frames, temporal_motion_frames, collect, stop_after_collect)`` returns
    ``(x, normed, motion_prefix)``:

    * ``x`` (N, C, H, W), ``N = B * frames``.
    * ``face_tokens`` (B or N, Nf, D) or None (cross-attention skipped).
    * ``reference`` (B, R*H*W, C) or None: the reference UNet's attn1 inputs at this layer (R images: the
      reference frame, then motion frames). The reference frame's tokens are appended to every frame's keys and
      values. The motion frames' tokens are either appended too (``temporal_motion_frames=False``) or returned as
      ``motion_prefix`` (B*(R-1), C, H, W) for the following motion module, which prepends them to the frame
      axis (``True``, Hallo).
    * ``collect``: also return ``normed`` (N, H*W, C), the input of attn1 (what a reference UNet hands over).
      ``stop_after_collect``: return right after computing it (the output ``x`` is then unchanged).
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([SpatialTransformerBlock(channels, heads, cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        face_tokens: torch.Tensor | None,
        reference: torch.Tensor | None,
        frames: int,
        temporal_motion_frames: bool,
        collect: bool,
        stop_after_collect: bool,
    ):
        n, c, h, w = x.shape
        block = self.transformer_blocks[0]
        tokens = fold_tokens(self.proj_in(self.norm(x)))
        normed = block.norm1(tokens)
        if stop_after_collect:
            return x, normed, None
        extra, prefix = None, None
        if reference is not None:
            hw = h * w
            b = n // frames
            if reference.shape[0] != b or reference.shape[1] % hw or reference.shape[2] != c:
                raise ValueError(
                    f"reference state of shape {tuple(reference.shape)} does not fit a layer of {c} channels at "
                    f"{h}x{w} for batch {b}: expected (B, R*{hw}, {c})"
                )
            r = reference.shape[1] // hw
            if temporal_motion_frames and r > 1:
                extra = reference[:, :hw]
                motion = reference[:, hw:].reshape(b * (r - 1), hw, c)
                prefix = unfold_tokens(motion.to(x.dtype), h, w)
            else:
                extra = reference
            extra = extra.to(normed.dtype)
        tokens = block.attn1(normed, None, extra) + tokens
        if face_tokens is not None:
            tokens = block.attn2(block.norm2(tokens), face_tokens.to(tokens.dtype)) + tokens
        tokens = block.ff(block.norm3(tokens)) + tokens
        x = self.proj_out(unfold_tokens(tokens, h, w)) + x
        return x, (normed if collect else None), prefix


# --------------------------------------------------------------------------------------------------------------
# audio module (Hallo's AudioTemporalBasicTransformerBlock in a Transformer3DModel)


class AudioTransformerBlock(nn.Module):
    """Hallo's audio block: spatial self-attention, then three per-frame cross-attentions to the audio tokens.

    ``attn2_0`` (weighted by the full/pose mask), ``attn2_1`` (face mask), ``attn2_2`` (lip mask), each followed by
    its mask and a 1x1 ``zero_conv_*`` (zero-initialised), summed into the residual stream; then ``ff``.
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
        for conv in (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def audio_attention(self, x: torch.Tensor, audio: torch.Tensor) -> list[torch.Tensor]:
        """The three cross-attention outputs (before masks and zero convs), computed in one SDPA call.

        ``x`` (N, L, C) normed tokens, ``audio`` (N, Na, Da) the tokens of each row's own frame.
        """
        attns = (self.attn2_0, self.attn2_1, self.attn2_2)
        heads = self.attn2_0.heads
        q = F.linear(x, torch.cat([a.to_q.weight for a in attns]))
        k = F.linear(audio, torch.cat([a.to_k.weight for a in attns]))
        v = F.linear(audio, torch.cat([a.to_v.weight for a in attns]))
        out = F.scaled_dot_product_attention(_heads(q, 3 * heads), _heads(k, 3 * heads), _heads(v, 3 * heads))
        parts = _merge_heads(out).chunk(3, dim=-1)
        return [a.to_out[1](a.to_out[0](p)) for a, p in zip(attns, parts)]

    def forward(
        self,
        tokens: torch.Tensor,
        audio: torch.Tensor,
        masks: Sequence[torch.Tensor | None],
        weights: Sequence[float] | None,
    ) -> torch.Tensor:
        tokens = self.attn1(self.norm1(tokens)) + tokens
        outs = self.audio_attention(self.norm2(tokens), audio.to(tokens.dtype))
        convs = (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip)
        for i, (out, mask, conv) in enumerate(zip(outs, masks, convs)):
            if mask is not None:
                out = out * mask.to(out.dtype)
            out = F.linear(out, conv.weight.flatten(1), conv.bias)  # the 1x1 conv, on tokens
            if weights is not None:
                out = out * weights[i]
            tokens = tokens + out
        return self.ff(self.norm3(tokens)) + tokens


class AudioModule(nn.Module):
    """Hallo's audio module: ``norm`` (GroupNorm), ``proj_in`` (1x1, channels -> inner), one
    ``AudioTransformerBlock`` at width ``inner``, ``proj_out`` (1x1, inner -> channels), residual.

    Hallo's inner width is not always the block's width: it is the block's input width for the first layer of a
    down block and the up block's skip-input width for every layer of an up block (e.g. 640 -> 320 -> 640 in
    ``down_blocks.1.audio_modules.0``); ``singer.models.unet`` reproduces that.

    ``forward(x (N, C, H, W), audio (N, Na, Da), full, face, lip, weights)``: the masks are (N, H*W, 1) in [0, 1]
    or None (weight 1 everywhere); ``weights`` optional scales of the (full, face, lip) terms (Hallo's
    ``motion_scale``).

    ``proj_out`` is zero-initialised here (Hallo's is not), so that together with the zero convs a fresh module
    is an exact identity; released weights overwrite both.
    """

    def __init__(self, channels: int, heads: int, audio_dim: int, groups: int, inner: int | None = None):
        super().__init__()
        inner = inner or channels
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([AudioTransformerBlock(inner, heads, audio_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        audio: torch.Tensor,
        full: torch.Tensor | None,
        face: torch.Tensor | None,
        lip: torch.Tensor | None,
        weights: Sequence[float] | None,
    ) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = fold_tokens(self.proj_in(self.norm(x)))
        tokens = self.transformer_blocks[0](tokens, audio, (full, face, lip), weights)
        return self.proj_out(unfold_tokens(tokens, h, w)) + x


# --------------------------------------------------------------------------------------------------------------
# motion module (AnimateDiff v2 / Hallo VanillaTemporalModule)


class PositionalEncoding(nn.Module):
    """Sinusoidal temporal positions; persistent buffer ``pe`` (1, max_len, C), added to the input."""

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
    """Self-attention over frames with the positions added to its input (``pos_encoder``)."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__(dim, heads, dim // heads)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: torch.Tensor, context=None, extra=None) -> torch.Tensor:  # noqa: ARG002
        return super().forward(self.pos_encoder(x))


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions (``attention_blocks.0/1`` with ``norms.0/1``), then ``ff`` (``ff_norm``)."""

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
    """``norm`` (GroupNorm per frame), ``proj_in`` (Linear), blocks over frames per pixel, ``proj_out`` (Linear,
    zero-initialised), residual."""

    def __init__(self, channels: int, heads: int, max_len: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, max_len)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        n, c, h, w = x.shape
        b = n // frames
        t = self.norm(x).view(b, frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, frames, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        t = t.view(b, h * w, frames, c).permute(0, 2, 3, 1).reshape(n, c, h, w)
        return t + x


class MotionModule(nn.Module):
    """AnimateDiff motion module (``temporal_transformer``): temporal self-attention over the frames of each
    pixel; an exact identity at initialisation (zero ``proj_out``).

    ``forward(x (B*F, C, H, W), frames, prefix (B*M, C, H, W) or None)``: ``prefix`` frames (Hallo's motion
    frames from the reference UNet) are prepended to each sample's frames for the attention and dropped after.
    """

    def __init__(self, channels: int, heads: int, max_len: int, groups: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, max_len, groups)

    def forward(self, x: torch.Tensor, frames: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is None:
            return self.temporal_transformer(x, frames)
        n, c, h, w = x.shape
        b = n // frames
        m = prefix.shape[0] // b
        both = torch.cat([prefix.view(b, m, c, h, w), x.view(b, frames, c, h, w)], dim=1)
        out = self.temporal_transformer(both.view(b * (m + frames), c, h, w), m + frames)
        return out.view(b, m + frames, c, h, w)[:, m:].reshape(n, c, h, w)
