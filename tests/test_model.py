"""Model behaviour of the composite SINGER model at the tiny preset: identity of the spectral modules at
initialisation, gradients into them, learning, and MSM evaluated on every denoising step."""

import numpy as np
import pytest
import torch
from factories import tiny_batch

from singer.config import load_config
from singer.models.singer import SingerModel
from singer.pipeline import SingerPipeline


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def build(cfg, msm=True, sfm=True, seed=0):
    model_cfg = cfg.model.model_copy(update={"msm": msm, "sfm": sfm})
    return SingerModel.build(model_cfg, resolution=cfg.crop.resolution, seed=seed)


def test_msm_and_sfm_at_init_leave_the_output_unchanged(cfg):
    full = build(cfg).eval()
    plain = build(cfg, msm=False, sfm=False).eval()
    missing, unexpected = plain.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(("msm.", "denoising_unet.sfm.")) for k in unexpected)
    batch = tiny_batch(1)
    with torch.no_grad():
        cond_full = full.conditions(batch)
        cond_plain = plain.conditions(batch)
        z = torch.randn(1, cfg.model.latent_channels, cfg.model.num_frames, 16, 16)
        t = torch.tensor([500])
        assert torch.equal(full.denoise(z, t, cond_full), plain.denoise(z, t, cond_plain))


