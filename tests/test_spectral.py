"""MSM (paper 3.1-3.2) and SFM (paper 3.3): shapes, exact identity at init, gradients, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from torch import nn

from singer.models.msm import MultiScaleSpectralModule
from singer.models.sfm import SelfAdaptiveFilterModule

SMALL_MSM = {"latent_channels": 4, "num_frames": 4, "latent_size": 8, "hidden_dim": 8, "chunks": 4}


def _public_config(module) -> dict:
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


def _perturb_last_layer(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.fc[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _audio(b=2, f=4, n=32, c=16, seed=1):
    return torch.randn(b, f, n, c, generator=torch.Generator().manual_seed(seed))


def _latent(b=2, c=4, f=4, h=8, w=8, seed=2):
    return torch.randn(b, c, f, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- MSM


@pytest.mark.parametrize(
    "cfg,audio_shape,latent_shape",
    [
        (SMALL_MSM, (2, 4, 32, 16), (2, 4, 4, 8, 8)),  # the parameter's own size
        (SMALL_MSM, (3, 5, 32, 16), (3, 4, 5, 8, 8)),  # odd F, batch 3, resized w along frames
        (SMALL_MSM, (1, 4, 7, 15), (1, 4, 4, 12, 20)),  # odd C, other resolution (non-square)
        (SMALL_MSM, (2, 1, 32, 9), (2, 4, 1, 3, 3)),  # one frame; width smaller than chunks
        ({}, (1, 16, 32, 768), (1, 4, 16, 64, 64)),  # defaults, paper-like shapes
    ],
)
def test_msm_shapes_and_identity_at_init(cfg, audio_shape, latent_shape):
    msm = MultiScaleSpectralModule(**cfg)
    audio, z = torch.randn(*audio_shape), torch.randn(*latent_shape)
    out = msm(audio, z)
    assert out.shape == audio.shape and out.dtype == audio.dtype
    # Exact: the weights are 2 * sigmoid(0) = 1 and the residual form adds exact zeros.
    assert torch.equal(out, audio)
    assert torch.equal(msm.band_weights(z), torch.ones(audio_shape[0], 4))


def test_msm_is_identity_in_bf16():
    msm = MultiScaleSpectralModule(**SMALL_MSM).to(torch.bfloat16)
    audio, z = _audio().bfloat16(), _latent().bfloat16()
    out = msm(audio, z)
    assert out.dtype == torch.bfloat16 and torch.equal(out, audio)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _np_silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _np_mlp(fc: nn.Sequential, x: np.ndarray) -> np.ndarray:
    """Linear -> SiLU -> Linear in numpy, from the module's weights."""
    hidden = _np_silu(x @ _np(fc[0].weight).T + _np(fc[0].bias))
    return hidden @ _np(fc[2].weight).T + _np(fc[2].bias)


def _pywt_scaled(x: np.ndarray, weights, axes, size) -> np.ndarray:
    """IDWT(weights[k] * band_k) with pywt: bands (cA, cH, cV, cD) = (LL, LH, HL, HH), cropped to ``size``."""
    ca, (ch, cv, cd) = pywt.dwt2(x, "haar", axes=axes)
    w = [np.asarray(weight) for weight in weights]
    out = pywt.idwt2((w[0] * ca, (w[1] * ch, w[2] * cv, w[3] * cd)), "haar", axes=axes)
    index = [slice(None)] * out.ndim
    for axis, n in zip(axes, size):
        index[axis] = slice(0, n)
    return out[tuple(index)]


