"""The SD-1.5 UNet body shared by the reference and the denoising UNet: down, middle and up blocks.

Layout (``block_out_channels``, ``layers_per_block``): cross-attention blocks everywhere except the last down
block and the first up block; every submodule is named like Hallo's checkpoints (``down_blocks.i.resnets.k``,
``mid_block.attentions.0``, ``up_blocks.i.motion_modules.k``, ...), so released weights load by name.

Per layer (Hallo's order)::

    resnet -> attention (spatial self-attention + reference K/V, cross-attention to face tokens)
           -> audio module (per-frame cross-attention to the frame's audio tokens, masks)   [denoising UNet]
           -> motion module (temporal self-attention over frames)                          [denoising UNet]

Reference states, keyed by the attention module's name (``attention_layer_names()``, e.g.
``"down_blocks.0.attentions.0"``, the same names in both UNets, in execution order): the reference UNet's blocks
return the attn1 input of each of their attention layers (``captures_attn1_inputs``); the denoising UNet's
blocks look theirs up in ``BlockInputs.reference_states`` (B, R*h*w, C): the reference frame's tokens (the first
h*w) become extra keys/values of every frame's self-attention; the motion frames' (R > 1) either go to the
motion module that follows, prepended to its frame axis (``temporal_motion_frames``, Hallo), or are extra
keys/values too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from einops import rearrange
from torch import nn

from singer.models.attention import SpatialTransformer
from singer.models.audio_module import AudioMasks, AudioModule
from singer.models.motion_module import MotionModule
from singer.models.resnet import Downsample, ResnetBlock, Upsample

__all__ = ["BlockInputs", "BlockOutput", "DownBlock", "MidBlock", "UNetCore", "UNetSpec", "UpBlock", "check_tokens"]


@dataclass(frozen=True)
class UNetSpec:
    """What every block of a UNet is built with (sizes and which optional modules exist)."""

    temb: int
    groups: int
    eps: float
    heads: int
    cross_dim: int
    audio_dim: int | None = None  # None: no audio modules
    motion_heads: int | None = None  # None: no motion modules
    motion_max_len: int = 0
    captures_attn1_inputs: bool = False  # the reference UNet: blocks return their attn1 inputs


@dataclass(frozen=True)
class BlockInputs:
    """Everything a block needs besides its input, the same for every block of one forward (read-only)."""

    temb: torch.Tensor  # (B, T) time embedding
    frames: int  # F: every activation is (B*F, C, h, w)
    face_tokens: torch.Tensor | None = None  # (B or B*F, Nf, D); None skips attn2
    audio_tokens: torch.Tensor | None = None  # (B*F, Na, Da); None skips the audio modules
    masks: Mapping[tuple[int, int], AudioMasks] | None = None  # per block resolution (h, w)
    reference_states: Mapping[str, torch.Tensor] | None = None  # attention name -> (B, R*h*w, C)
    reference_keep: torch.Tensor | None = None  # (B,) bool: samples that attend to the reference frame (None: all)
    reference_rows: torch.Tensor | None = None  # (B*F,) long: whose reference frame each row attends to (None: own)
    temporal_motion_frames: bool = True
    motion_scale: tuple[float, float, float] | None = None  # weights of the full, face, lip audio attentions


@dataclass(frozen=True)
class BlockOutput:
    x: torch.Tensor  # (N, C, h, w)
    skips: list[torch.Tensor] = field(default_factory=list)  # down blocks: what the up blocks concatenate
    attn1_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # reference UNet: name -> (N, h*w, C)


def check_tokens(name: str, tokens: torch.Tensor | None, width: int) -> None:
    if tokens is not None and (tokens.ndim != 3 or tokens.shape[-1] != width):
        raise ValueError(f"{name}: expected (B, N, {width}), got {tuple(tokens.shape)}")


def split_reference(
    state: torch.Tensor, x: torch.Tensor, inputs: BlockInputs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A reference state (B, R*h*w, C) for the layer whose input is ``x`` (B*F, C, h, w) -> (extra keys/values
    of attn1 (B, L, C), motion-frame prefix of the motion module (B*(R-1), C, h, w) or None)."""
    n, c, h, w = x.shape
    hw, b = h * w, n // inputs.frames
    if state.shape[0] != b or state.shape[1] % hw or state.shape[2] != c:
        raise ValueError(
            f"reference state of shape {tuple(state.shape)} does not fit a layer of {c} channels at {h}x{w} for "
            f"batch {b}: expected (B, R*{hw}, {c})"
        )
    if inputs.temporal_motion_frames and state.shape[1] > hw:
        prefix = rearrange(state[:, hw:].to(x.dtype), "b (r h w) c -> (b r) c h w", h=h, w=w)
        return state[:, :hw], prefix
    return state, None


