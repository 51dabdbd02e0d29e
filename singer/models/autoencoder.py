"""Autoencoders: the SD VAE (paper, frozen) or a lossless pixel-shuffle "autoencoder" (tiny: pixel space).

    vae = load_autoencoder(cfg.model)                     # PixelShuffleAutoencoder or a frozen AutoencoderKL
    z = encode_video(vae, frames)                         # (B, 3, F, H, W) in [-1, 1] -> (B, C, F, h, w) * scaling
    frames = decode_video(vae, z)                         # back, chunked over frames, clamped to [-1, 1]
    vae_scale_factor(vae)                                 # H / h: 2 (pixel shuffle x2) or 8 (SD VAE)

``PixelShuffleAutoencoder`` has no parameters and needs no training: encode is ``pixel_unshuffle(factor)``
((B, 3, H, W) -> (B, 3 f^2, H/f, W/f)), decode is ``pixel_shuffle``; the round trip is exact. It answers the parts
of ``AutoencoderKL``'s interface a pipeline uses: ``encode(x).latent_dist.sample()`` / ``.mode()`` (the same
deterministic tensor), ``decode(z).sample``, ``config.scaling_factor`` (1.0), ``config.latent_channels``,
``config.shift_factor`` (None), ``dtype`` and ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

__all__ = [
    "DeterministicLatent",
    "PixelShuffleAutoencoder",
    "decode_video",
    "encode_video",
    "load_autoencoder",
    "vae_scale_factor",
]

SD_SCALING_FACTOR = 0.18215


class DeterministicLatent:
    """Stands in for ``DiagonalGaussianDistribution`` with zero variance."""

    def __init__(self, z: torch.Tensor):
        self.mean = z

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Any = None) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    """Lossless, parameter-free: ``pixel_unshuffle`` / ``pixel_shuffle`` by ``factor``."""

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, latent_channels: int | None = None,
                 scaling_factor: float = 1.0, shift_factor: float | None = None):
        super().__init__()
        expected = in_channels * factor * factor
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if latent_channels is not None and latent_channels != expected:
            raise ValueError(
                f"pixel shuffle x{factor} of {in_channels} channels gives {expected} latent channels, "
                f"not {latent_channels} (model.latent_channels)"
            )
        self.register_to_config(latent_channels=expected)
        # No parameters: a non-persistent anchor gives the module a dtype and a device.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Only ``config.json`` is read: there are no weights (``save_pretrained`` writes none)."""
        load_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token") if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **load_kwargs)
        model = cls.from_config(config)
        dtype = kwargs.get("torch_dtype")
        if dtype is not None and dtype != model.dtype:
            torch.nn.Module.to(model, dtype)  # (ModelMixin.to logs a spurious float32 warning)
        return model

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        f = self.config.factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"expected (B, {self.config.in_channels}, H, W) with H and W divisible by {f}, got {tuple(x.shape)}"
            )
        dist = DeterministicLatent(F.pixel_unshuffle(x, f))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected (B, {self.config.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        x = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)


def load_autoencoder(model_cfg: Any) -> PixelShuffleAutoencoder | Any:
    """``model.autoencoder``: "pixel_shuffle" -> ``PixelShuffleAutoencoder(pixel_shuffle_factor)``;
    "kl" -> ``AutoencoderKL.from_pretrained(autoencoder_path)`` from a local folder, frozen, in eval mode."""
    kind = str(model_cfg.autoencoder).lower()
    if kind == "pixel_shuffle":
        return PixelShuffleAutoencoder(factor=model_cfg.pixel_shuffle_factor,
                                       latent_channels=model_cfg.latent_channels)
    if kind != "kl":
        raise ValueError(f"unknown model.autoencoder {model_cfg.autoencoder!r} (pixel_shuffle | kl)")
    from diffusers import AutoencoderKL

    path = Path(model_cfg.autoencoder_path) if model_cfg.autoencoder_path else None
    if path is None or not (path / "config.json").is_file():
        what = "is not set" if path is None else ("does not exist" if not path.exists() else "has no config.json")
        raise FileNotFoundError(
            f"autoencoder folder {model_cfg.autoencoder_path} {what} "
            "(model.autoencoder_path: a local diffusers AutoencoderKL, e.g. sd-vae-ft-mse)"
        )
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    if vae.config.latent_channels != model_cfg.latent_channels:
        raise ValueError(
            f"the autoencoder at {path} has {vae.config.latent_channels} latent channels, "
            f"model.latent_channels is {model_cfg.latent_channels}"
        )
    vae.requires_grad_(False)
    return vae.eval()


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent pixel along a side."""
    if isinstance(vae, PixelShuffleAutoencoder):
        return int(vae.config.factor)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _scale_shift(vae: Any) -> tuple[float, float]:
    scaling = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return (1.0 if scaling is None else float(scaling)), (0.0 if shift is None else float(shift))


def encode_video(vae: Any, frames: torch.Tensor, chunk_size: int = 16, sample: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> latents (B, C, F, h, w), ``(z - shift) * scaling``.

    ``sample=False`` takes the posterior mode (deterministic); Hallo's training samples (``sample=True``).
    Frames are encoded ``chunk_size`` at a time.
    """
    if frames.ndim != 5:
        raise ValueError(f"frames must be (B, 3, F, H, W), got {tuple(frames.shape)}")
    b, f = frames.shape[0], frames.shape[2]
    flat = rearrange(frames, "b c f h w -> (b f) c h w").to(device=vae.device, dtype=vae.dtype)
    scaling, shift = _scale_shift(vae)
    out = []
    for i in range(0, flat.shape[0], max(1, chunk_size)):
        dist = vae.encode(flat[i:i + chunk_size]).latent_dist
        out.append(dist.sample(generator=generator) if sample else dist.mode())
    z = (torch.cat(out) - shift) * scaling
    return rearrange(z, "(b f) c h w -> b c f h w", b=b, f=f)


def decode_video(vae: Any, latents: torch.Tensor, chunk_size: int = 8, clamp: bool = True) -> torch.Tensor:
    """Latents (B, C, F, h, w) (scaled as ``encode_video`` returns them) -> frames (B, 3, F, H, W) in [-1, 1],
    decoded ``chunk_size`` frames at a time."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, C, F, h, w), got {tuple(latents.shape)}")
    b, f = latents.shape[0], latents.shape[2]
    scaling, shift = _scale_shift(vae)
    flat = rearrange(latents, "b c f h w -> (b f) c h w").to(device=vae.device, dtype=vae.dtype)
    flat = flat / scaling + shift
    out = [vae.decode(flat[i:i + chunk_size]).sample for i in range(0, flat.shape[0], max(1, chunk_size))]
    x = torch.cat(out)
    if clamp:
        x = x.clamp(-1, 1)
    return rearrange(x, "(b f) c h w -> b c f h w", b=b, f=f)
