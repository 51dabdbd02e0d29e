"""How the networks compute (`compute.dtype`, `compute.compile`) and how generation samples (`model.sampler`):
the dtype each setting resolves to, the few-step samplers on the trained noise schedule (an oracle denoiser
must be recovered exactly), bf16 generation close to fp32 but not equal to it, fp32 unchanged, and the compiled
UNet equal to the eager one."""

import numpy as np
import pytest
import torch
from factories import tiny_batch, tone

from singer import compute
from singer.config import ComputeConfig, load_config
from singer.models.scheduler import SAMPLERS, make_sampler, make_scheduler
from singer.models.singer import SingerModel
from singer.pipeline import SingerPipeline


@pytest.fixture(scope="module")
def cfg():
    return load_config()


# -- the dtype a setting resolves to ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, setting, expected", [
    ((), "auto", torch.float32),                  # no bf16 matrix units: fp32, never emulated bf16
    (("amx_bf16",), "auto", torch.bfloat16),
    (("avx512_bf16",), "auto", torch.bfloat16),
    (("amx_bf16",), "fp32", torch.float32),       # the exact path, whatever the CPU
    ((), "bf16", torch.bfloat16),                 # asked for: honoured (with a warning)
    (("amx_bf16",), "fp16", torch.float32),       # fp16 autocast is for GPUs
])
def test_compute_dtype_resolves_by_what_the_cpu_has(monkeypatch, flags, setting, expected):
    monkeypatch.delenv("SINGER_COMPUTE_DTYPE", raising=False)
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: flags)
    assert compute.resolve_dtype(setting, "cpu") == expected


def test_auto_trains_in_fp32_on_a_cpu_where_bf16_did_not_pay(monkeypatch):
    monkeypatch.delenv("SINGER_COMPUTE_DTYPE", raising=False)
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert compute.resolve_dtype("auto", "cpu", training=True) == torch.float32
    assert compute.resolve_dtype("bf16", "cpu", training=True) == torch.bfloat16   # asked for: honoured
    assert compute.resolve_dtype("auto", "cpu", training=False) == torch.bfloat16


def test_compute_dtype_env_override_and_bad_values(monkeypatch):
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setenv("SINGER_COMPUTE_DTYPE", "fp32")
    assert compute.resolve_dtype("auto") == torch.float32
    monkeypatch.setenv("SINGER_COMPUTE_DTYPE", "int8")
    with pytest.raises(ValueError, match="compute.dtype must be one of"):
        compute.resolve_dtype("auto")
    assert compute.accelerate_mixed_precision(torch.bfloat16) == "bf16"
    assert compute.accelerate_mixed_precision(torch.float32) == "no"


def test_the_old_mixed_precision_setting_says_where_it_went():
    with pytest.raises(ValueError, match="train.mixed_precision moved to compute.dtype"):
        load_config(overrides=["train.mixed_precision=bf16"])
    with pytest.raises(ValueError, match="sampler"):
        load_config(overrides=["model.sampler=euler"])
    cfg = load_config(overrides=["compute.dtype=fp32", "compute.compile=true"])
    assert (cfg.compute.dtype, cfg.compute.compile) == ("fp32", True)


# -- samplers on the trained schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_recovers_an_oracles_x0_in_five_steps(cfg, name, prediction):
    """A denoiser that knows x0 predicts it (or the v it implies at z_t) exactly: every sampler must end on x0,
    from pure noise, in 5 steps, on the zero-terminal-SNR schedule the model trains with."""
    ddim = make_scheduler(cfg.model.model_copy(update={"prediction_type": prediction}))
    sampler = make_sampler(ddim, name)
    assert sampler.config.prediction_type == prediction and sampler.init_noise_sigma == 1.0
    # the same betas: alphas_cumprod agree except at t = T, which zero SNR pins to 0 (multistep solvers: 2**-24)
    torch.testing.assert_close(sampler.alphas_cumprod[:-1], ddim.alphas_cumprod[:-1])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 8, 8, generator=g)
    z = torch.randn(x0.shape, generator=g)
    sampler.set_timesteps(5)
    assert int(sampler.timesteps[0]) == ddim.config.num_train_timesteps - 1  # trailing: starts from pure noise
    alphas = sampler.alphas_cumprod
    for t in sampler.timesteps:
        a = alphas[int(t)]
        if prediction == "sample":
            out = x0
        else:
            eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
            out = a.sqrt() * eps - (1 - a).sqrt() * x0
        z = sampler.step(out, t, z).prev_sample
    torch.testing.assert_close(z, x0, atol=2e-4, rtol=1e-4)