def layer_modules(spec: UNetSpec, channels: int, num_layers: int, attention: bool, audio_inner: Sequence[int]):
    """The attention, audio and motion module lists of a block (None where absent). ``audio_inner``: the inner
    width of each audio module (Hallo's rule, see ``AudioModule``)."""
    attentions = audio = motion = None
    if attention:
        attentions = nn.ModuleList(
            [SpatialTransformer(channels, spec.heads, spec.cross_dim, spec.groups) for _ in range(num_layers)]
        )
        if spec.audio_dim is not None:
            audio = nn.ModuleList(
                [AudioModule(channels, spec.heads, spec.audio_dim, spec.groups, inner) for inner in audio_inner]
            )
    if spec.motion_heads is not None:
        motion = nn.ModuleList(
            [MotionModule(channels, spec.motion_heads, spec.motion_max_len, spec.groups) for _ in range(num_layers)]
        )
    return attentions, audio, motion


class _Block(nn.Module):
    """Shared per-layer logic: attention (+ reference), audio module, motion module; gradient checkpointing."""

    attentions: nn.ModuleList | None
    audio_modules: nn.ModuleList | None
    motion_modules: nn.ModuleList | None

    def __init__(self, spec: UNetSpec, name: str, num_layers: int, attention: bool):
        super().__init__()
        self.gradient_checkpointing = False
        self.captures_attn1_inputs = spec.captures_attn1_inputs
        self.attention_names = tuple(f"{name}.attentions.{k}" for k in range(num_layers)) if attention else ()

    def _call(self, fn, x: torch.Tensor, **kwargs):
        """``fn(x, **kwargs)``, under gradient checkpointing when it is on (every argument is handed to the
        checkpoint function positionally, so that it sees the tensors)."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return fn(x, **kwargs)
        names = tuple(kwargs)

        def run(x, *values):
            return fn(x, **dict(zip(names, values)))

        func = getattr(self, "_gradient_checkpointing_func", None)
        if func is None:
            return torch.utils.checkpoint.checkpoint(run, x, *kwargs.values(), use_reentrant=False)
        return func(run, x, *kwargs.values())

    def _resnet(self, resnet: ResnetBlock, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        return self._call(resnet, x, temb=inputs.temb, frames=inputs.frames)

    def _layer(self, i: int, x: torch.Tensor, inputs: BlockInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Everything after resnet ``i``: attention, audio module, motion module. Returns the output and, in the
        reference UNet, ``{attention name: its attn1 input (N, h*w, C)}`` (else {})."""
        captured: dict[str, torch.Tensor] = {}
        prefix = None
        if self.attentions is not None:
            attention, name = self.attentions[i], self.attention_names[i]
            if self.captures_attn1_inputs:
                x, captured[name] = self._call(attention.forward_with_attn1_input, x, face_tokens=inputs.face_tokens)
            else:
                reference = None
                if inputs.reference_states is not None:
                    reference, prefix = split_reference(inputs.reference_states[name], x, inputs)
                x = self._call(attention, x, face_tokens=inputs.face_tokens, reference=reference,
                               reference_keep=inputs.reference_keep, reference_rows=inputs.reference_rows)
        if self.audio_modules is not None and inputs.audio_tokens is not None:
            masks = None if inputs.masks is None else inputs.masks[tuple(x.shape[-2:])].to(x.dtype)
            x = self._call(self.audio_modules[i], x, audio_tokens=inputs.audio_tokens, masks=masks,
                           motion_scale=inputs.motion_scale)
        # Hallo runs its blocks' training-mode branch at inference too (its UNet is never put in eval mode), and
        # that branch skips the motion modules of the blocks without attention (DownBlock3D / UpBlock3D,
        # ``unet_3d_blocks.py:905-916, 1376-1387``): the released weights were trained that way
        if self.motion_modules is not None and self.attentions is not None:
            x = self._call(self.motion_modules[i], x, frames=inputs.frames, prefix=prefix)
        return x, captured

    def unused_parameter_names(self) -> list[str]:
        """Parameters this block never runs (the motion modules of a block without attention), relative to it."""
        if self.motion_modules is None or self.attentions is not None:
            return []
        return [f"motion_modules.{name}" for name, _ in self.motion_modules.named_parameters()]