def test_msm_equals_the_papers_formula_computed_with_pywt():
    """forward == IDWT(weights * DWT(audio)) over (frames, embedding), the paper's formula, with the DWT from
    pywt and the weights 2 * sigmoid(FC(chunk means of w * z_t)) computed in numpy (odd F and C)."""
    msm = MultiScaleSpectralModule(**SMALL_MSM).double()
    _perturb_last_layer(msm)
    with torch.no_grad():
        msm.w.copy_(1 + 0.5 * torch.randn(msm.w.shape, generator=torch.Generator().manual_seed(3)))
    audio, z = _audio(b=3, f=5, c=11).double(), _latent(b=3, f=5).double()
    # the weights, in numpy: w resized to z's frames (5 instead of 4) with linear interpolation
    # (align_corners=False) along frames only, as trilinear does when H and W already match
    w = _np(msm.w)  # (C, F0, H, W)
    f0, f1 = w.shape[1], z.shape[2]
    src = np.clip((np.arange(f1) + 0.5) * f0 / f1 - 0.5, 0, f0 - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, f0 - 1)
    frac = (src - lo)[None, :, None, None]
    w_resized = w[:, lo] * (1 - frac) + w[:, hi] * frac
    w_z = w_resized[None] * _np(z)  # (B, C, F, H, W)
    chunks = np.split(w_z, SMALL_MSM["chunks"], axis=-1)
    pooled = np.stack([chunk.mean(axis=(1, 2, 3, 4)) for chunk in chunks], axis=1)  # (B, 4)
    weights = 2 * _np_sigmoid(_np_mlp(msm.fc, pooled))  # (B, 4): LL, LH, HL, HH
    assert not np.allclose(weights, 1) and np.all((weights > 0) & (weights < 2))
    np.testing.assert_allclose(_np(msm.band_weights(z)), weights, rtol=1e-12)
    x = _np(audio)  # (B, F, N, C): per token, a map over (F, C)
    expected = np.stack([_pywt_scaled(x[b], weights[b], axes=(0, 2), size=(5, 11)) for b in range(3)])
    np.testing.assert_allclose(_np(msm(audio, z)), expected, rtol=0, atol=1e-12)


def test_msm_weights_depend_on_each_sample():
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    _perturb_last_layer(msm)
    z = _latent(b=3)
    weights = msm.band_weights(z)
    assert weights.shape == (3, 4)
    torch.testing.assert_close(msm.band_weights(z[1:2]), weights[1:2])
    assert not torch.allclose(weights[0], weights[1])


def test_msm_w_is_a_trainable_parameter_not_a_buffer():
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    assert msm.w.shape == (4, 4, 8, 8)
    assert msm.w.requires_grad
    assert any(p is msm.w for p in msm.parameters())
    assert list(msm.buffers()) == []
    assert "w" in dict(msm.named_parameters())


def test_msm_resizes_w_trilinearly():
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    with torch.no_grad():
        msm.w.copy_(torch.randn(msm.w.shape))
    assert msm.resized_w(4, 8, 8) is msm.w
    resized = msm.resized_w(6, 16, 12)
    want = nn.functional.interpolate(msm.w[None], size=(6, 16, 12), mode="trilinear", align_corners=False)[0]
    assert resized.shape == (4, 6, 16, 12)
    torch.testing.assert_close(resized, want)


def test_msm_pooling_is_chunk_mean_of_w_times_z():
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    with torch.no_grad():
        msm.w.copy_(torch.rand(msm.w.shape))
    z = _latent(b=2)
    captured = {}
    msm.fc.register_forward_hook(lambda mod, args, out: captured.setdefault("pooled", args[0]))
    msm.band_logits(z)
    w_z = msm.w * z
    want = torch.stack([chunk.mean(dim=(1, 2, 3, 4)) for chunk in w_z.chunk(4, dim=-1)], dim=1)
    torch.testing.assert_close(captured["pooled"], want)


def test_msm_gradients_and_adam_step():
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    audio, z = _audio(), _latent()
    # At init only the zero-initialised last layer gets a gradient (the upstream path is multiplied by it).
    msm(audio, z).pow(2).sum().backward()
    assert msm.fc[-1].weight.grad.abs().sum() > 0 and msm.fc[-1].bias.grad.abs().sum() > 0
    msm.zero_grad()

    _perturb_last_layer(msm)
    before = {n: p.detach().clone() for n, p in msm.named_parameters()}
    opt = torch.optim.Adam(msm.parameters(), lr=1e-2)
    target = torch.randn_like(audio)
    (msm(audio, z) - target).pow(2).mean().backward()
    for name, p in msm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in msm.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_msm_rejects_bad_inputs():
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    with pytest.raises(ValueError):
        msm(_audio(b=2), _latent(b=3))
    with pytest.raises(ValueError):
        msm(_audio(), _latent(c=3))
    with pytest.raises(ValueError):
        msm(_audio()[0], _latent())
    with pytest.raises(ValueError):
        MultiScaleSpectralModule(chunks=0)


