"""Multi-scale Spectral Module (MSM), SINGER paper sections 3.1-3.2.

The audio features of every audio token form a 2D map over (time = video frames, embedding). MSM splits that map
into four Haar sub-bands (LL, LH, HL, HH), re-weights each sub-band by a weight predicted from the current noisy
latent ``z_t``, and transforms back. It runs on every denoising step (training and inference alike), so the audio
conditioning follows the latent as it is denoised.

    audio (B, F, N, C) --DWT over (F, C)--> LL, LH, HL, HH      each (B, ceil(F/2), N, ceil(C/2))
    z_t (B, C_lat, F', H, W) --(* w)--> w_z --split W into `chunks`, mean--> (B, chunks)
        --Linear(chunks, hidden)--SiLU--Linear(hidden, 4)--> s (B, 4) --> weights 2 * sigmoid(s) (B, 4)
    out = IDWT(weights[:, k] * band_k for k in LL, LH, HL, HH)   (B, F, N, C), the input shape

Choices (documented here, tested in ``tests/test_spectral.py``):

* ``w`` is a trainable ``nn.Parameter`` of shape ``(latent_channels, num_frames, latent_size, latent_size)``, as in
  the paper (the authors' code kept a frozen random buffer instead). It is initialised to ones, so the descriptor
  starts as the plain per-chunk mean of ``z_t`` (deterministic, no RNG dependence, the natural neutral element of
  an element-wise weighting) and training learns where in the latent to look. When ``z_t``'s ``(F', H, W)``
  differ from the parameter's, ``w`` is resized to them with trilinear interpolation (``align_corners=False``);
  the latent channel count must match.
* Pooling: the mean of ``w_z`` over ``C_lat``, ``F'``, ``H`` and each width slice. The slices are
  ``adaptive_avg_pool1d`` bins, i.e. exact equal chunks when ``chunks`` divides ``W`` and the standard
  floor/ceil bins (never empty) otherwise.
* The last linear layer (weight and bias) is zero-initialised: ``2 * sigmoid(0) = 1`` exactly, so MSM is exactly
  the identity at initialisation and a pretrained Hallo model plus a fresh MSM reproduces Hallo.
* Residual evaluation. Haar is linear and perfectly invertible, so
  ``IDWT(weights * bands) == audio + IDWT((weights - 1) * bands)`` exactly in exact arithmetic. ``forward``
  evaluates the right-hand side, with ``weights - 1 = 2 * sigmoid(s) - 1 = tanh(s / 2)``. At initialisation
  ``tanh(0) = 0`` and ``IDWT(0) = 0``, so the output is bit-for-bit the input (``torch.equal``), whereas the
  round trip ``IDWT(DWT(x))`` alone is only exact to float rounding (~1e-7 in fp32, ~1e-2 in bf16). Gradients
  are the same as those of the left-hand side.
* Odd ``F`` or ``C``: the wavelet functions pad by repeating the last sample and the inverse crops back
  (``singer.models.wavelet``).
* No shape is hard-coded: any batch size, frame count, number of tokens, embedding size and latent resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, reduce
from torch import nn

from singer.models.wavelet import haar_dwt2, haar_idwt2

__all__ = ["MultiScaleSpectralModule"]

# Audio features (B, F, N, C): the 2D map of one token is over (time = F, embedding = C).
_AUDIO_DIMS = (1, 3)
NUM_BANDS = 4


class MultiScaleSpectralModule(ModelMixin, ConfigMixin):
    """Re-weights the four Haar sub-bands of the audio features by weights predicted from ``z_t``.

    Config:
        latent_channels: ``C_lat`` of ``z_t`` (4 for the SD VAE).
        num_frames: frame count ``F0`` of the stored ``w``.
        latent_size: spatial size ``H0 = W0`` of the stored ``w`` (64 for 512 px with the SD VAE).
        hidden_dim: width of the FC's hidden layer.
        chunks: number of width chunks pooled into the FC's input.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        num_frames: int = 16,
        latent_size: int = 64,
        hidden_dim: int = 16,
        chunks: int = 4,
    ):
        super().__init__()
        sizes = {"latent_channels": latent_channels, "num_frames": num_frames, "latent_size": latent_size}
        for name, value in {**sizes, "hidden_dim": hidden_dim, "chunks": chunks}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        # (C_lat, F0, H0, W0); a trainable parameter, never a buffer.
        self.w = nn.Parameter(torch.ones(latent_channels, num_frames, latent_size, latent_size))
        self.fc = nn.Sequential(
            nn.Linear(chunks, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, NUM_BANDS),
        )
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    def resized_w(self, frames: int, height: int, width: int) -> torch.Tensor:
        """``w`` at ``(frames, height, width)``: ``(C_lat, frames, height, width)`` (trilinear when resized)."""
        w = self.w
        if tuple(w.shape[1:]) == (frames, height, width):
            return w
        w = rearrange(w, "c f h w -> 1 c f h w")
        w = F.interpolate(w, size=(frames, height, width), mode="trilinear", align_corners=False)
        return rearrange(w, "1 c f h w -> c f h w")

    def band_logits(self, z_t: torch.Tensor) -> torch.Tensor:
        """The FC output ``s`` for ``z_t`` (B, C_lat, F', H, W) -> (B, 4); the band weights are ``2 * sigmoid(s)``."""
        if z_t.ndim != 5:
            raise ValueError(f"z_t must be (B, C_lat, F, H, W), got shape {tuple(z_t.shape)}")
        c_lat, frames, height, width = z_t.shape[1:]
        if c_lat != self.config.latent_channels:
            raise ValueError(f"z_t has {c_lat} channels, MSM expects {self.config.latent_channels}")
        w_z = self.resized_w(frames, height, width) * z_t  # (B, C_lat, F', H, W)
        # Mean over C_lat, F', H per column, then over each column chunk; equal to the mean of each chunk of w_z.
        columns = reduce(w_z, "b c f h w -> b 1 w", "mean")
        pooled = rearrange(F.adaptive_avg_pool1d(columns, self.config.chunks), "b 1 k -> b k")
        fc_dtype = self.fc[0].weight.dtype
        return self.fc(pooled.to(fc_dtype))  # (B, 4)

    def band_weights(self, z_t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of (LL, LH, HL, HH): (B, 4), in (0, 2), exactly 1 at initialisation."""
        return 2 * torch.sigmoid(self.band_logits(z_t))

    def forward(self, audio: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """Args:
            audio: (B, F, N, C) audio features: F video frames, N tokens per frame, C embedding dim.
            z_t: (B, C_lat, F', H, W) the current noisy latent (F' usually equals F; it need not).

        Returns:
            (B, F, N, C), same dtype as ``audio``.
        """
        if audio.ndim != 4:
            raise ValueError(f"audio must be (B, F, N, C), got shape {tuple(audio.shape)}")
        if audio.shape[0] != z_t.shape[0]:
            raise ValueError(f"batch mismatch: audio {audio.shape[0]}, z_t {z_t.shape[0]}")
        bands = haar_dwt2(audio, dims=_AUDIO_DIMS)  # 4 x (B, ceil(F/2), N, ceil(C/2))
        # weights - 1 = 2 * sigmoid(s) - 1 = tanh(s / 2); exactly 0 at init (see the module docstring).
        delta = torch.tanh(self.band_logits(z_t) / 2).to(audio.dtype)  # (B, 4)
        delta = rearrange(delta, "b k -> k b 1 1 1")
        scaled = [band * d for band, d in zip(bands, delta)]
        size = (audio.shape[_AUDIO_DIMS[0]], audio.shape[_AUDIO_DIMS[1]])
        return audio + haar_idwt2(*scaled, dims=_AUDIO_DIMS, size=size)