class DownBlock(_Block):
    """``resnets``, ``attentions`` (cross-attention blocks), ``audio_modules``, ``motion_modules``,
    ``downsamplers``: (N, C_in, h, w) -> (N, C_out, h/2, w/2) (h, w without a downsampler)."""

    def __init__(self, spec: UNetSpec, name: str, in_channels: int, out_channels: int, num_layers: int,
                 attention: bool, downsample: bool):
        super().__init__(spec, name, num_layers, attention)
        inner = [in_channels if i == 0 else out_channels for i in range(num_layers)]
        attentions, audio, motion = layer_modules(spec, out_channels, num_layers, attention, inner)
        self.attentions = attentions
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, spec.temb, spec.groups, spec.eps)
                for i in range(num_layers)
            ]
        )
        self.audio_modules = audio
        self.motion_modules = motion
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor, *, inputs: BlockInputs) -> BlockOutput:
        skips, captured = [], {}
        for i, resnet in enumerate(self.resnets):
            x, states = self._layer(i, self._resnet(resnet, x, inputs), inputs)
            captured.update(states)
            skips.append(x)
        if self.downsamplers is not None:
            x = self._call(self.downsamplers[0], x)
            skips.append(x)
        return BlockOutput(x, skips, captured)


class MidBlock(_Block):
    """``resnets.0 -> attentions.0 -> audio_modules.0 -> motion_modules.0 -> resnets.1``: (N, C, h, w) -> same."""

    def __init__(self, spec: UNetSpec, name: str, channels: int):
        super().__init__(spec, name, 1, True)
        attentions, audio, motion = layer_modules(spec, channels, 1, True, [channels])
        self.attentions = attentions
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, spec.temb, spec.groups, spec.eps) for _ in range(2)]
        )
        self.audio_modules = audio
        self.motion_modules = motion

    def forward(self, x: torch.Tensor, *, inputs: BlockInputs) -> BlockOutput:
        x, captured = self._layer(0, self._resnet(self.resnets[0], x, inputs), inputs)
        return BlockOutput(self._resnet(self.resnets[1], x, inputs), attn1_inputs=captured)


class UpBlock(_Block):
    """``resnets`` (on the input concatenated with a skip), ``attentions``, ``audio_modules``, ``motion_modules``,
    ``upsamplers``: (N, C_prev, h, w) and the skips -> (N, C_out, 2h, 2w) (h, w without an upsampler)."""

    def __init__(self, spec: UNetSpec, name: str, in_channels: int, prev_channels: int, out_channels: int,
                 num_layers: int, attention: bool, upsample: bool):
        super().__init__(spec, name, num_layers, attention)
        inner = [in_channels] * num_layers
        attentions, audio, motion = layer_modules(spec, out_channels, num_layers, attention, inner)
        self.attentions = attentions
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock(res_in + skip, out_channels, spec.temb, spec.groups, spec.eps))
        self.resnets = nn.ModuleList(resnets)
        self.audio_modules = audio
        self.motion_modules = motion
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, *, inputs: BlockInputs, skips: list[torch.Tensor],
                upsample_size: tuple[int, int] | None = None) -> BlockOutput:
        """``skips``: one per resnet, consumed last first."""
        skips, captured = list(skips), {}
        for i, resnet in enumerate(self.resnets):
            x = self._resnet(resnet, torch.cat([x, skips.pop()], dim=1), inputs)
            x, states = self._layer(i, x, inputs)
            captured.update(states)
        if self.upsamplers is not None:
            x = self._call(self.upsamplers[0], x, size=upsample_size)
        return BlockOutput(x, attn1_inputs=captured)


