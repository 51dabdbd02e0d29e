"""`SingerPipeline`: a portrait and a song -> a video of that person singing it.

    pipe = SingerPipeline.from_pretrained("models/full")
    ref = prepare_reference(load_image("portrait.jpg"), pipe.resolution)     # crop + masks, as in training
    out = pipe(ref, audio_16k, num_inference_steps=25, guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
    out.frames        # (T, H, W, 3) uint8, T = round(seconds * fps)

Long audio is generated in windows of `num_frames`; each window's motion frames are the last `motion_frames`
generated frames of the previous one (the reference image for the first window). Every denoising step runs
one batched forward for the conditional and unconditional branches (classifier-free guidance), so MSM is
evaluated once per step, on that step's z_t: ``v = v_uncond + guidance * (v_cond - v_uncond)``. With
``guidance_scale == 1`` that is ``v_cond``, so only the conditional branch runs (the same result, half the work).

Speed (README "Benchmarks"): ``pipe.set_compute(cfg.compute)`` runs the networks under bf16 autocast where the
device has bf16 matrix units and/or compiles the denoising UNet (the sampler's arithmetic and the decoder stay
fp32); ``sampler="dpm_solver"`` (or ``model.sampler``) samples with DPM-Solver++, good in 5 steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from singer.compute import autocast, compile_module, resolve_dtype
from singer.config import ModelConfig
from singer.data.dataset import to_tensor_video, to_uint8_video
from singer.models.autoencoder import decode_video, vae_scale_factor
from singer.models.scheduler import make_sampler
from singer.models.singer import Conditions, SingerModel


@dataclass
class SingerPipelineOutput(BaseOutput):
    frames: np.ndarray          # (T, H, W, 3) uint8
    fps: float


class SingerPipeline(DiffusionPipeline):
    _optional_components = ["msm"]
    model_cpu_offload_seq = "audio_encoder->face_encoder->reference_unet->denoising_unet->vae"

    def __init__(self, vae, reference_unet, denoising_unet, face_locator, face_encoder, audio_encoder, msm,
                 scheduler, settings: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae, reference_unet=reference_unet, denoising_unet=denoising_unet,
                              face_locator=face_locator, face_encoder=face_encoder, audio_encoder=audio_encoder,
                              msm=msm, scheduler=scheduler)
        # everything generation needs besides weights: the model config, resolution and frame rate
        self.register_to_config(settings=settings or {})
        self.compute_dtype = torch.float32   # set_compute: how the networks run here (not saved with the model)

    def set_compute(self, compute) -> SingerPipeline:
        """Apply a `ComputeConfig` (params.yaml `compute:`): the autocast dtype on this pipeline's device, and
        torch.compile of the denoising UNet (in place: saving is unaffected). Returns self."""
        self.compute_dtype = resolve_dtype(compute.dtype, self.denoising_unet.device)
        compile_module(self.denoising_unet, enabled=bool(compute.compile))
        return self

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers looks each component's class up in the module that ``model_index.json`` recorded at save
        time (e.g. ``["singer.models.unet", "ReferenceUNet2D"]``). SINGER's classes are looked up by name in
        ``singer`` (its lazy map) instead, so folders saved before a class moved to another module still load."""
        import singer

        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        for name, value in init_dict.items():
            if isinstance(value, (list, tuple)) and len(value) == 2 and str(value[0]).split(".")[0] == "singer":
                found = getattr(singer, str(value[1]), None)
                if found is not None:
                    init_dict[name] = [found.__module__, value[1]]
        return init_dict, unused, hidden

    @classmethod
    def from_model(cls, model: SingerModel, resolution: int) -> SingerPipeline:
        settings = {"model": model.cfg.model_dump(mode="json"), "resolution": int(resolution), "fps": model.fps}
        return cls(model.vae, model.reference_unet, model.denoising_unet, model.face_locator, model.face_encoder,
                   model.audio_encoder, model.msm, model.scheduler, settings=settings)

    def to_model(self) -> SingerModel:
        """The same components as a `SingerModel` (shared, not copied)."""
        model = SingerModel(self.model_cfg, self.vae, self.reference_unet, self.denoising_unet, self.face_locator,
                            self.face_encoder, self.audio_encoder, self.msm, fps=self.fps)
        model.scheduler = self.scheduler
        return model

    @property
    def model_cfg(self) -> ModelConfig:
        return ModelConfig.model_validate(self.config.settings["model"])

    @property
    def resolution(self) -> int:
        return int(self.config.settings["resolution"])

    @property
    def fps(self) -> float:
        return float(self.config.settings.get("fps", 25.0))

    def __call__(self, reference: dict, audio: np.ndarray, face_embedding: np.ndarray,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, num_frames: int | None = None,
                 progress: bool = True, sampler: str | None = None) -> SingerPipelineOutput:
        """The whole video at once: ``windows`` (same arguments), its frames concatenated: (T, H, W, 3) uint8."""
        frames = list(self.windows(reference, audio, face_embedding, num_inference_steps, guidance_scale,
                                   generator, num_frames, progress, sampler))
        return SingerPipelineOutput(frames=np.concatenate(frames), fps=self.fps)

    def num_output_frames(self, audio_samples: int) -> int:
        """Frames of video for `audio_samples` of 16 kHz audio: round(seconds * fps), at least 1."""
        return max(1, int(round(audio_samples / 16000 * self.fps)))

    @torch.no_grad()
    def windows(self, reference: dict, audio: np.ndarray, face_embedding: np.ndarray,
                num_inference_steps: int | None = None, guidance_scale: float | None = None,
                generator: torch.Generator | None = None, num_frames: int | None = None,
                progress: bool = True, sampler: str | None = None,
                callback: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
        """Yield the video window by window, (F, H, W, 3) uint8 each (the last one cut to the video's end), so a
        caller can encode a long song as it goes instead of holding every frame.

        reference: `prepare_reference` output (image (H,W,3) uint8 at `resolution`, masks full/face/lip +
        face_region); audio: (S,) float 16 kHz mono; face_embedding: (E,) identity embedding of the reference.
        sampler: ddim | dpm_solver | unipc (None: the model's, ``model.sampler``). callback(done, total) runs
        after every denoising step, counted over all windows; an exception it raises stops generation."""
        cfg = self.model_cfg
        model = self.to_model()
        steps = cfg.inference_steps if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:  # 0 is not "the default" (it used to become it through `or`)
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        device = self.denoising_unet.device
        dtype = self.denoising_unet.dtype
        total = num_frames or self.num_output_frames(len(audio))
        f, m = cfg.num_frames, cfg.motion_frames
        n_windows = int(np.ceil(total / f))

        wave = torch.as_tensor(np.asarray(audio, np.float32), device=device)[None]
        # whole-song wav2vec2 pass (as Hallo; the encoder bounds its own memory on long songs), one hidden state
        # per output frame: (1, T, L, H). Each window takes its frames +- the audio window from it, clamped to
        # the song (the edge padding of `window_frames`; frames past the end repeat the last one), so the
        # windowed features, 2w+1 times the hidden states, are never held for the whole song.
        hidden = self.audio_encoder.hidden_states(wave, num_frames=total, fps=self.fps)
        w = int(self.audio_encoder.config.window)

        image = to_tensor_video(reference["image"][None])[:, 0][None].to(device, dtype)   # (1, 3, H, W)
        ref_masks = reference["masks"]
        masks = np.stack([ref_masks["full"], ref_masks["face"], ref_masks["lip"]]).astype(np.float32)
        region = np.asarray(ref_masks["face_region"], np.float32)[None]
        batch = {"reference": image, "masks": torch.as_tensor(masks, dtype=dtype, device=device)[None],
                 "face_region": torch.as_tensor(region, dtype=dtype, device=device)[None],
                 "face_embedding": torch.as_tensor(face_embedding, dtype=dtype, device=device)[None]}
        motion = image.unsqueeze(2).expand(-1, -1, m, -1, -1)    # first window: the reference stands in
        latent_h = self.resolution // vae_scale_factor(self.vae)
        shape = (1, self.denoising_unet.config.in_channels, f, latent_h, latent_h)

        scheduler = make_sampler(self.scheduler, sampler or cfg.sampler)
        amp = self.compute_dtype
        done, work = 0, n_windows * steps
        bar = tqdm(total=n_windows, desc="generate", unit="window", disable=not progress)
        try:
            for k in range(n_windows):
                rows = torch.arange(k * f, (k + 1) * f, device=hidden.device)
                idx = (rows[:, None] + torch.arange(-w, w + 1, device=hidden.device)).clamp_(0, total - 1)
                audio_tokens = self.audio_encoder.project(hidden[:, idx])  # (1, F, 2w+1, L, H) -> tokens
                window = {**batch, "motion": motion}
                z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
                # a multistep solver keeps the previous steps' predictions: a fresh start for every window
                scheduler.set_timesteps(steps, device=device)
                # one autocast region per window: the bf16 copies of the weights are made once, not every step;
                # the scheduler's elementwise arithmetic stays in z's dtype (autocast leaves it alone)
                with autocast(amp, device):
                    if guidance != 1:  # both branches in one batch, conditional first
                        cond = model.guidance_conditions(window, audio_tokens=audio_tokens)
                    else:
                        cond = model.conditions(window, audio_tokens=audio_tokens)
                    for t in scheduler.timesteps:
                        v = _guided(model, z, t.to(device), cond, guidance)
                        z = scheduler.step(v.to(z.dtype), t, z).prev_sample
                        done += 1
                        if callback is not None:
                            callback(done, work)
                video = decode_video(self.vae, z)                     # (1, 3, F, H, W) in [-1, 1]
                if m:
                    motion = video[:, :, -m:].to(dtype)
                bar.update(1)
                yield to_uint8_video(video[0].float())[: total - k * f]
        finally:
            bar.close()


def _guided(model: SingerModel, z: torch.Tensor, t: torch.Tensor, cond: Conditions, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, ``v_uncond + guidance * (v_cond - v_uncond)``: ``cond`` is
    ``SingerModel.guidance_conditions`` (conditional, then unconditional), or the conditional alone when
    ``guidance == 1`` (then ``v_cond``)."""
    if guidance == 1:
        return model.denoise(z, t.expand(z.shape[0]), cond)
    v = model.denoise(torch.cat([z, z]), t.expand(2 * z.shape[0]), cond).to(z.dtype)  # the guidance in z's dtype
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)