@pytest.mark.parametrize(
    "flag,value",
    [("latent_channels", 3), ("num_frames", 7), ("latent_size", 5), ("hidden_dim", 1), ("chunks", 3)],
)
def test_msm_config_flags(flag, value):
    cfg = {**SMALL_MSM, flag: value}
    msm = MultiScaleSpectralModule(**cfg)
    assert msm.config[flag] == value
    assert msm.w.shape == (cfg["latent_channels"], cfg["num_frames"], cfg["latent_size"], cfg["latent_size"])
    assert msm.fc[0].in_features == cfg["chunks"] and msm.fc[0].out_features == cfg["hidden_dim"]
    assert msm.fc[-1].out_features == 4
    _perturb_last_layer(msm)
    audio, z = _audio(b=2, f=3, c=10), _latent(b=2, c=cfg["latent_channels"], f=3, h=6, w=10)
    out = msm(audio, z)
    assert out.shape == audio.shape and torch.isfinite(out).all()
    assert not torch.equal(out, audio)


def test_msm_save_load_roundtrip(tmp_path):
    msm = MultiScaleSpectralModule(**SMALL_MSM)
    _perturb_last_layer(msm)
    with torch.no_grad():
        msm.w.add_(torch.randn(msm.w.shape))
    msm.save_pretrained(tmp_path / "msm", safe_serialization=True)
    assert (tmp_path / "msm" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MultiScaleSpectralModule.from_pretrained(tmp_path / "msm")
    assert _public_config(loaded) == _public_config(msm)
    audio, z = _audio(b=3, f=5), _latent(b=3, f=5, h=10, w=12)
    assert torch.equal(loaded(audio, z), msm(audio, z))
    assert loaded.w.requires_grad


# ----------------------------------------------------------------------------------------------- SFM


@pytest.mark.parametrize(
    "shape",
    [(2, 16, 8, 8), (3, 16, 7, 9), (2, 16, 5, 8, 8), (1, 16, 3, 5, 6), (4, 16, 1, 1)],
)
def test_sfm_shapes_and_identity_at_init(shape):
    sfm = SelfAdaptiveFilterModule(channels=16)
    h = torch.randn(*shape)
    out = sfm(h)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert torch.equal(out, h)
    assert torch.equal(sfm.gate(h), torch.ones(shape[0], 16))
    assert torch.equal(sfm.band_weights, torch.ones(4, 16))


def test_sfm_is_identity_in_bf16():
    sfm = SelfAdaptiveFilterModule(channels=8).to(torch.bfloat16)
    h = torch.randn(2, 8, 3, 6, 5).bfloat16()
    assert torch.equal(sfm(h), h)


def _perturb_sfm(sfm: SelfAdaptiveFilterModule, seed: int = 0) -> None:
    _perturb_last_layer(sfm, seed)
    with torch.no_grad():
        sfm.band_raw.copy_(
            0.5 * torch.randn(sfm.band_raw.shape, generator=torch.Generator().manual_seed(seed))
        )


@pytest.mark.parametrize("shape", [(2, 8, 6, 7), (2, 8, 3, 5, 4)])
def test_sfm_equals_the_papers_formula_computed_with_pywt(shape):
    """forward == IDWT((1 + raw) * DWT(H)) * 2 * sigmoid(FC(mean(H))) over space, with the DWT from pywt and
    the band weights and gate computed in numpy (odd sizes; 4-D and 5-D layouts)."""
    sfm = SelfAdaptiveFilterModule(channels=8, reduction=2).double()
    _perturb_sfm(sfm)
    h = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = _np(h)
    raw = _np(sfm.band_raw)  # (4, C): rows LL, LH, HL, HH
    units = (1,) * (x.ndim - 2)
    band_weights = [(1 + raw[k]).reshape(1, -1, *units) for k in range(4)]  # per band and channel
    filtered = _pywt_scaled(x, band_weights, axes=(-2, -1), size=x.shape[-2:])
    pooled = x.mean(axis=tuple(range(2, x.ndim)))  # (B, C): over space (and frames)
    gate = 2 * _np_sigmoid(_np_mlp(sfm.fc, pooled)).reshape(*pooled.shape, *units)
    assert not np.allclose(gate, 1)
    np.testing.assert_allclose(_np(sfm(h)), filtered * gate, rtol=0, atol=1e-12)


def test_sfm_folded_frames_get_their_own_gate():
    sfm = SelfAdaptiveFilterModule(channels=8)
    _perturb_sfm(sfm)
    h = torch.randn(2, 8, 3, 4, 4)
    folded = h.permute(0, 2, 1, 3, 4).reshape(6, 8, 4, 4)  # (B*F, C, h, w)
    assert sfm.gate(folded).shape == (6, 8)
    assert sfm.gate(h).shape == (2, 8)
    # The filter part is per frame either way: with the gate at 1 both layouts agree.
    with torch.no_grad():
        sfm.fc[-1].weight.zero_()
        sfm.fc[-1].bias.zero_()
    unfolded = sfm(folded).reshape(2, 3, 8, 4, 4).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(unfolded, sfm(h))


def test_sfm_gradients_and_adam_step():
    sfm = SelfAdaptiveFilterModule(channels=16)
    h = torch.randn(2, 16, 6, 6)
    sfm(h).pow(2).sum().backward()
    # At init: the band weights and the last FC layer get gradients; the first FC layer sits behind zeros.
    assert sfm.band_raw.grad.abs().sum() > 0
    assert sfm.fc[-1].weight.grad.abs().sum() > 0
    sfm.zero_grad()

    _perturb_last_layer(sfm)
    before = {n: p.detach().clone() for n, p in sfm.named_parameters()}
    opt = torch.optim.Adam(sfm.parameters(), lr=1e-2)
    (sfm(h) - torch.randn_like(h)).pow(2).mean().backward()
    for name, p in sfm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in sfm.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_sfm_parameters_and_no_buffers():
    sfm = SelfAdaptiveFilterModule(channels=16, reduction=4)
    assert sfm.band_raw.shape == (4, 16) and sfm.band_raw.requires_grad
    assert list(sfm.buffers()) == []
    assert sfm.fc[0].out_features == 4


def test_sfm_rejects_bad_inputs():
    sfm = SelfAdaptiveFilterModule(channels=8)
    with pytest.raises(ValueError):
        sfm(torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError):
        sfm(torch.randn(8, 6, 6))


@pytest.mark.parametrize("flag,value", [("channels", 5), ("reduction", 1), ("reduction", 16)])
def test_sfm_config_flags(flag, value):
    cfg = {"channels": 8, "reduction": 4, flag: value}
    sfm = SelfAdaptiveFilterModule(**cfg)
    assert sfm.config[flag] == value
    assert sfm.fc[0].out_features == max(1, cfg["channels"] // cfg["reduction"])
    _perturb_sfm(sfm)
    h = torch.randn(2, cfg["channels"], 2, 5, 6)
    out = sfm(h)
    assert out.shape == h.shape and torch.isfinite(out).all() and not torch.equal(out, h)


def test_sfm_save_load_roundtrip(tmp_path):
    sfm = SelfAdaptiveFilterModule(channels=12, reduction=3)
    _perturb_sfm(sfm)
    sfm.save_pretrained(tmp_path / "sfm", safe_serialization=True)
    assert (tmp_path / "sfm" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SelfAdaptiveFilterModule.from_pretrained(tmp_path / "sfm")
    assert _public_config(loaded) == _public_config(sfm)
    h = torch.randn(3, 12, 2, 7, 5)
    assert torch.equal(loaded(h), sfm(h))