def test_unknown_sampler_is_refused(cfg):
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler(make_scheduler(cfg.model), "euler")


# -- generation under each setting ----------------------------------------------------------------------------------

def _generate(pipe, cfg, steps=3, sampler=None):
    from skimage import data

    from singer.faces import prepare_reference

    reference = prepare_reference(data.astronaut(), cfg.crop.resolution)
    face = np.random.default_rng(0).normal(0, 0.5, cfg.model.face_embed_dim).astype(np.float32)
    out = pipe(reference, tone(0.4), face, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               num_frames=cfg.model.num_frames, progress=False, sampler=sampler)
    return out.frames.astype(np.float64)


@pytest.fixture(scope="module")
def pipe(cfg):
    return SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution).eval(), cfg.crop.resolution)


def test_bf16_generation_is_close_to_fp32_and_fp32_is_the_exact_path(cfg, pipe, monkeypatch):
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.delenv("SINGER_COMPUTE_DTYPE", raising=False)
    exact = _generate(pipe, cfg)                                  # never configured: fp32
    assert np.array_equal(_generate(pipe.set_compute(ComputeConfig(dtype="fp32")), cfg), exact)
    fast = _generate(pipe.set_compute(ComputeConfig(dtype="auto")), cfg)
    assert pipe.compute_dtype == torch.bfloat16
    diff = np.abs(fast - exact)
    # bf16 really ran (the video differs) and stays close: mean under 2 of 255 (measured 0.7 on the tiny model)
    assert 0 < diff.mean() < 2.0, diff.mean()
    pipe.set_compute(ComputeConfig(dtype="fp32"))


def test_samplers_generate_different_but_close_videos(cfg, pipe):
    ddim = _generate(pipe, cfg, steps=3, sampler="ddim")
    own = _generate(pipe, cfg, steps=3, sampler=cfg.model.sampler)
    assert np.array_equal(own, _generate(pipe, cfg, steps=3))     # no sampler given: the model's (model.sampler)
    for name in ("dpm_solver", "unipc"):
        other = _generate(pipe, cfg, steps=3, sampler=name)
        assert np.array_equal(other, _generate(pipe, cfg, steps=3, sampler=name)), name   # deterministic
        assert 0 < np.abs(other - ddim).mean() < 40, name


@pytest.mark.slow
def test_compiled_unet_equals_the_eager_one(cfg):
    """torch.compile (inductor) of a narrow denoising UNet: same parameter names, same output within float
    tolerance (inductor reorders reductions), forward and backward."""
    small = cfg.model.model_copy(update={"block_out_channels": [16, 32], "norm_num_groups": 4, "num_frames": 4})
    model = SingerModel.build(small, cfg.crop.resolution).eval()
    batch = tiny_batch(1, frames=4)
    with torch.no_grad():
        cond = model.conditions(batch)
    z = torch.randn(1, small.latent_channels, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.full((1,), 400)
    names = [n for n, _ in model.denoising_unet.named_parameters()]
    eager = model.denoise(z, t, cond)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.denoising_unet.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compute.compile_module(model.denoising_unet)
    assert [n for n, _ in model.denoising_unet.named_parameters()] == names
    compiled = model.denoise(z, t, cond)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.denoising_unet.named_parameters())[n].grad, g, atol=1e-4, rtol=1e-3)
