"""Hallo's face locator (DESIGN.md section 3): the face-region mask -> features added to the denoising UNet
after its ``conv_in``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

__all__ = ["FaceLocator"]


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
        x = rearrange(mask, "b c f h w -> (b f) c h w") if video else mask
        if x.shape[1] == 1 and self.config.conditioning_channels > 1:
            x = x.expand(-1, self.config.conditioning_channels, -1, -1)
        x = F.silu(self.conv_in(x.to(self.conv_in.weight.dtype)))
        for block in self.blocks:
            x = F.silu(block(x))
        x = self.conv_out(x)
        if video:
            x = rearrange(x, "(b f) c h w -> b c f h w", b=mask.shape[0])
        return x
