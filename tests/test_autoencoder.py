"""Autoencoders (lossless pixel shuffle, AutoencoderKL from a local folder) and the DDIM / v-prediction / zero-SNR
noise scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from singer.config import load_config
from singer.models.autoencoder import (
    DeterministicLatent,
    PixelShuffleAutoencoder,
    decode_video,
    encode_video,
    load_autoencoder,
    vae_scale_factor,
)
from singer.models.scheduler import (
    add_noise,
    make_scheduler,
    sample_timesteps,
    training_target,
    velocity_target,
)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model config with Hallo's v-prediction (the tiny preset itself predicts x0; these tests check
    the scheduler settings every preset shares, and v-specific identities)."""
    return load_config("params.yaml", preset="tiny").model.model_copy(update={"prediction_type": "v_prediction"})


def _video(b=2, f=5, h=64, w=48, seed=0):
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------------------- pixel shuffle
def test_pixel_shuffle_exact_round_trip(tiny):
    vae = load_autoencoder(tiny)
    assert isinstance(vae, PixelShuffleAutoencoder)
    f = tiny.pixel_shuffle_factor
    assert vae.config.latent_channels == tiny.latent_channels == 3 * f * f
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor is None
    assert vae_scale_factor(vae) == f and list(vae.parameters()) == []
    x = _video()[:, :, 0]
    dist = vae.encode(x).latent_dist
    z = dist.sample()
    assert z.shape == (2, 3 * f * f, 64 // f, 48 // f)
    assert torch.equal(z, dist.mode()) and torch.equal(z, dist.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(vae.decode(z).sample, x)
    assert torch.equal(vae(x).sample, x)
    # channel layout: pixel (0, 0) of each f x f block is latent channel 0
    assert torch.equal(z[:, 0], x[:, 0, ::f, ::f])


def test_pixel_shuffle_video_helpers(tiny):
    vae = load_autoencoder(tiny)
    frames = _video()
    z = encode_video(vae, frames, chunk_size=3)
    f = tiny.pixel_shuffle_factor
    assert z.shape == (2, 3 * f * f, 5, 64 // f, 48 // f)
    assert torch.equal(decode_video(vae, z, chunk_size=4), frames)
    # frame t of the latent video is the encoding of frame t
    assert torch.equal(z[:, :, 3], vae.encode(frames[:, :, 3]).latent_dist.mode())


def test_pixel_shuffle_config_and_errors(tmp_path):
    vae = PixelShuffleAutoencoder(factor=4)
    assert vae.config.latent_channels == 48
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    assert vae.to(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="latent channels"):
        PixelShuffleAutoencoder(factor=2, latent_channels=4)
    with pytest.raises(ValueError, match="divisible"):
        PixelShuffleAutoencoder(factor=2).encode(torch.zeros(1, 3, 63, 64))
    with pytest.raises(ValueError, match="latents"):
        PixelShuffleAutoencoder(factor=2).decode(torch.zeros(1, 4, 8, 8))
    vae = PixelShuffleAutoencoder(factor=2)
    vae.save_pretrained(tmp_path / "vae")
    again = PixelShuffleAutoencoder.from_pretrained(tmp_path / "vae")
    assert again.config.factor == 2 and again.config.latent_channels == 12
    assert isinstance(again.encode(torch.zeros(1, 3, 4, 4)).latent_dist, DeterministicLatent)


def test_unknown_autoencoder(tiny):
    with pytest.raises(ValueError, match="unknown model.autoencoder"):
        load_autoencoder(tiny.model_copy(update={"autoencoder": "vqgan"}))


# ----------------------------------------------------------------------------------------- KL
def _tiny_kl(folder, latent_channels=4, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    vae.save_pretrained(folder)
    return vae


def test_kl_from_local_folder(tmp_path, tiny):
    _tiny_kl(tmp_path / "vae")
    cfg = tiny.model_copy(update={"autoencoder": "kl", "autoencoder_path": str(tmp_path / "vae"), "latent_channels": 4})
    vae = load_autoencoder(cfg)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert vae_scale_factor(vae) == 2
    frames = _video(b=1, f=3, h=32, w=32)
    with torch.no_grad():
        z = encode_video(vae, frames, chunk_size=2)
        assert z.shape == (1, 4, 3, 16, 16)
        mode = vae.encode(frames[:, :, 1]).latent_dist.mode()
        assert torch.allclose(z[:, :, 1], mode * 0.18215, atol=1e-6)
        assert torch.allclose(encode_video(vae, frames, chunk_size=16), z, atol=1e-6)
        sampled = encode_video(vae, frames, sample=True, generator=torch.Generator().manual_seed(0))
        assert sampled.shape == z.shape and not torch.equal(sampled, z)
        out = decode_video(vae, z, chunk_size=2)
        assert out.shape == frames.shape and out.abs().max() <= 1
        direct = vae.decode(mode).sample.clamp(-1, 1)
        assert torch.allclose(out[:, :, 1], direct, atol=1e-5)


def test_kl_errors(tmp_path, tiny):
    cfg = tiny.model_copy(update={"autoencoder": "kl", "autoencoder_path": str(tmp_path / "absent"), "latent_channels": 4})
    with pytest.raises(FileNotFoundError) as err:
        load_autoencoder(cfg)
    assert "absent" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not set"):
        load_autoencoder(cfg.model_copy(update={"autoencoder_path": None}))
    _tiny_kl(tmp_path / "vae")
    with pytest.raises(ValueError, match="latent channels"):
        load_autoencoder(cfg.model_copy(update={"autoencoder_path": str(tmp_path / "vae"), "latent_channels": 12}))


# ----------------------------------------------------------------------------------------- scheduler
def test_scheduler_settings(tiny):
    s = make_scheduler(tiny)
    c = s.config
    assert (c.prediction_type, c.timestep_spacing, c.rescale_betas_zero_snr, c.clip_sample) == (
        "v_prediction", "trailing", True, False)
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)  # Hallo trains with scaled_linear
    assert abs(float(s.alphas_cumprod[-1])) < 1e-12  # zero terminal SNR
    assert float(s.alphas_cumprod[0]) > 0.999
    assert torch.all(s.alphas_cumprod[1:] <= s.alphas_cumprod[:-1])
    s.set_timesteps(25)
    assert int(s.timesteps[0]) == 999  # trailing: sampling starts at the last, pure-noise timestep
    with pytest.raises(ValueError, match="zero terminal SNR"):
        make_scheduler(tiny.model_copy(update={"prediction_type": "epsilon"}))
    assert load_config("params.yaml", preset="paper").model.prediction_type == "v_prediction"  # Hallo's
    assert load_config("params.yaml", preset="tiny").model.prediction_type == "sample"
    # epsilon is allowed without zero terminal SNR: the betas as configured, not rescaled, so x_T is not pure noise
    eps = make_scheduler(tiny.model_copy(update={"prediction_type": "epsilon"}), zero_snr=False)
    e = eps.config
    assert (e.prediction_type, e.timestep_spacing, e.rescale_betas_zero_snr, e.clip_sample) == (
        "epsilon", "leading", False, False)
    assert (e.beta_start, e.beta_end, e.beta_schedule, e.num_train_timesteps) == (
        0.00085, 0.012, "scaled_linear", 1000)
    # computed here, not by diffusers: scaled_linear betas are linear in sqrt(beta)
    alpha_bar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    np.testing.assert_allclose(eps.alphas_cumprod.double().numpy(), alpha_bar, rtol=1e-5)
    assert float(eps.alphas_cumprod[-1]) > 1e-3


def test_one_ddim_step_from_pure_noise_with_the_exact_v_recovers_x0(tiny):
    s = make_scheduler(tiny)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 12, 4, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.full((2,), 999)
    x_t = add_noise(s, x0, noise, t)
    assert torch.equal(x_t, noise)  # alpha_bar = 0: pure noise
    v = velocity_target(s, x0, noise, t)
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [999]
    out = s.step(v, 999, x_t).prev_sample
    assert torch.allclose(out, x0, atol=1e-6)


def test_ddim_steps_with_the_exact_v_stay_on_the_trajectory(tiny):
    s = make_scheduler(tiny)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 12, 2, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    s.set_timesteps(10)
    x = add_noise(s, x0, noise, s.timesteps[:1])
    for t in s.timesteps:
        v = velocity_target(s, x0, noise, t.reshape(1))
        x = s.step(v, t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-4)


def test_helpers_match_diffusers(tiny):
    s = make_scheduler(tiny)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 5, 6, 7, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = sample_timesteps(s, 3, generator=gen)
    assert t.shape == (3,) and t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    assert torch.allclose(add_noise(s, x0, noise, t), s.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(velocity_target(s, x0, noise, t), s.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(training_target(s, x0, noise, t), velocity_target(s, x0, noise, t))
    eps = make_scheduler(tiny.model_copy(update={"prediction_type": "epsilon"}), zero_snr=False)
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    sample = make_scheduler(tiny.model_copy(update={"prediction_type": "sample"}))
    assert torch.equal(training_target(sample, x0, noise, t), x0)


def test_min_snr_weights_follow_hallo_and_agree_across_parameterisations(tiny):
    from singer.models.scheduler import min_snr_weights

    s = make_scheduler(tiny)
    t = torch.tensor([0, 100, 500, 999])
    assert torch.equal(min_snr_weights(s, t, None), torch.ones(4))
    w = min_snr_weights(s, t, 5.0)
    ac = s.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    assert torch.allclose(w.double(), torch.minimum(snr + 1, torch.tensor(5.0)) / (snr + 1), atol=1e-6)
    assert float(w[-1]) == 1.0  # zero terminal SNR: x0 must come from the conditions, full weight
    assert float(w[0]) < 0.01  # nearly clean input: v is almost pure noise, little weight
    # the v error is the x0 error / sqrt(1 - a_t): the weighted v loss equals x0 prediction's weighted loss
    sample = make_scheduler(tiny.model_copy(update={"prediction_type": "sample"}))
    w_x0 = min_snr_weights(sample, t, 5.0)
    assert torch.allclose(w.double() / (1 - ac), w_x0.double(), rtol=1e-4)