class UNetCore:
    """Builds and runs the SD-1.5 layout (``conv_in``, time embedding, down / middle / up blocks); mixed into the
    two UNet ``ModelMixin`` classes."""

    conv_in: nn.Conv2d
    time_proj: Timesteps
    time_embedding: TimestepEmbedding
    down_blocks: nn.ModuleList
    up_blocks: nn.ModuleList
    mid_block: MidBlock

    def _build_core(self, in_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                    spec: UNetSpec, flip_sin_to_cos: bool, freq_shift: float) -> None:
        channels = list(block_out_channels)
        n = len(channels)
        c0 = channels[0]
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(c0, spec.temb)
        self.down_blocks = nn.ModuleList()
        out = c0
        for i in range(n):
            inp, out = out, channels[i]
            last = i == n - 1
            self.down_blocks.append(
                DownBlock(spec, f"down_blocks.{i}", inp, out, layers_per_block, attention=not last, downsample=not last)
            )
        self.up_blocks = nn.ModuleList()
        rev = channels[::-1]
        out = rev[0]
        for i in range(n):
            prev, out = out, rev[i]
            inp = rev[min(i + 1, n - 1)]
            last = i == n - 1
            self.up_blocks.append(
                UpBlock(spec, f"up_blocks.{i}", inp, prev, out, layers_per_block + 1, attention=i > 0,
                        upsample=not last)
            )
        self.mid_block = MidBlock(spec, "mid_block", channels[-1])

    def attention_layer_names(self) -> list[str]:
        """Names of the spatial attention layers in execution order (the keys of the reference states)."""
        blocks = [*self.down_blocks, self.mid_block, *self.up_blocks]
        return [name for block in blocks for name in block.attention_names]

    @property
    def num_reference_layers(self) -> int:
        return len(self.attention_layer_names())

    def level_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(h, w)`` of the activations at every level (down block i, the up block mirroring it) for a
        ``height x width`` latent; each downsampler halves, rounding up."""
        sizes = [(height, width)]
        for _ in range(len(self.down_blocks) - 1):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        return sizes

    def _embed_time(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
        """A scalar or (batch,) timestep -> (batch, T)."""
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float32 if isinstance(t, float) else torch.long, device=device)
        t = t.to(device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have {batch} entries, got {t.numel()}")
        emb = self.time_proj(t).to(self.time_embedding.linear_1.weight.dtype)
        return self.time_embedding(emb)

    def _after_mid(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:  # noqa: ARG002
        """Hook on the middle-block output (the denoising UNet's SFM)."""
        return x

    def _run_blocks(self, x: torch.Tensor, inputs: BlockInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``conv_in`` output (N, C0, H, W) -> the last up block's output (N, C0, H, W), and the attn1 inputs the
        blocks returned (the reference UNet's states, in execution order; {} in the denoising UNet)."""
        skips = [x]
        attn1_inputs: dict[str, torch.Tensor] = {}
        for block in self.down_blocks:
            out = block(x, inputs=inputs)
            x = out.x
            skips.extend(out.skips)
            attn1_inputs.update(out.attn1_inputs)
        out = self.mid_block(x, inputs=inputs)
        attn1_inputs.update(out.attn1_inputs)
        x = self._after_mid(out.x, inputs)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if (block.upsamplers is not None and skips) else None
            out = block(x, inputs=inputs, skips=res, upsample_size=size)
            x = out.x
            attn1_inputs.update(out.attn1_inputs)
        return x, attn1_inputs
