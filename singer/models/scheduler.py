"""The noise scheduler: DDIM with v-prediction and zero terminal SNR, Hallo's settings.

    scheduler = make_scheduler(cfg.model)                 # diffusers.DDIMScheduler, used for training and sampling
    t = sample_timesteps(scheduler, batch, generator=g)   # (B,) long, uniform over [0, num_train_timesteps)
    x_t = add_noise(scheduler, x0, noise, t)              # any (B, ...) shape, e.g. (B, C, F, h, w)
    target = training_target(scheduler, x0, noise, t)     # v (v_prediction), noise (epsilon) or x0 (sample)

Settings (Hallo's ``noise_scheduler_kwargs``, ``configs/train/stage2.yaml:46-52``, plus the overrides of
``scripts/train_stage2.py:215-223``): betas from ``model.beta_start / beta_end / beta_schedule`` (0.00085, 0.012,
"scaled_linear": Hallo's *training* scheduler, ``train_stage2.py:222-223``), ``clip_sample=False``,
``steps_offset=1``, ``set_alpha_to_one=True``, ``rescale_betas_zero_snr=True``, ``timestep_spacing="trailing"``,
``prediction_type=model.prediction_type`` ("v_prediction"). One scheduler serves training and sampling. Hallo's
inference (``scripts/inference.py:192-193``, and its validation, ``train_stage2.py:221``) builds its DDIM
scheduler *before* the ``scaled_linear`` override, so it samples with "linear" betas, a schedule its weights
were not trained on; we sample with the trained one (``alphas_cumprod`` differ between the two at every
t but 0 and T, where zero-SNR pins both).

With zero terminal SNR, ``alphas_cumprod[-1] == 0``: ``x_T`` is pure noise and an epsilon-predicting model cannot
recover ``x0`` from it (DDIM divides by ``sqrt(alphas_cumprod)``), so ``make_scheduler`` refuses
``prediction_type="epsilon"`` unless ``zero_snr=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

__all__ = ["SAMPLERS", "add_noise", "make_sampler", "make_scheduler", "min_snr_weights", "sample_timesteps",
           "training_target", "velocity_target"]

SAMPLERS = ("ddim", "dpm_solver", "unipc")


def make_scheduler(model_cfg: Any, zero_snr: bool = True) -> DDIMScheduler:
    prediction = str(model_cfg.prediction_type)
    if prediction not in ("v_prediction", "epsilon", "sample"):
        raise ValueError(f"unknown model.prediction_type {prediction!r} (v_prediction | epsilon | sample)")
    if zero_snr and prediction == "epsilon":
        raise ValueError("zero terminal SNR needs model.prediction_type v_prediction (or sample), not epsilon")
    return DDIMScheduler(
        num_train_timesteps=int(model_cfg.num_train_timesteps),
        beta_start=float(model_cfg.beta_start),
        beta_end=float(model_cfg.beta_end),
        beta_schedule=str(model_cfg.beta_schedule),
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type=prediction,
        rescale_betas_zero_snr=bool(zero_snr),
        timestep_spacing="trailing" if zero_snr else "leading",
    )


def make_sampler(scheduler: DDIMScheduler, name: str = "ddim"):
    """The scheduler generation steps with, on `scheduler`'s noise schedule (betas, zero terminal SNR,
    prediction type, trailing timesteps: the schedule the model was trained on).

    ddim: `scheduler` itself (Hallo's sampler). dpm_solver: diffusers' ``DPMSolverMultistepScheduler``
    (DPM-Solver++, 2nd order, a first-order last step), which reaches in 5 steps what DDIM needs 10-25 for;
    unipc: ``UniPCMultistepScheduler`` (predictor-corrector, same order). With zero terminal SNR both clip
    ``alphas_cumprod[-1]`` to 2**-24 (diffusers' rule): their log-SNR is finite at t = T. The first step's
    input is pure noise of unit variance for all three (``init_noise_sigma`` is 1)."""
    if name == "ddim":
        return scheduler
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    c = scheduler.config
    common = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                  beta_schedule=c.beta_schedule, prediction_type=c.prediction_type,
                  rescale_betas_zero_snr=c.rescale_betas_zero_snr, timestep_spacing=c.timestep_spacing,
                  steps_offset=c.steps_offset, solver_order=2, final_sigmas_type="zero")
    if name == "dpm_solver":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    if name == "unipc":
        return UniPCMultistepScheduler(**common)
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _alphas(scheduler: DDIMScheduler, x0: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ac = scheduler.alphas_cumprod.to(device=x0.device)[timesteps.to(x0.device).long()]
    sqrt_a = _expand(ac.sqrt(), x0).to(x0.dtype)
    sqrt_1ma = _expand((1 - ac).sqrt(), x0).to(x0.dtype)
    return sqrt_a, sqrt_1ma


def add_noise(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` for (B, ...) tensors and (B,) timesteps."""
    sqrt_a, sqrt_1ma = _alphas(scheduler, x0, timesteps)
    return sqrt_a * x0 + sqrt_1ma * noise


def velocity_target(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """``v = sqrt(a_t) noise - sqrt(1 - a_t) x0`` (what ``scheduler.get_velocity`` computes)."""
    sqrt_a, sqrt_1ma = _alphas(scheduler, x0, timesteps)
    return sqrt_a * noise - sqrt_1ma * x0


def training_target(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return velocity_target(scheduler, x0, noise, timesteps)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}")


def sample_timesteps(scheduler: DDIMScheduler, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(batch,) training timesteps, uniform over [0, num_train_timesteps)."""
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (batch,), generator=generator)
    return t.to(device) if device is not None else t


def min_snr_weights(scheduler: DDIMScheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023; Hallo trains with ``snr_gamma: 5.0``).

    SNR(t) = a_t / (1 - a_t). For a v-prediction model the weight is min(SNR + 1, gamma) / (SNR + 1): 1 at
    the zero-SNR end (where the model must draw x0 from the conditions alone) and small for nearly clean
    inputs, where v is almost pure, unpredictable noise whose loss dominates the gradient without
    improving samples. Since the v error is the x0 error / sqrt(1 - a_t), this is the x0 loss weighted by
    min(SNR + 1, gamma), which is what `sample` prediction gets; epsilon: min(SNR, gamma) / SNR.
    gamma None: all ones.
    """
    if gamma is None:
        return torch.ones(timesteps.shape[0])
    ac = scheduler.alphas_cumprod[timesteps.cpu().long()].double()
    snr = ac / (1 - ac).clamp_min(1e-20)
    kind = scheduler.config.prediction_type
    if kind != "epsilon":  # v and x0 both see t = T, where SNR = 0 with zero terminal SNR
        snr = snr + 1
    capped = snr.clamp(max=float(gamma))
    weights = capped if kind == "sample" else capped / snr.clamp_min(1e-20)
    return weights.float().to(timesteps.device)
