"""The denoising 3D UNet, the reference 2D UNet and the face locator (DESIGN.md section 3; Hallo's architecture).

Both UNets are SD-1.5-shaped (``block_out_channels``, ``layers_per_block``; cross-attention blocks everywhere
except the last down block / first up block) and name every submodule like Hallo's checkpoints, so the released
``net.pth`` / SD-1.5 / AnimateDiff weights load by name (``singer.models.convert``).

Per layer of the denoising UNet (Hallo's order)::

    resnet -> attention (spatial self-attention + reference K/V, cross-attention to face tokens)
           -> audio module (per-frame cross-attention to the frame's audio tokens, face/lip/full masks)
           -> motion module (temporal self-attention over frames)

and SFM (``sfm``) on the middle-block output. Fresh audio modules, motion modules and SFM are exact identities.

Reference contract. The spatial attention layers (``*.attentions.k``) run in a fixed order: down blocks, middle
block, up blocks (``attention_layer_names()``; the same names and order in both UNets). ``ReferenceUNet2D``
returns, for each of them in that order, the input of ``attn1`` (the LayerNorm-ed tokens), shaped
``(B*R, h*w, C)`` for ``B*R`` reference images (R per sample: the reference frame, then the motion frames).
``DenoisingUNet3D`` takes that list as ``reference_states``, each entry ``(B, R*h*w, C)`` (or ``(B*R, h*w, C)``,
regrouped), and:

* the reference frame's tokens become extra keys/values of every frame's self-attention (reference-only
  attention, AnimateAnyone/Hallo);
* the motion frames (R > 1): ``motion_frames_mode="temporal"`` (default, Hallo) prepends their tokens to the
  frame axis of the motion module that follows the layer (temporal context from the previous window);
  ``"spatial"`` appends them to the self-attention keys/values like the reference frame. (Hallo trained its
  released weights the "temporal" way: stage 2 runs with gradient checkpointing, whose code path prepends the
  motion frames in every cross-attention block; without motion modules the motion frames are not used.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from singer.models.blocks import (
    AudioModule,
    Downsample,
    MotionModule,
    ResnetBlock,
    SpatialTransformer,
    Upsample,
)
from singer.models.sfm import SelfAdaptiveFilterModule

__all__ = ["DenoisingUNet3D", "FaceLocator", "ReferenceUNet2D", "MASK_NAMES"]

MASK_NAMES = ("full", "face", "lip")  # attn2_0, attn2_1, attn2_2 of the audio modules
MOTION_FRAMES_MODES = ("temporal", "spatial")


# --------------------------------------------------------------------------------------------------------------
# run state (everything a block needs besides its input; read outside checkpointed calls)


class _Masks:
    """Face/lip/full masks resized to each block resolution, as (N, h*w, 1), cached per size."""

    def __init__(self, masks: Mapping[str, torch.Tensor | None] | None, batch: int, frames: int):
        self.base: dict[str, torch.Tensor] = {}
        self.cache: dict[tuple[int, int], tuple] = {}
        for name in MASK_NAMES:
            mask = None if masks is None else masks.get(name)
            if mask is None and name == "full" and masks is not None:
                mask = masks.get("pose")
            if mask is None:
                continue
            if mask.ndim == 4:  # (B, 1, H, W): the same for every frame
                if mask.shape[0] != batch or mask.shape[1] != 1:
                    raise ValueError(f"mask {name!r}: expected (B, 1, H, W) or (B, F, 1, H, W), got {tuple(mask.shape)}")
                mask = mask.unsqueeze(1).expand(batch, frames, *mask.shape[1:])
            if mask.ndim != 5 or mask.shape[:3] != (batch, frames, 1):
                raise ValueError(f"mask {name!r}: expected (B, 1, H, W) or (B, F, 1, H, W), got {tuple(mask.shape)}")
            self.base[name] = mask.reshape(batch * frames, 1, *mask.shape[-2:]).float()

    def at(self, h: int, w: int, dtype: torch.dtype) -> tuple:
        key = (h, w)
        if key not in self.cache:
            out = []
            for name in MASK_NAMES:
                mask = self.base.get(name)
                if mask is not None:
                    if tuple(mask.shape[-2:]) != (h, w):
                        down = mask.shape[-2] >= h and mask.shape[-1] >= w
                        mode = "area" if down else "bilinear"
                        kwargs = {} if down else {"align_corners": False}
                        mask = F.interpolate(mask, size=(h, w), mode=mode, **kwargs)
                    mask = mask.flatten(2).transpose(1, 2).to(dtype)  # (N, h*w, 1)
                out.append(mask)
            self.cache[key] = tuple(out)
        return self.cache[key]


@dataclass
class _Run:
    temb: torch.Tensor  # (B, T)
    frames: int
    face: torch.Tensor | None = None  # (B or N, Nf, D)
    audio: torch.Tensor | None = None  # (N, Na, Da)
    audio_weights: Sequence[float] | None = None
    masks: _Masks | None = None
    references: list | None = None  # consumed in order
    temporal_motion_frames: bool = True
    collect: list | None = None  # reference UNet: attn1 inputs, in order
    collect_total: int = 0
    stop_early: bool = False
    done: bool = False
    _next: int = field(default=0)

    def next_reference(self) -> torch.Tensor | None:
        if self.references is None:
            return None
        ref = self.references[self._next]
        self._next += 1
        return ref

    def masks_at(self, h: int, w: int, dtype: torch.dtype) -> tuple:
        if self.masks is None:
            return (None, None, None)
        return self.masks.at(h, w, dtype)


# --------------------------------------------------------------------------------------------------------------
# UNet blocks


class _Block(nn.Module):
    """Shared per-layer logic: attention (+ reference), audio module, motion module; gradient checkpointing."""

    attentions: nn.ModuleList | None
    audio_modules: nn.ModuleList | None
    motion_modules: nn.ModuleList | None

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _call(self, module: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            func = getattr(self, "_gradient_checkpointing_func", None)
            if func is None:
                return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
            return func(module, *args)
        return module(*args)

    def _layer(self, i: int, x: torch.Tensor, run: _Run) -> torch.Tensor:
        """Everything after resnet ``i``: attention, audio module, motion module."""
        prefix = None
        if self.attentions is not None:
            ref = run.next_reference()
            collect = run.collect is not None
            stop = collect and run.stop_early and len(run.collect) == run.collect_total - 1
            x, normed, prefix = self._call(
                self.attentions[i], x, run.face, ref, run.frames, run.temporal_motion_frames, collect, stop
            )
            if collect:
                run.collect.append(normed)
                if stop:
                    run.done = True
                    return x
        if self.audio_modules is not None and run.audio is not None:
            full, face, lip = run.masks_at(x.shape[-2], x.shape[-1], x.dtype)
            x = self._call(self.audio_modules[i], x, run.audio, full, face, lip, run.audio_weights)
        if self.motion_modules is not None:
            x = self._call(self.motion_modules[i], x, run.frames, prefix)
        return x


@dataclass(frozen=True)
class _Spec:
    """What every block of a UNet gets (sizes and which optional modules exist)."""

    temb: int
    groups: int
    eps: float
    heads: int
    cross_dim: int
    audio_dim: int | None  # None: no audio modules
    motion_heads: int | None  # None: no motion modules
    motion_max_len: int


def _optional(spec: _Spec, channels: int, n: int, attention: bool, audio_inner: Sequence[int]):
    """Attention, audio and motion module lists of a block (None where absent). ``audio_inner``: the inner width
    of each audio module (Hallo's rule, see ``AudioModule``)."""
    attentions = audio = motion = None
    if attention:
        attentions = nn.ModuleList(
            [SpatialTransformer(channels, spec.heads, spec.cross_dim, spec.groups) for _ in range(n)]
        )
        if spec.audio_dim is not None:
            audio = nn.ModuleList(
                [AudioModule(channels, spec.heads, spec.audio_dim, spec.groups, audio_inner[i]) for i in range(n)]
            )
    if spec.motion_heads is not None:
        motion = nn.ModuleList(
            [MotionModule(channels, spec.motion_heads, spec.motion_max_len, spec.groups) for _ in range(n)]
        )
    return attentions, audio, motion


class DownBlock(_Block):
    """``resnets``, ``attentions`` (cross-attention blocks), ``audio_modules``, ``motion_modules``,
    ``downsamplers``."""

    def __init__(self, spec: _Spec, in_channels: int, out_channels: int, num_layers: int, attention: bool,
                 downsample: bool):
        super().__init__()
        inner = [in_channels if i == 0 else out_channels for i in range(num_layers)]
        attentions, audio, motion = _optional(spec, out_channels, num_layers, attention, inner)
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

    def forward(self, x: torch.Tensor, run: _Run) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = self._call(resnet, x, run.temb, run.frames)
            x = self._layer(i, x, run)
            if run.done:
                return x, outputs
            outputs.append(x)
        if self.downsamplers is not None:
            x = self._call(self.downsamplers[0], x)
            outputs.append(x)
        return x, outputs


class MidBlock(_Block):
    """``resnets.0 -> attentions.0 -> audio_modules.0 -> motion_modules.0 -> resnets.1``."""

    def __init__(self, spec: _Spec, channels: int):
        super().__init__()
        attentions, audio, motion = _optional(spec, channels, 1, True, [channels])
        self.attentions = attentions
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, spec.temb, spec.groups, spec.eps) for _ in range(2)])
        self.audio_modules = audio
        self.motion_modules = motion

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        x = self._call(self.resnets[0], x, run.temb, run.frames)
        x = self._layer(0, x, run)
        if run.done:
            return x
        return self._call(self.resnets[1], x, run.temb, run.frames)


