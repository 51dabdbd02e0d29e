"""Self-adaptive Filter Module (SFM), SINGER paper section 3.3.

Applied to the output ``H`` of the denoising UNet's middle block: a learned per-channel filter in the Haar domain
over space, followed by a channel gate computed from ``H`` itself::

    H (B, C, h, w) or (B, C, F, h, w)
      --Haar DWT over (h, w)--> LL, LH, HL, HH                      each (..., ceil(h/2), ceil(w/2))
      --band k, channel c times (1 + raw[k, c])--> IDWT --> H_f    like H
    gate = 2 * sigmoid(FC(mean of H over space (and frames)))       (B, C)
    out  = H_f * gate                                               like H

Choices (tested in ``tests/test_spectral.py``):

* Layout: 4-D ``(B, C, h, w)`` (frames folded into the batch, how a 2D block sees a video) or 5-D
  ``(B, C, F, h, w)`` (the 3D UNet's layout). With 5-D input the gate pools over frames and space, so one gate per
  clip and channel; with folded 4-D input each frame gets its own gate.
* Band weights: a parameter ``raw`` of shape ``(4, C)`` (rows LL, LH, HL, HH), initialised to zero; the effective
  weight is ``1 + raw`` (unconstrained, so a band can be removed or amplified).
* FC: a squeeze-and-excitation bottleneck ``Linear(C, C // reduction) -> SiLU -> Linear(C // reduction, C)``
  (hidden width at least 1). At ``C = 1280`` and ``reduction = 4`` it has 0.8 M parameters instead of the 1.6 M
  of a single ``Linear(C, C)``. Its last layer (weight and bias) is zero-initialised, so the gate is exactly 1.
* Residual evaluation, as in MSM: ``IDWT((1 + raw) * bands) == H + IDWT(raw * bands)`` because Haar is linear and
  perfectly invertible. ``forward`` evaluates the right-hand side, so at initialisation (``raw = 0``, gate 1) the
  output is bit-for-bit ``H`` (``torch.equal``), in every dtype.
* Odd ``h`` or ``w`` are padded by repeating the last row/column and cropped back (``singer.models.wavelet``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, reduce
from torch import nn

from singer.models.wavelet import haar_dwt2, haar_idwt2

__all__ = ["SelfAdaptiveFilterModule"]

NUM_BANDS = 4
_SPACE_DIMS = (-2, -1)


class SelfAdaptiveFilterModule(ModelMixin, ConfigMixin):
    """Learned Haar-domain filter plus channel gate on the UNet middle-block output.

    Config:
        channels: ``C`` of ``H`` (1280 for the SD-1.5 UNet's middle block).
        reduction: bottleneck factor of the gate's FC (hidden width ``max(1, channels // reduction)``).
    """

    @register_to_config
    def __init__(self, channels: int = 1280, reduction: int = 4):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        # Rows LL, LH, HL, HH; the effective per-band, per-channel weight is 1 + raw.
        self.band_raw = nn.Parameter(torch.zeros(NUM_BANDS, channels))
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.SiLU(),
            nn.Linear(hidden, channels),
        )
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    @property
    def band_weights(self) -> torch.Tensor:
        """Effective per-band, per-channel weights (4, C); all ones at initialisation."""
        return 1 + self.band_raw

    def gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``2 * sigmoid(FC(pool(H)))``: (B, C), exactly 1 at initialisation (float32 or the FC's dtype)."""
        if hidden_states.ndim == 4:
            pooled = reduce(hidden_states, "b c h w -> b c", "mean")
        else:
            pooled = reduce(hidden_states, "b c f h w -> b c", "mean")
        return 2 * torch.sigmoid(self.fc(pooled.to(self.fc[0].weight.dtype)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Args:
            hidden_states: ``H``, (B, C, h, w) or (B, C, F, h, w).

        Returns:
            The filtered and gated ``H``, same shape and dtype.
        """
        if hidden_states.ndim not in (4, 5):
            raise ValueError(
                f"H must be (B, C, h, w) or (B, C, F, h, w), got shape {tuple(hidden_states.shape)}"
            )
        if hidden_states.shape[1] != self.config.channels:
            raise ValueError(f"H has {hidden_states.shape[1]} channels, SFM expects {self.config.channels}")
        dtype = hidden_states.dtype
        units = " ".join(["1"] * (hidden_states.ndim - 2))  # broadcast over (F,) h, w
        bands = haar_dwt2(hidden_states, dims=_SPACE_DIMS)
        raw = rearrange(self.band_raw.to(dtype), f"k c -> k c {units}")  # (4, C, 1, 1) or (4, C, 1, 1, 1)
        scaled = [band * r for band, r in zip(bands, raw)]
        size = hidden_states.shape[-2:]
        filtered = hidden_states + haar_idwt2(*scaled, dims=_SPACE_DIMS, size=size)
        gate = rearrange(self.gate(hidden_states).to(dtype), f"b c -> b c {units}")
        return filtered * gate
