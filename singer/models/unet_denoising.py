"""The denoising 3D UNet (DESIGN.md section 3; Hallo's architecture) plus SINGER's SFM on the middle-block output.

Per layer (see ``singer.models.unet_blocks``): resnet -> spatial attention (self-attention + reference K/V,
cross-attention to face tokens) -> audio module -> motion module; SFM (``sfm``) on the middle-block output.
Fresh motion modules and SFM are exact identities. Fresh audio modules are not: their output depends on the
audio even while they are frozen, so gradients reach the audio side (``singer.models.audio_module``).

Reference states (``ReferenceUNet2D`` output): ``{attention name: (B, R*h*w, C)}`` (or ``(B*R, h*w, C)``,
regrouped) for every name of ``attention_layer_names()``, R images per sample (the reference frame, then the
motion frames):

* the reference frame's tokens become extra keys/values of every frame's self-attention (reference-only
  attention, AnimateAnyone/Hallo);
* the motion frames (R > 1): ``motion_frames_mode="temporal"`` (default, Hallo) prepends their tokens to the
  frame axis of the motion module that follows the layer (temporal context from the previous window);
  ``"spatial"`` appends them to the self-attention keys/values like the reference frame. (Hallo trained its
  released weights the "temporal" way: stage 2 runs with gradient checkpointing, whose code path prepends the
  motion frames in every cross-attention block; without motion modules the motion frames are not used.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from torch import nn

from singer.models.audio_module import resize_masks
from singer.models.sfm import SelfAdaptiveFilterModule
from singer.models.unet_blocks import BlockInputs, UNetCore, UNetSpec, check_tokens

__all__ = ["MOTION_FRAMES_MODES", "DenoisingUNet3D"]

MOTION_FRAMES_MODES = ("temporal", "spatial")


class DenoisingUNet3D(ModelMixin, ConfigMixin, UNetCore):
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
        reference_fp16: round the reference states to float16 before use, as Hallo does (its
            ``ReferenceAttentionControl.update`` casts the bank to float16 by default,
            ``mutual_self_attention.py:404, 453``, and the pipeline and training call it without a dtype).
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
        reference_fp16: bool = True,
    ):
        super().__init__()
        if motion_frames_mode not in MOTION_FRAMES_MODES:
            raise ValueError(f"motion_frames_mode must be one of {MOTION_FRAMES_MODES}, got {motion_frames_mode!r}")
        channels = list(block_out_channels)
        spec = UNetSpec(
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
        """Build from a ``singer.config.ModelConfig`` (keyword overrides win); the audio tokens are projected to
        ``cross_attention_dim`` like the face tokens."""
        kwargs = dict(
            in_channels=model.latent_channels,
            out_channels=model.latent_channels,
            block_out_channels=list(model.block_out_channels),
            layers_per_block=model.layers_per_block,
            attention_head_dim=model.attention_head_dim,
            norm_num_groups=model.norm_num_groups,
            cross_attention_dim=model.cross_attention_dim,
            audio_attention_dim=model.audio_attention_dim or model.cross_attention_dim,
            motion_num_heads=model.motion_num_heads,
            motion_max_len=model.motion_max_len,
            use_sfm=model.sfm,
            sfm_reduction=model.sfm_reduction,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def _after_mid(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """SFM on the middle-block output (B*F, C, h, w), one gate per clip."""
        if self.sfm is None:
            return x
        y = self.sfm(rearrange(x, "(b f) c h w -> b c f h w", f=inputs.frames))
        return rearrange(y, "b c f h w -> (b f) c h w")

    def unused_parameter_names(self) -> list[str]:
        """Parameters the forward never uses: the motion modules of the blocks without attention (Hallo's
        training-mode branch skips them; see ``unet_blocks``). Freeze them, or DDP needs ``find_unused_parameters``."""
        names = []
        for prefix, blocks in (("down_blocks", self.down_blocks), ("up_blocks", self.up_blocks)):
            for i, block in enumerate(blocks):
                names += [f"{prefix}.{i}.{name}" for name in block.unused_parameter_names()]
        return names

    def _group_references(self, states: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """Check the names; (B*R, h*w, C) -> (B, R*h*w, C); rounded to float16 with ``reference_fp16``."""
        names = self.attention_layer_names()
        if set(states) != set(names):
            missing, unexpected = sorted(set(names) - set(states)), sorted(set(states) - set(names))
            raise ValueError(
                f"reference_states must have one entry per attention layer; missing {missing}, unexpected {unexpected}"
            )
        grouped = {}
        for name in names:
            state = states[name]
            if state.ndim != 3:
                raise ValueError(f"reference_states[{name!r}] must be (B, R*h*w, C), got {tuple(state.shape)}")
            if state.shape[0] != batch:
                if state.shape[0] % batch:
                    raise ValueError(f"reference_states[{name!r}] has {state.shape[0]} rows for a batch of {batch}")
                state = rearrange(state, "(b r) l c -> b (r l) c", b=batch)
            if self.config.reference_fp16:
                state = state.to(torch.float16).to(state.dtype)
            grouped[name] = state
        return grouped

    @staticmethod
    def _check_keep(keep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if keep is not None and (keep.ndim != 1 or keep.shape[0] != batch):
            raise ValueError(f"reference_keep must be ({batch},) bool, got {tuple(keep.shape)}")
        return keep

    @staticmethod
    def _check_rows(rows: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor | None:
        if rows is not None and (rows.shape != (batch * frames,) or rows.min() < 0 or rows.max() >= batch):
            raise ValueError(f"reference_rows must be ({batch * frames},) sample indices < {batch}, got {tuple(rows.shape)}")
        return rows

    @staticmethod
    def _check_scale(scale: Sequence[float]) -> tuple[float, float, float]:
        values = tuple(float(v) for v in scale)
        if len(values) != 3:
            raise ValueError(f"motion_scale must be 3 weights (full, face, lip), got {len(values)}")
        return values

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        *,
        face_tokens: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        reference_states: Mapping[str, torch.Tensor] | None = None,
        masks: Mapping[str, torch.Tensor | None] | None = None,
        face_features: torch.Tensor | None = None,
        reference_keep: torch.Tensor | None = None,
        motion_scale: Sequence[float] | None = None,
        reference_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise / v / x0 for a window of frames.

        Args:
            sample: noisy latents (B, C, F, H, W).
            timestep: (B,) or a scalar.
            face_tokens: (B, Nf, cross_attention_dim) (or one set per frame, (B*F, Nf, D)); None skips attn2.
            audio_tokens: (B, F, Na, audio_attention_dim), the tokens of each frame; None skips the audio modules.
            reference_states: ``ReferenceUNet2D`` output, ``{name: (B, R*h*w, C) or (B*R, h*w, C)}`` for every
                name of ``attention_layer_names()``; None: plain self-attention.
            masks: {"full" (or "pose"), "face", "lip"}: (B, 1, H, W) or (B, F, 1, H, W) in [0, 1], any resolution
                (resized per block with area / bilinear interpolation); a missing mask weighs 1 everywhere.
            face_features: ``FaceLocator`` output (B, C0, F, H, W) or (B, C0, H, W), added after ``conv_in``.
            reference_keep: (B,) bool, the samples whose frames attend to the reference frame (None: all). The
                others run plain self-attention but keep their motion frames: Hallo's unconditional branch.
            motion_scale: weights of the full (pose), face and lip audio attentions (Hallo's ``motion_scale``;
                None: 1, 1, 1).
            reference_rows: (B*F,) long, the sample whose reference frame each folded row ``b*F + f`` attends to;
                None (the default): its own sample. Hallo's reader assigns row ``j`` the reference of sample
                ``j % B`` (``mutual_self_attention.py:235-247``: the reference frames are tiled, not repeated per
                sample, once ``.unsqueeze(1)`` was commented out), so with B > 1 (a training batch, or the CFG
                pair at inference) frames attend to other samples' references. That is a bug this project does
                not copy; ``reference_rows=torch.arange(B*F) % B`` reproduces it (the golden test does).

        Returns:
            (B, out_channels, F, H, W).
        """
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, F, H, W), got {tuple(sample.shape)}")
        b, _, f, h, w = sample.shape
        temb = self._embed_time(timestep, b, sample.device)
        x = self.conv_in(rearrange(sample, "b c f h w -> (b f) c h w").to(self.conv_in.weight.dtype))
        if face_features is not None:
            if face_features.ndim == 4:
                face_features = repeat(face_features, "b c h w -> b c f h w", f=f)
            if face_features.shape != (b, x.shape[1], f, h, w):
                raise ValueError(f"face_features must be (B, {x.shape[1]}, F, H, W), got {tuple(face_features.shape)}")
            x = x + rearrange(face_features, "b c f h w -> (b f) c h w").to(x.dtype)
        check_tokens("face_tokens", face_tokens, self.config.cross_attention_dim)
        audio = None
        if audio_tokens is not None and self.config.use_audio_modules:
            if audio_tokens.ndim != 4 or audio_tokens.shape[:2] != (b, f):
                raise ValueError(
                    f"audio_tokens must be (B, F, Na, D) = ({b}, {f}, Na, D), got {tuple(audio_tokens.shape)}"
                )
            audio = rearrange(audio_tokens, "b f n d -> (b f) n d")
            check_tokens("audio_tokens", audio, self.config.audio_attention_dim)
        inputs = BlockInputs(
            temb=temb,
            frames=f,
            face_tokens=face_tokens,
            audio_tokens=audio,
            masks=resize_masks(masks, b, f, self.level_sizes(h, w)) if masks else None,
            reference_states=None if reference_states is None else self._group_references(reference_states, b),
            reference_keep=self._check_keep(reference_keep, b),
            reference_rows=self._check_rows(reference_rows, b, f),
            temporal_motion_frames=self.config.motion_frames_mode == "temporal",
            motion_scale=None if motion_scale is None else self._check_scale(motion_scale),
        )
        x, _ = self._run_blocks(x, inputs)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return rearrange(x, "(b f) c h w -> b c f h w", b=b).contiguous()
