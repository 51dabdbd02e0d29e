"""SINGER, the composite: every component, the training loss and one denoising step.

    model = SingerModel.build(cfg.model, resolution=64)          # fresh tiny model
    loss, logs = model.training_loss(batch)                      # batch from SingerClipDataset (+ embeddings)
    v = model.denoise(z_t, t, cond)                              # MSM re-weights the audio from this z_t

Components (DESIGN section 3): `vae` (pixel shuffle or SD VAE), `reference_unet`, `denoising_unet` (with SFM
inside when `model.sfm`), `face_locator`, `face_encoder` (identity embedding -> tokens), `audio_encoder`
(wav2vec2 + projection), `msm` (None when `model.msm` is false). The scheduler is DDIM, v-prediction,
zero terminal SNR.

Conditioning (Hallo's semantics, ``shared/reference/hallo_golden``). The reference UNet encodes the reference
frame and the `motion_frames` frames before the window (R = 1 + M images) at timestep 0; the denoising UNet's
self-attention attends to the reference frame, its motion modules see the motion frames in front of the window.
The masks are Hallo's soft full (background) / face / lip masks; the face locator sees the hard face box.

Classifier-free guidance (``conditions(..., drop_image=, drop_audio=)``). Dropping the image conditions of a
sample means what Hallo's unconditional branch does at inference: identity tokens ``face_encoder(0)`` (not
zeros), no face-locator features, no reference attention (the motion frames stay); dropping the audio zeroes the
projected audio tokens. Training drops both for a sample with probability ``uncond_dropout`` (the branch the
guidance subtracts at inference, trained as such), and each half alone with ``reference_dropout`` /
``audio_dropout``. Hallo's training drop of the image differs (it skips the reference pass and puts four zero
motion frames in, ``train_stage2.py:148-161``, ``unet_3d_blocks.py:455``): that branch is never used at
inference, so it is not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from singer.config import ModelConfig
from singer.models.audio import AudioEncoder, make_audio_encoder
from singer.models.autoencoder import encode_video, load_autoencoder, vae_scale_factor
from singer.models.face import FaceEncoder
from singer.models.face_locator import FaceLocator
from singer.models.msm import MultiScaleSpectralModule
from singer.models.scheduler import make_scheduler, min_snr_weights, sample_timesteps, training_target
from singer.models.unet_denoising import DenoisingUNet3D
from singer.models.unet_reference import ReferenceUNet2D

# names accepted in train.trainable, and the modules they stand for
TRAINABLE_GROUPS = {
    "audio_encoder": ("audio_encoder.wav2vec2",),
    "audio_projection": ("audio_encoder.projection",),
    "face_encoder": ("face_encoder",),
    "reference_unet": ("reference_unet",),
    "denoising_unet": ("denoising_unet",),
    "motion_modules": ("denoising_unet.*motion_modules",),
    "audio_modules": ("denoising_unet.*audio_modules",),
    "face_locator": ("face_locator",),
    "msm": ("msm",),
    "sfm": ("denoising_unet.sfm",),
}


@dataclass
class Conditions:
    """Everything the denoising UNet needs besides z_t and t, for a batch of B windows of F frames."""

    face_tokens: torch.Tensor                 # (B, Nf, D)
    audio_tokens: torch.Tensor                # (B, F, Na, D), before MSM
    reference_states: dict[str, torch.Tensor]  # attention layer name -> (B, R*h*w, C)
    masks: dict[str, torch.Tensor]            # full/face/lip (B, 1, H, W) in [0, 1]
    face_features: torch.Tensor               # (B, C0, h, w), added after conv_in
    reference_keep: torch.Tensor | None = None  # (B,) bool: samples that attend to the reference (None: all)


def _matches(name: str, pattern: str) -> bool:
    if "*" in pattern:
        head, tail = pattern.split("*", 1)
        return name.startswith(head) and tail in name
    return name == pattern or name.startswith(pattern + ".")


class SingerModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vae, reference_unet: ReferenceUNet2D, denoising_unet: DenoisingUNet3D,
                 face_locator: FaceLocator, face_encoder: FaceEncoder, audio_encoder: AudioEncoder,
                 msm: MultiScaleSpectralModule | None, fps: float = 25.0):
        super().__init__()
        self.cfg = cfg
        self.vae = vae
        self.reference_unet = reference_unet
        self.denoising_unet = denoising_unet
        self.face_locator = face_locator
        self.face_encoder = face_encoder
        self.audio_encoder = audio_encoder
        self.msm = msm
        self.fps = fps
        self.scheduler = make_scheduler(cfg)
        self.vae.requires_grad_(False)
        # the reference UNet stops after the last attn1 input: its tail never runs
        for name in self.unused_parameter_names():
            self.get_parameter(name).requires_grad_(False)

    @classmethod
    def build(cls, cfg: ModelConfig, resolution: int, fps: float = 25.0, seed: int = 0) -> SingerModel:
        """A fresh model from the config (pretrained parts load from their local paths)."""
        torch.manual_seed(seed)
        vae = load_autoencoder(cfg)
        latent_size = resolution // vae_scale_factor(vae)
        msm = None
        if cfg.msm:
            msm = MultiScaleSpectralModule(latent_channels=cfg.latent_channels, num_frames=cfg.num_frames,
                                           latent_size=latent_size, hidden_dim=cfg.msm_hidden)
        model = cls(cfg, vae, ReferenceUNet2D.from_model_config(cfg), DenoisingUNet3D.from_model_config(cfg),
                    FaceLocator.from_model_config(cfg), FaceEncoder.from_model_config(cfg),
                    make_audio_encoder(cfg, seed=seed), msm, fps)
        if cfg.pretrained:  # every tensor from the released files, or one error naming those that do not fit
            from singer.models.pretrained import load_pretrained

            load_pretrained(model, cfg.pretrained)
        return model

    # -- parameters ------------------------------------------------------------------------------------------

    def unused_parameter_names(self) -> list[str]:
        """Parameters no forward uses (loaded from checkpoints, never trained): the reference UNet's tail and
        the denoising UNet's motion modules in blocks without attention (Hallo skips them)."""
        return ([f"reference_unet.{n}" for n in self.reference_unet.unused_parameter_names()]
                + [f"denoising_unet.{n}" for n in self.denoising_unet.unused_parameter_names()])

    def set_trainable(self, groups: list[str]) -> list[str]:
        """Freeze everything, then unfreeze the named groups ("all" = every module but the autoencoder).
        Returns the names of the trainable parameters."""
        unknown = [g for g in groups if g != "all" and g not in TRAINABLE_GROUPS]
        if unknown:
            raise ValueError(f"unknown trainable group(s) {unknown}; choose from all, {', '.join(TRAINABLE_GROUPS)}")
        patterns = [p for g in groups for p in (("",) if g == "all" else TRAINABLE_GROUPS[g])]
        unused = set(self.unused_parameter_names())
        names = []
        for name, p in self.named_parameters():
            on = (not name.startswith("vae.") and name not in unused
                  and any(pat == "" or _matches(name, pat) for pat in patterns))
            p.requires_grad_(on)
            if on:
                names.append(name)
        return names

    # -- conditioning ----------------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> latents (B, C, F, h, w)."""
        with torch.no_grad():
            return encode_video(self.vae, video)

    def reference_states(self, reference: torch.Tensor, motion: torch.Tensor,
                         face_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """reference (B, 3, H, W), motion (B, 3, M, H, W) pixels -> {attention layer name: (B, R*h*w, C)}."""
        images = torch.cat([reference.unsqueeze(2), motion], dim=2)  # (B, 3, R, H, W)
        r = images.shape[2]
        latents = rearrange(self.encode(images), "b c r h w -> (b r) c h w")
        tokens = repeat(face_tokens, "b n d -> (b r) n d", r=r)
        t = torch.zeros(latents.shape[0], device=latents.device, dtype=torch.long)
        return self.reference_unet(latents, t, face_tokens=tokens, references_per_sample=r)

    def conditions(self, batch: dict, audio_tokens: torch.Tensor | None = None,
                   drop_image: torch.Tensor | None = None, drop_audio: torch.Tensor | None = None) -> Conditions:
        """Conditions from a batch of B windows.

        batch: reference (B,3,H,W), motion (B,3,M,H,W) pixels; audio (B,S) 16 kHz (the whole clip) with
        audio_start_frame (B,) (the window's first frame in it; absent: 0); masks (B,3,H,W) soft full, face, lip;
        face_region (B,1,H,W) the hard face box; face_embedding (B,E). `audio_tokens` (B,F,Na,D) may be given
        precomputed (then audio is not read).
        drop_image, drop_audio (B,) bool: the samples that get the unconditional image / audio branch (module
        docstring).
        """
        emb = batch["face_embedding"].to(self.face_encoder.proj.weight.dtype)
        b = emb.shape[0]
        if drop_image is not None:
            emb = torch.where(drop_image.view(b, 1), torch.zeros_like(emb), emb)  # Hallo: imageproj(zeros)
        face_tokens = self.face_encoder(emb)
        if audio_tokens is None:
            audio_tokens = self.audio_encoder.window_tokens(batch["audio"], batch.get("audio_start_frame"),
                                                            num_frames=self.cfg.num_frames, fps=self.fps)
        if drop_audio is not None:
            audio_tokens = audio_tokens * (~drop_audio).view(b, 1, 1, 1).to(audio_tokens.dtype)
        masks = batch["masks"].float()
        face_features = self.face_locator(batch["face_region"].float())
        if drop_image is not None:
            face_features = face_features * (~drop_image).view(b, 1, 1, 1).to(face_features.dtype)
        return Conditions(
            face_tokens=face_tokens,
            audio_tokens=audio_tokens,
            reference_states=self.reference_states(batch["reference"], batch["motion"], face_tokens),
            masks={"full": masks[:, 0:1], "face": masks[:, 1:2], "lip": masks[:, 2:3]},
            face_features=face_features,
            reference_keep=None if drop_image is None or not bool(drop_image.any()) else ~drop_image,
        )

    def guidance_conditions(self, batch: dict, audio_tokens: torch.Tensor | None = None) -> Conditions:
        """The conditional and the unconditional branch of B windows as one batch of 2B (conditional first)."""
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
        b = batch["face_embedding"].shape[0]
        drop = torch.arange(2 * b, device=batch["face_embedding"].device) >= b
        tokens = None if audio_tokens is None else torch.cat([audio_tokens, audio_tokens])
        return self.conditions(doubled, audio_tokens=tokens, drop_image=drop, drop_audio=drop)

    # -- denoising -------------------------------------------------------------------------------------------

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The network's prediction (v) for z_t (B, C, F, h, w). MSM weighs the audio from this z_t."""
        audio = cond.audio_tokens
        if self.msm is not None:
            audio = self.msm(audio, z_t)
        return self.denoising_unet(z_t, t, face_tokens=cond.face_tokens, audio_tokens=audio,
                                   reference_states=cond.reference_states, masks=cond.masks,
                                   face_features=cond.face_features, reference_keep=cond.reference_keep,
                                   motion_scale=self.cfg.motion_scale)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """The training loss (so DistributedDataParallel sees a forward and synchronises gradients)."""
        return self.training_loss(batch, generator)

    def training_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """MSE between the predicted and true v for randomly noised windows, with CFG condition dropout."""
        x0 = self.encode(batch["frames"])
        b = x0.shape[0]
        device = x0.device
        motion = batch["motion"]
        if motion.shape[2] and self.cfg.motion_as_reference_prob > 0:
            # a song's first window has no previous frames: the reference stands in for them
            swap = torch.rand(b, generator=generator, device=device) < self.cfg.motion_as_reference_prob
            stand_in = batch["reference"].unsqueeze(2).expand_as(motion)
            motion = torch.where(swap.view(b, 1, 1, 1, 1), stand_in, motion)
        uncond = torch.rand(b, generator=generator, device=device) < self.cfg.uncond_dropout
        drop_audio = uncond | (torch.rand(b, generator=generator, device=device) < self.cfg.audio_dropout)
        drop_image = uncond | (torch.rand(b, generator=generator, device=device) < self.cfg.reference_dropout)
        cond = self.conditions({**batch, "motion": motion}, drop_image=drop_image, drop_audio=drop_audio)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        t = sample_timesteps(self.scheduler, b, generator=generator, device=device)
        z_t = self.scheduler.add_noise(x0, noise, t)
        target = training_target(self.scheduler, x0, noise, t)
        pred = self.denoise(z_t, t, cond)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        loss = (per_sample * min_snr_weights(self.scheduler, t, self.cfg.snr_gamma).to(per_sample.device)).mean()
        return loss, {"loss": loss.detach(), "t_mean": t.float().mean()}
