"""The reference 2D UNet (DESIGN.md section 3; Hallo's ``reference_unet``): encodes the reference images.

Its output is what the denoising UNet attends to: for every spatial attention layer, keyed by the layer's name
(``attention_layer_names()``, the same in both UNets), the input of that layer's ``attn1`` (the LayerNorm-ed
tokens), ``(B*R, h*w, C)`` for B*R reference images (R per sample: the reference frame, then the motion frames),
or ``(B, R*h*w, C)`` grouped per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from singer.models.attention import SpatialTransformer
from singer.models.unet_blocks import BlockInputs, UNetCore, UNetSpec, check_tokens

__all__ = ["ReferenceUNet2D"]


class ReferenceUNet2D(ModelMixin, ConfigMixin, UNetCore):
    """Hallo's reference UNet: SD-1.5 ``UNet2DConditionModel`` without ``conv_norm_out``/``conv_out``.

    ``forward`` returns the attn1 inputs of every attention layer (see the module docstring). The last attention
    layer (the last up block's last, the UNet's very last operation: no upsampler follows) is built
    ``attn1_input_only``: only its attn1 input is computed, so the tail of that layer (its ``attn1``, ``attn2``,
    ``ff``, ``proj_out``; ``unused_parameter_names()``) never runs: those weights exist only so that checkpoints
    map one to one, and get no gradient.
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
        spec = UNetSpec(
            temb=4 * channels[0],
            groups=norm_num_groups,
            eps=norm_eps,
            heads=attention_head_dim,
            cross_dim=cross_attention_dim,
            captures_attn1_inputs=True,
        )
        self._build_core(in_channels, channels, layers_per_block, spec, flip_sin_to_cos, freq_shift)
        last_block = self.up_blocks[-1]
        if last_block.upsamplers is not None or last_block.attentions is None:
            raise AssertionError("the reference UNet must end with an attention layer")
        self.last_attention.attn1_input_only = True

    @property
    def last_attention(self) -> SpatialTransformer:
        """The last attention layer (``attention_layer_names()[-1]``)."""
        return self.up_blocks[-1].attentions[-1]

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
        return [f"{last}.{name}" for name in self.last_attention.unused_parameter_names()]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        *,
        face_tokens: torch.Tensor | None = None,
        references_per_sample: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode reference images.

        Args:
            sample: (B*R, C, H, W) latents of the reference images (R per sample, grouped per sample).
            timestep: scalar or (B*R,) (Hallo uses 0).
            face_tokens: (B or B*R, Nf, cross_attention_dim); None skips attn2.
            references_per_sample: R; when given, each state is regrouped to (B, R*h*w, C).

        Returns:
            ``{name: state}`` for every name of ``attention_layer_names()``, in that (execution) order:
            (B*R, h*w, C), or (B, R*h*w, C) with ``references_per_sample``.
        """
        if sample.ndim != 4:
            raise ValueError(f"sample must be (B*R, C, H, W), got {tuple(sample.shape)}")
        n = sample.shape[0]
        check_tokens("face_tokens", face_tokens, self.config.cross_attention_dim)
        inputs = BlockInputs(temb=self._embed_time(timestep, n, sample.device), frames=1, face_tokens=face_tokens)
        _, states = self._run_blocks(self.conv_in(sample.to(self.conv_in.weight.dtype)), inputs)
        if references_per_sample is not None:
            r = references_per_sample
            if n % r:
                raise ValueError(f"{n} images are not a multiple of references_per_sample={r}")
            states = {name: rearrange(s, "(b r) l c -> b (r l) c", r=r) for name, s in states.items()}
        return states