def perturb_zero_inits(model):
    """Fresh zero-initialised output layers block every gradient behind them; move them off zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0 and not name.endswith("band_raw"):
                p.normal_(0, 0.02)


def test_gradients_reach_msm_and_sfm_and_a_step_changes_them(cfg):
    model = build(cfg)
    model.set_trainable(["all"])
    perturb_zero_inits(model)
    loss, _ = model.training_loss(tiny_batch(2), generator=torch.Generator().manual_seed(0))
    loss.backward()
    spectral = {n: p for n, p in model.named_parameters() if n.startswith(("msm.", "denoising_unet.sfm."))}
    assert "msm.w" in spectral and any(n.startswith("denoising_unet.sfm.") for n in spectral)
    for name, p in spectral.items():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    before = {n: p.detach().clone() for n, p in spectral.items()}
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    for name, p in spectral.items():
        assert not torch.equal(before[name], p), name


def test_trainable_groups(cfg):
    model = build(cfg)
    names = model.set_trainable(["audio_encoder", "audio_projection", "msm", "sfm"])
    assert names and all(n.startswith(("audio_encoder.", "msm.", "denoising_unet.sfm.")) for n in names)
    assert not any(p.requires_grad for p in model.reference_unet.parameters())
    with pytest.raises(ValueError, match="unknown trainable group"):
        model.set_trainable(["everything"])


@pytest.mark.slow
def test_twenty_steps_lower_the_loss(cfg):
    torch.manual_seed(0)
    model = build(cfg)
    model.set_trainable(["all"])
    batch = tiny_batch(2)
    # learnable: the window shows the reference image (which the model sees through the reference UNet)
    batch["frames"] = batch["reference"].unsqueeze(2).expand_as(batch["frames"]).clone()

    def fixed_loss():  # same noise and timesteps every time: only the weights change
        with torch.no_grad():
            return float(model.training_loss(batch, generator=torch.Generator().manual_seed(123))[0])

    before = fixed_loss()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        loss, _ = model.training_loss(batch, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = fixed_loss()
    assert after < 0.92 * before, (before, after)  # measured: 0.873 -> 0.763


def test_a_folder_naming_moved_modules_still_loads(cfg, tmp_path):
    """model_index.json records each component's module at save time; SINGER's classes are found by name in
    `singer`, so folders saved before a class moved (e.g. the old `singer.models.unet`, since split into one
    module per model) still load."""
    import json

    model = build(cfg)
    SingerPipeline.from_model(model, cfg.crop.resolution).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    for name in ("reference_unet", "denoising_unet", "face_locator"):
        index[name][0] = "singer.models.unet"  # where these classes lived before
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    pipe = SingerPipeline.from_pretrained(tmp_path)
    for name in ("reference_unet", "denoising_unet", "face_locator"):
        mine, loaded = getattr(model, name).state_dict(), getattr(pipe, name).state_dict()
        assert type(getattr(pipe, name)) is type(getattr(model, name))
        assert mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)


def test_msm_runs_once_per_denoising_step(cfg):
    from skimage import data

    from singer.faces import prepare_reference

    model = build(cfg)
    pipe = SingerPipeline.from_model(model, cfg.crop.resolution)
    calls = []
    z_seen = []

    def count(module, args, output):  # returns None: the output is left alone
        calls.append(1)
        z_seen.append(args[1].clone())

    model.msm.register_forward_hook(count)
    reference = prepare_reference(data.astronaut(), cfg.crop.resolution)
    frames = 2 * cfg.model.num_frames  # two windows
    out = pipe(reference, np.zeros(16000 * frames // 25, np.float32), np.zeros(128, np.float32),
               num_inference_steps=3, num_frames=frames, progress=False)
    assert out.frames.shape == (frames, 64, 64, 3)
    assert len(calls) == 2 * 3  # windows x steps, conditional and unconditional in one batch
    assert not torch.equal(z_seen[0], z_seen[1])  # recomputed from the current z_t, not the first noise


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_sampler_with_an_oracle_denoiser_reproduces_the_target(cfg, monkeypatch, prediction):
    """If the network predicted the exact v (or x0) of a known video, the pipeline (noise, DDIM steps,
    guidance, windows, decoding) must return that video: this isolates sampling bugs from learning."""
    from skimage import data

    from singer.faces import prepare_reference

    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"prediction_type": prediction})})
    model = build(cfg)
    pipe = SingerPipeline.from_model(model, cfg.crop.resolution)
    reference = prepare_reference(data.astronaut(), cfg.crop.resolution)
    target = torch.from_numpy(reference["image"]).permute(2, 0, 1).float().div(127.5).sub(1)
    x0 = model.encode(target[None, :, None])  # (1, C, 1, h, w)
    alphas = model.scheduler.alphas_cumprod

    def oracle(self, z_t, t, cond):
        a = alphas[t.long()].view(-1, 1, 1, 1, 1).to(z_t.dtype)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        if prediction == "sample":
            return x0.expand_as(z_t)
        eps = (z_t - alpha * x0) / sigma
        return alpha * eps - sigma * x0

    monkeypatch.setattr(SingerModel, "denoise", oracle)
    frames = cfg.model.num_frames + 3  # a partial second window
    out = pipe(reference, np.zeros(16000 * frames // 25, np.float32), np.zeros(128, np.float32),
               num_inference_steps=10, num_frames=frames, progress=False)
    assert out.frames.shape[0] == frames
    err = np.abs(out.frames.astype(int) - reference["image"][None].astype(int))
    assert err.max() <= 1, err.max()


def test_variants_set_the_spectral_flags_and_refuse_contradictions():
    from singer.train.loop import variant_config

    for variant, flags in {"full": (True, True), "no_msm": (False, True), "no_sfm": (True, False),
                           "no_both": (False, False)}.items():
        model = variant_config(load_config(overrides=[f"train.variant={variant}"])).model
        assert (model.msm, model.sfm) == flags
    with pytest.raises(ValueError, match="use train.variant=no_sfm"):
        variant_config(load_config(overrides=["model.sfm=false"]))


def test_checkpoints_are_keyed_by_config_and_data(tmp_path, monkeypatch):
    from singer.train.loop import run_key

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/crops").mkdir(parents=True)
    (tmp_path / "data/split").mkdir(parents=True)
    (tmp_path / "data/crops/manifest.parquet").write_bytes(b"v1")
    (tmp_path / "data/split/train.txt").write_text("a\n")
    cfg = load_config()
    first = run_key(cfg)
    assert first == run_key(cfg) and first.startswith("full-")
    assert run_key(load_config(overrides=["train.lr=0.5"])) != first
    assert run_key(load_config(overrides=["train.keep_last=9"])) == first  # bookkeeping only
    (tmp_path / "data/split/train.txt").write_text("a\nb\n")
    assert run_key(cfg) != first  # new data never resumes an old run