class UpBlock(_Block):
    """``resnets`` (on the input concatenated with a skip), ``attentions``, ``audio_modules``,
    ``motion_modules``, ``upsamplers``."""

    def __init__(self, spec: _Spec, in_channels: int, prev_channels: int, out_channels: int, num_layers: int,
                 attention: bool, upsample: bool):
        super().__init__()
        attentions, audio, motion = _optional(spec, out_channels, num_layers, attention, [in_channels] * num_layers)
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

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], run: _Run, size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self._call(resnet, x, run.temb, run.frames)
            x = self._layer(i, x, run)
            if run.done:
                return x
        if self.upsamplers is not None:
            x = self._call(self.upsamplers[0], x, size)
        return x


# --------------------------------------------------------------------------------------------------------------
# UNet body shared by both UNets


class _UNetCore:
    """Builds and runs the SD-1.5 layout; mixed into the two ModelMixin classes."""

    conv_in: nn.Conv2d
    down_blocks: nn.ModuleList
    up_blocks: nn.ModuleList
    mid_block: MidBlock

    def _build_core(self, in_channels: int, block_out_channels: Sequence[int], layers_per_block: int, spec: _Spec,
                    flip_sin_to_cos: bool, freq_shift: float) -> None:
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
            self.down_blocks.append(DownBlock(spec, inp, out, layers_per_block, attention=not last, downsample=not last))
        self.up_blocks = nn.ModuleList()
        rev = channels[::-1]
        out = rev[0]
        for i in range(n):
            prev, out = out, rev[i]
            inp = rev[min(i + 1, n - 1)]
            last = i == n - 1
            self.up_blocks.append(
                UpBlock(spec, inp, prev, out, layers_per_block + 1, attention=i > 0, upsample=not last)
            )
        self.mid_block = MidBlock(spec, channels[-1])

    # -- introspection --------------------------------------------------------------------------------------
    def attention_layer_names(self) -> list[str]:
        """Names of the spatial attention layers in execution order (the reference_states order)."""
        names = []
        for i, block in enumerate(self.down_blocks):
            if block.attentions is not None:
                names += [f"down_blocks.{i}.attentions.{k}" for k in range(len(block.attentions))]
        names.append("mid_block.attentions.0")
        for i, block in enumerate(self.up_blocks):
            if block.attentions is not None:
                names += [f"up_blocks.{i}.attentions.{k}" for k in range(len(block.attentions))]
        return names

    @property
    def num_reference_layers(self) -> int:
        return len(self.attention_layer_names())

    def reference_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """``(h, w, C)`` of every attention layer, in order, for a latent of ``height x width``."""
        sizes = [(height, width)]
        for _ in range(len(self.down_blocks) - 1):
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        shapes = []
        for i, block in enumerate(self.down_blocks):
            if block.attentions is not None:
                shapes += [(*sizes[i], block.resnets[0].conv1.out_channels)] * len(block.attentions)
        shapes.append((*sizes[-1], self.mid_block.resnets[0].conv1.out_channels))
        for i, block in enumerate(self.up_blocks):
            if block.attentions is not None:
                level = len(self.up_blocks) - 1 - i
                shapes += [(*sizes[level], block.resnets[0].conv1.out_channels)] * len(block.attentions)
        return shapes

    # -- forward pieces ---------------------------------------------------------------------------------------
    def _embed_time(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
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

    def _after_mid(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        return x

    def _body(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, run)
            if run.done:
                return x
            skips.extend(res)
        x = self.mid_block(x, run)
        if run.done:
            return x
        x = self._after_mid(x, run)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if (block.upsamplers is not None and skips) else None
            x = block(x, res, run, size)
            if run.done:
                return x
        return x


def _check_tokens(name: str, tokens: torch.Tensor | None, width: int) -> None:
    if tokens is not None and (tokens.ndim != 3 or tokens.shape[-1] != width):
        raise ValueError(f"{name}: expected (B, N, {width}), got {tuple(tokens.shape)}")


# --------------------------------------------------------------------------------------------------------------
# denoising UNet


class DenoisingUNet3D(ModelMixin, ConfigMixin, _UNetCore):
    """Hallo's denoising 3D UNet plus SINGER's SFM on the middle-block output.

    Config (defaults: the paper / SD-1.5 sizes):
        in_channels, out_channels: latent channels.
        block_out_channels, layers_per_block: SD layout; cross-attention blocks everywhere but the last down
            block and the first up block.
        attention_head_dim: NUMBER of attention heads of the spatial and audio attention (SD-1.5 convention).
        norm_num_groups, norm_eps: GroupNorm of the ResNets (attention/motion norms use eps 1e-6).
        cross_attention_dim: width of the face tokens; audio_attention_dim: width of the audio tokens.
        motion_num_heads, motion_max_len: motion modules (temporal attention heads; frames of the ``pe`` table,
            motion frames included).
        use_motion_modules, use_audio_modules: build them (Hallo: both).
        use_sfm, sfm_reduction: SINGER's SFM (``sfm``) on the middle-block output.
        motion_frames_mode: "temporal" (Hallo) or "spatial"; see the module docstring.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        audio_attention_dim: int = 768,
        motion_num_heads: int = 8,
        motion_max_len: int = 32,
        use_motion_modules: bool = True,
        use_audio_modules: bool = True,
        use_sfm: bool = True,
        sfm_reduction: int = 4,
        motion_frames_mode: str = "temporal",
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
    ):
        super().__init__()
        if motion_frames_mode not in MOTION_FRAMES_MODES:
            raise ValueError(f"motion_frames_mode must be one of {MOTION_FRAMES_MODES}, got {motion_frames_mode!r}")
        channels = list(block_out_channels)
        spec = _Spec(
            temb=4 * channels[0],
            groups=norm_num_groups,
            eps=norm_eps,
            heads=attention_head_dim,
            cross_dim=cross_attention_dim,
            audio_dim=audio_attention_dim if use_audio_modules else None,
            motion_heads=motion_num_heads if use_motion_modules else None,
            motion_max_len=motion_max_len,
        )
        self._build_core(in_channels, channels, layers_per_block, spec, flip_sin_to_cos, freq_shift)
        self.sfm = SelfAdaptiveFilterModule(channels[-1], sfm_reduction) if use_sfm else None
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    @classmethod
    def from_model_config(cls, model, **overrides) -> DenoisingUNet3D:
        """Build from a ``singer.config.ModelConfig`` (keyword overrides win)."""
        kwargs = dict(
            in_channels=model.latent_channels,
            out_channels=model.latent_channels,
            block_out_channels=list(model.block_out_channels),
            layers_per_block=model.layers_per_block,
            attention_head_dim=model.attention_head_dim,
            norm_num_groups=model.norm_num_groups,
            cross_attention_dim=model.cross_attention_dim,
            audio_attention_dim=getattr(model, "audio_attention_dim", None) or model.cross_attention_dim,
            motion_num_heads=model.motion_num_heads,
            motion_max_len=model.motion_max_len,
            use_sfm=model.sfm,
            sfm_reduction=model.sfm_reduction,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def _after_mid(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        if self.sfm is None:
            return x
        n, c, h, w = x.shape
        b = n // run.frames
        y = self.sfm(x.view(b, run.frames, c, h, w).transpose(1, 2))  # (B, C, F, h, w): one gate per clip
        return y.transpose(1, 2).reshape(n, c, h, w)

    def _group_reference(self, state: torch.Tensor, batch: int, index: int) -> torch.Tensor:
        if state.ndim != 3:
            raise ValueError(f"reference_states[{index}] must be (B, R*h*w, C), got {tuple(state.shape)}")
        if state.shape[0] != batch:
            if state.shape[0] % batch:
                raise ValueError(f"reference_states[{index}] has {state.shape[0]} rows for a batch of {batch}")
            r = state.shape[0] // batch
            state = state.reshape(batch, r * state.shape[1], state.shape[2])  # (B*R, L, C) -> (B, R*L, C)
        return state

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        face_tokens: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        reference_states: Sequence[torch.Tensor] | None = None,
        masks: Mapping[str, torch.Tensor | None] | None = None,
        face_features: torch.Tensor | None = None,
        audio_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Predict the noise / v for a window of frames.

        Args:
            sample: noisy latents (B, C, F, H, W).
            timestep: (B,) or a scalar.
            face_tokens: (B, Nf, cross_attention_dim) (or one set per frame, (B*F, Nf, D)); None skips attn2.
            audio_tokens: (B, F, Na, audio_attention_dim), the tokens of each frame; None skips the audio modules.
            reference_states: ``ReferenceUNet2D`` output, one (B, R*h*w, C) (or (B*R, h*w, C)) per attention layer
                in ``attention_layer_names()`` order; None: plain self-attention.
            masks: {"full" (or "pose"), "face", "lip"}: (B, 1, H, W) or (B, F, 1, H, W) in [0, 1], any resolution
                (resized per block with area / bilinear interpolation); a missing mask weighs 1 everywhere.
            face_features: ``FaceLocator`` output (B, C0, F, H, W) or (B, C0, H, W), added after ``conv_in``.
            audio_weights: optional scales of the (full, face, lip) audio terms (Hallo's ``motion_scale``).

        Returns:
            (B, out_channels, F, H, W).
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, F, H, W), got {tuple(sample.shape)}")
        b, c, f, h, w = sample.shape
        x = sample.transpose(1, 2).reshape(b * f, c, h, w)
        temb = self._embed_time(timestep, b, sample.device)
        x = self.conv_in(x.to(self.conv_in.weight.dtype))
        if face_features is not None:
            if face_features.ndim == 4:
                face_features = face_features.unsqueeze(2).expand(-1, -1, f, -1, -1)
            if face_features.shape != (b, x.shape[1], f, h, w):
                raise ValueError(f"face_features must be (B, {x.shape[1]}, F, H, W), got {tuple(face_features.shape)}")
            x = x + face_features.transpose(1, 2).reshape(b * f, -1, h, w).to(x.dtype)
        _check_tokens("face_tokens", face_tokens, self.config.cross_attention_dim)
        audio = None
        if audio_tokens is not None and self.config.use_audio_modules:
            if audio_tokens.ndim != 4 or audio_tokens.shape[:2] != (b, f):
                raise ValueError(f"audio_tokens must be (B, F, Na, D) = ({b}, {f}, Na, D), got {tuple(audio_tokens.shape)}")
            audio = audio_tokens.reshape(b * f, *audio_tokens.shape[2:])
            _check_tokens("audio_tokens", audio, self.config.audio_attention_dim)
        refs = None
        if reference_states is not None:
            if len(reference_states) != self.num_reference_layers:
                raise ValueError(
                    f"reference_states has {len(reference_states)} entries, the UNet has {self.num_reference_layers} "
                    "attention layers"
                )
            refs = [self._group_reference(s, b, i) for i, s in enumerate(reference_states)]
        run = _Run(
            temb=temb,
            frames=f,
            face=face_tokens,
            audio=audio,
            audio_weights=audio_weights,
            masks=_Masks(masks, b, f) if masks else None,
            references=refs,
            temporal_motion_frames=self.config.motion_frames_mode == "temporal",
        )
        x = self._body(x, run)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x.view(b, f, -1, h, w).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# reference UNet


class ReferenceUNet2D(ModelMixin, ConfigMixin, _UNetCore):
    """Hallo's reference UNet: SD-1.5 ``UNet2DConditionModel`` without ``conv_norm_out``/``conv_out``.

    ``forward`` returns the attn1 inputs of every attention layer (see the module docstring). It stops as soon
    as the last one is computed, so the tail of the last up block's last attention layer (its ``attn1``,
    ``attn2``, ``ff``, ``proj_out``; ``unused_parameter_names()``) never runs: those weights exist only so
    that checkpoints map one to one, and get no gradient.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
    ):
        super().__init__()
        channels = list(block_out_channels)
        spec = _Spec(
            temb=4 * channels[0],
            groups=norm_num_groups,
            eps=norm_eps,
            heads=attention_head_dim,
            cross_dim=cross_attention_dim,
            audio_dim=None,
            motion_heads=None,
            motion_max_len=0,
        )
        self._build_core(in_channels, channels, layers_per_block, spec, flip_sin_to_cos, freq_shift)

    @classmethod
    def from_model_config(cls, model, **overrides) -> ReferenceUNet2D:
        kwargs = dict(
            in_channels=model.latent_channels,
            block_out_channels=list(model.block_out_channels),
            layers_per_block=model.layers_per_block,
            attention_head_dim=model.attention_head_dim,
            norm_num_groups=model.norm_num_groups,
            cross_attention_dim=model.cross_attention_dim,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def unused_parameter_names(self) -> list[str]:
        """Parameters the forward never uses (freeze them, or DDP needs ``find_unused_parameters``)."""
        last = self.attention_layer_names()[-1]
        keep = {f"{last}.norm.", f"{last}.proj_in.", f"{last}.transformer_blocks.0.norm1."}
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith(last + ".") and not any(name.startswith(k) for k in keep)
        ]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        face_tokens: torch.Tensor | None = None,
        references_per_sample: int | None = None,
    ) -> list[torch.Tensor]:
        """Encode reference images.

        Args:
            sample: (B*R, C, H, W) latents of the reference images (R per sample, grouped per sample).
            timestep: scalar or (B*R,) (Hallo uses 0).
            face_tokens: (B or B*R, Nf, cross_attention_dim); None skips attn2.
            references_per_sample: R; when given, each state is regrouped to (B, R*h*w, C).

        Returns:
            One tensor per attention layer, in ``attention_layer_names()`` order: (B*R, h*w, C), or
            (B, R*h*w, C) with ``references_per_sample``.
        """
        if sample.ndim != 4:
            raise ValueError(f"sample must be (B*R, C, H, W), got {tuple(sample.shape)}")
        n = sample.shape[0]
        _check_tokens("face_tokens", face_tokens, self.config.cross_attention_dim)
        temb = self._embed_time(timestep, n, sample.device)
        run = _Run(
            temb=temb,
            frames=1,
            face=face_tokens,
            collect=[],
            collect_total=self.num_reference_layers,
            stop_early=True,
        )
        self._body(self.conv_in(sample.to(self.conv_in.weight.dtype)), run)
        states = run.collect
        if references_per_sample is not None:
            r = references_per_sample
            if n % r:
                raise ValueError(f"{n} images are not a multiple of references_per_sample={r}")
            states = [s.reshape(n // r, r * s.shape[1], s.shape[2]) for s in states]
        return states


# --------------------------------------------------------------------------------------------------------------
# face locator


class FaceLocator(ModelMixin, ConfigMixin):
    """Hallo's face locator: the face-region mask -> features added to the denoising UNet after ``conv_in``.

    ``conv_in`` (3x3) + SiLU, then per stage a 3x3 conv and a stride-2 3x3 conv (``blocks.0..``), each + SiLU,
    then ``conv_out`` (3x3, zero-initialised, so a fresh locator adds nothing). Downscales by
    ``2 ** (len(block_out_channels) - 1)`` (Hallo: 8, pixels -> SD latents).
    """

    @register_to_config
    def __init__(
        self,
        conditioning_embedding_channels: int = 320,
        conditioning_channels: int = 3,
        block_out_channels: Sequence[int] = (16, 32, 64, 128),
    ):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(chans[:-1], chans[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(chans[-1], conditioning_embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @classmethod
    def from_model_config(cls, model, **overrides) -> FaceLocator:
        """Stages chosen so the output lands on the latent grid: x8 for the KL VAE, x``pixel_shuffle_factor``
        for the pixel-shuffle autoencoder (Hallo's widths 16, 32, 64, 128, ...)."""
        factor = 8 if model.autoencoder == "kl" else model.pixel_shuffle_factor
        stages = int(round(math.log2(factor)))
        if 2**stages != factor:
            raise ValueError(f"the latent downscale factor {factor} is not a power of 2")
        kwargs = dict(
            conditioning_embedding_channels=model.block_out_channels[0],
            conditioning_channels=3,
            block_out_channels=[16 * 2**i for i in range(stages + 1)],
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, Cc, F, H, W) -> (B, C0, F, H/s, W/s), or (B, Cc, H, W) -> (B, C0, H/s, W/s). A one-channel mask is
        repeated to ``conditioning_channels``."""
        video = mask.ndim == 5
        if video:
            b, cc, f, h, w = mask.shape
            x = mask.transpose(1, 2).reshape(b * f, cc, h, w)
        else:
            x = mask
        if x.shape[1] == 1 and self.config.conditioning_channels > 1:
            x = x.expand(-1, self.config.conditioning_channels, -1, -1)
        x = F.silu(self.conv_in(x.to(self.conv_in.weight.dtype)))
        for block in self.blocks:
            x = F.silu(block(x))
        x = self.conv_out(x)
        if video:
            x = x.view(b, f, *x.shape[1:]).transpose(1, 2)
        return x
