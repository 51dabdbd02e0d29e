"""The denoising 3D UNet, the reference 2D UNet and the face locator (singer/models/unet_*.py, face_locator.py and
the layers they are made of).

Tiny preset sizes throughout (latents as the preset's autoencoder makes them: crop resolution / pixel-shuffle
factor, ``latent_channels``), batch 2, 8 frames, 4 face tokens, 32 audio tokens per frame.
"""

from __future__ import annotations

import pytest
import torch

from singer.config import load_config
from singer.models.audio_module import AudioMasks, AudioModule
from singer.models.face_locator import FaceLocator
from singer.models.motion_module import MotionModule, PositionalEncoding
from singer.models.unet_denoising import DenoisingUNet3D
from singer.models.unet_reference import ReferenceUNet2D

B, F, R = 2, 8, 3  # batch, frames, reference images per sample (reference frame + 2 motion frames)


@pytest.fixture(scope="module")
def cfg():
    return load_config(preset="tiny")


@pytest.fixture(scope="module")
def dims(cfg):
    m = cfg.model
    size = cfg.crop.resolution // (m.pixel_shuffle_factor if m.autoencoder == "pixel_shuffle" else 8)
    return {"C": m.latent_channels, "S": size, "D": m.cross_attention_dim, "Nf": m.face_tokens, "Na": m.audio_tokens}


def _inputs(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s, d = dims["C"], dims["S"], dims["D"]
    return {
        "sample": torch.randn(B, c, F, s, s, generator=g),
        "timestep": torch.tensor([10, 500]),
        "face_tokens": torch.randn(B, dims["Nf"], d, generator=g),
        "audio_tokens": torch.randn(B, F, dims["Na"], d, generator=g),
        "references": torch.randn(B * R, c, s, s, generator=g),
        "masks": {
            "full": (torch.rand(B, 1, s, s, generator=g) > 0.3).float(),
            "face": (torch.rand(B, F, 1, s, s, generator=g) > 0.5).float(),
            "lip": (torch.rand(B, 1, 2 * s, 2 * s, generator=g) > 0.7).float(),  # any resolution
        },
    }


def _models(cfg, seed=0, **overrides):
    torch.manual_seed(seed)
    den = DenoisingUNet3D.from_model_config(cfg.model, **overrides)
    ref = ReferenceUNet2D.from_model_config(cfg.model)
    return den.eval(), ref.eval()


def _perturb_zero_inits(module: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give every zero-initialised tensor (motion modules' proj_out, SFM, face locator conv_out, the audio zero
    convs' biases) small random values, so that these modules do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def models(cfg):
    return _models(cfg)


# ---------------------------------------------------------------------------------------------------------------
# shapes and the reference contract


def _encode(ref, inp, **kwargs):
    return ref(inp["references"], 0, face_tokens=inp["face_tokens"], **kwargs)


def _cond(inp, states):
    """The denoising UNet's keyword arguments for the standard inputs and these reference states."""
    return {"face_tokens": inp["face_tokens"], "audio_tokens": inp["audio_tokens"], "reference_states": states,
            "masks": inp["masks"]}


def test_reference_contract(models, dims):
    den, ref = models
    inp = _inputs(dims)
    assert den.attention_layer_names() == ref.attention_layer_names()
    names = den.attention_layer_names()
    n_down = len(den.config.block_out_channels) - 1
    assert names[:n_down] == [f"down_blocks.{i}.attentions.{k}" for i in range(n_down)
                              for k in range(den.config.layers_per_block)]
    assert "mid_block.attentions.0" in names
    with torch.no_grad():
        states = _encode(ref, inp)
        grouped = _encode(ref, inp, references_per_sample=R)
    assert list(states) == list(grouped) == names == ref.attention_layer_names()  # keyed by name, execution order
    assert len(names) == den.num_reference_layers
    sizes = den.level_sizes(dims["S"], dims["S"])
    for name in names:
        block = name.split(".attentions.")[0]
        level = (len(sizes) - 1 if block == "mid_block" else int(block.split(".")[1]) if block.startswith("down")
                 else len(sizes) - 1 - int(block.split(".")[1]))
        h, w = sizes[level]
        c = den.get_submodule(name).proj_in.in_channels
        assert states[name].shape == (B * R, h * w, c), name
        assert grouped[name].shape == (B, R * h * w, c), name
        assert torch.equal(grouped[name], states[name].reshape(B, R * h * w, c))


def test_reference_unet_ends_at_the_last_attn1_input(models):
    _, ref = models
    last = ref.attention_layer_names()[-1]
    assert ref.get_submodule(last) is ref.last_attention and ref.last_attention.attn1_input_only
    assert last.startswith(f"up_blocks.{len(ref.up_blocks) - 1}.") and ref.up_blocks[-1].upsamplers is None
    others = [n for n in ref.attention_layer_names()[:-1] if ref.get_submodule(n).attn1_input_only]
    assert not others
    assert all(name.startswith(last + ".") for name in ref.unused_parameter_names())


def test_denoising_shapes(models, dims):
    den, ref = models
    inp = _inputs(dims)
    shape = inp["sample"].shape
    with torch.no_grad():
        states = _encode(ref, inp, references_per_sample=R)
        full = den(inp["sample"], inp["timestep"], **_cond(inp, states))
        assert full.shape == shape and torch.isfinite(full).all()
        # each conditioning optional; scalar timestep; (B*R, hw, C) states are regrouped the same way
        for off in ({"reference_states"}, {"masks"}, {"audio_tokens"}, {"face_tokens"},
                    {"reference_states", "masks", "audio_tokens", "face_tokens"}):
            args = {k: None if k in off else v for k, v in _cond(inp, states).items()}
            out = den(inp["sample"], 7, **args)
            assert out.shape == shape and torch.isfinite(out).all()
        flat = {name: s.reshape(B * R, -1, s.shape[-1]) for name, s in states.items()}
        assert torch.equal(den(inp["sample"], inp["timestep"], **_cond(inp, flat)), full)
        # looked up by name, not by position
        backwards = dict(reversed(list(states.items())))
        assert torch.equal(den(inp["sample"], inp["timestep"], **_cond(inp, backwards)), full)


def test_bad_inputs_raise(models, dims):
    den, ref = models
    inp = _inputs(dims)
    with torch.no_grad():
        states = _encode(ref, inp, references_per_sample=R)
        fewer = dict(list(states.items())[:-1])
        with pytest.raises(ValueError, match="missing"):
            den(inp["sample"], 1, face_tokens=inp["face_tokens"], reference_states=fewer)
        with pytest.raises(ValueError, match="audio_tokens"):
            den(inp["sample"], 1, face_tokens=inp["face_tokens"], audio_tokens=inp["audio_tokens"][:, :-1])
        with pytest.raises(ValueError, match="sample"):
            den(inp["sample"][:, :, 0], 1, face_tokens=inp["face_tokens"])
        with pytest.raises(ValueError, match="face_tokens"):
            den(inp["sample"], 1, face_tokens=inp["face_tokens"][..., :-1])
        swapped = dict(states)
        swapped["down_blocks.0.attentions.0"] = states["mid_block.attentions.0"]
        with pytest.raises(ValueError, match="does not fit"):
            den(inp["sample"], 1, reference_states=swapped)
        with pytest.raises(TypeError):
            den(inp["sample"], 1, inp["face_tokens"])  # keyword arguments only
    with pytest.raises(ValueError, match="motion_frames_mode"):
        DenoisingUNet3D(block_out_channels=(32, 64), norm_num_groups=8, motion_frames_mode="nope")


def test_face_locator(cfg, dims):
    torch.manual_seed(0)
    loc = FaceLocator.from_model_config(cfg.model)
    mask = torch.rand(B, 1, F, cfg.crop.resolution, cfg.crop.resolution)
    out = loc(mask)
    assert out.shape == (B, cfg.model.block_out_channels[0], F, dims["S"], dims["S"])
    assert torch.count_nonzero(out) == 0  # zero-initialised conv_out: a fresh locator adds nothing
    assert loc(mask[:, :, 0]).shape == (B, cfg.model.block_out_channels[0], dims["S"], dims["S"])
    paper = FaceLocator()  # Hallo's: 3 stride-2 stages, 16-32-64-128, 320 out
    assert paper.downscale_factor == 8
    assert sum(p.numel() for p in paper.parameters()) == 514_896


# ---------------------------------------------------------------------------------------------------------------
# identities at initialisation


def test_fresh_motion_modules_and_sfm_are_identities(cfg, dims):
    """A fresh SINGER UNet computes exactly what the same UNet without motion modules (or SFM) computes, whatever
    the conditioning."""
    full, ref = _models(cfg)
    inp = _inputs(dims)
    with torch.no_grad():
        states = _encode(ref, inp, references_per_sample=R)
        out = full(inp["sample"], inp["timestep"], **_cond(inp, states))
        for off in ({"use_motion_modules": False}, {"use_sfm": False}):
            plain = DenoisingUNet3D.from_model_config(cfg.model, **off).eval()
            missing, unexpected = plain.load_state_dict(full.state_dict(), strict=False)
            assert not missing and unexpected  # the plain UNet is a strict subset
            other = plain(inp["sample"], inp["timestep"], **_cond(inp, states))
            assert torch.equal(out, other), off


def test_fresh_frozen_audio_modules_pass_gradients_to_the_audio(cfg, dims):
    """A fresh audio module is not an identity on purpose: frozen (the paper preset trains only the audio side,
    MSM and SFM), it must still pass gradients to the audio tokens (singer/models/audio_module.py)."""
    den, ref = _models(cfg)
    den.requires_grad_(False)
    inp = _inputs(dims)
    audio = inp["audio_tokens"].clone().requires_grad_(True)
    with torch.no_grad():
        states = _encode(ref, inp, references_per_sample=R)
    out = den(inp["sample"], inp["timestep"], **{**_cond(inp, states), "audio_tokens": audio})
    out.pow(2).mean().backward()
    per_frame = audio.grad.abs().amax(dim=(0, 2, 3))
    assert torch.all(per_frame > 0), per_frame


def test_module_level_identities():
    x = torch.randn(2 * 4, 16, 6, 6)
    audio = AudioModule(16, 2, 8, 4, inner=8)
    tokens = torch.randn(8, 5, 8)
    assert not torch.allclose(audio(x, audio_tokens=tokens), audio(x, audio_tokens=tokens + 1))  # not an identity
    motion = MotionModule(16, 2, 32, 4)
    assert torch.equal(motion(x, frames=4), x)
    assert torch.equal(motion(x, frames=4, prefix=torch.randn(2 * 2, 16, 6, 6)), x)
    pe = PositionalEncoding(16, 32).pe
    assert pe.shape == (1, 32, 16)
    assert torch.allclose(pe[0, 3, 0::2], torch.sin(3 * torch.exp(torch.arange(0, 16, 2) * (-torch.log(torch.tensor(1e4)) / 16))))


# ---------------------------------------------------------------------------------------------------------------
# conditioning is used where it should be


def test_reference_states_are_used(cfg, dims):
    den, ref = _models(cfg)
    _perturb_zero_inits(den)  # motion modules active: the motion frames reach the output through them
    inp = _inputs(dims)

    def run(unet, states):
        return unet(inp["sample"], inp["timestep"], **_cond(inp, states))

    with torch.no_grad():
        states = _encode(ref, inp, references_per_sample=R)
        base = run(den, states)
        assert not torch.allclose(base, run(den, None), atol=1e-5)
        # the reference frame's tokens (first h*w of each state)
        other = ref(inp["references"].flip(0), 0, face_tokens=inp["face_tokens"], references_per_sample=R)
        assert not torch.allclose(base, run(den, other), atol=1e-5)
        # the motion frames' tokens: through the motion modules (temporal mode) ...
        g = torch.Generator().manual_seed(5)
        moved = {}
        for name, s in states.items():
            hw = s.shape[1] // R
            moved[name] = torch.cat([s[:, :hw], s[:, hw:] + torch.randn(s[:, hw:].shape, generator=g)], 1)
        assert not torch.allclose(base, run(den, moved), atol=1e-5)
        # ... and with fresh motion modules the motion frames change nothing in temporal mode, but do in spatial
        fresh, _ = _models(cfg)
        assert torch.equal(run(fresh, states), run(fresh, moved))
        spatial = DenoisingUNet3D.from_model_config(cfg.model, motion_frames_mode="spatial").eval()
        spatial.load_state_dict(fresh.state_dict())
        assert not torch.allclose(run(spatial, states), run(spatial, moved), atol=1e-5)
        # R = 1 (no motion frames): both modes agree
        single = {name: s[:, : s.shape[1] // R] for name, s in states.items()}
        assert torch.allclose(run(spatial, single), run(fresh, single), atol=1e-6)
        # one layer's state reaches the output
        one = dict(states)
        one["mid_block.attentions.0"] = torch.randn(states["mid_block.attentions.0"].shape, generator=g)
        assert not torch.allclose(base, run(den, one), atol=1e-5)


def test_audio_is_per_frame_and_masked():
    """At the audio-module level: frame k's output depends on frame k's audio tokens only; masks gate it."""
    torch.manual_seed(0)
    n, c, s, na, da = 2 * 4, 16, 6, 5, 12
    module = AudioModule(c, 2, da, 4, inner=8).eval()
    _perturb_zero_inits(module, scale=0.2)
    x, audio = torch.randn(n, c, s, s), torch.randn(n, na, da)
    with torch.no_grad():
        base = module(x, audio_tokens=audio)
        changed = audio.clone()
        changed[5] += 1.0
        diff = (module(x, audio_tokens=changed) - base).abs().flatten(1).amax(1)
        assert diff[5] > 1e-4 and torch.all(diff[torch.arange(n) != 5] == 0)
        zero = torch.zeros(n, s * s, 1)
        masked = [module(x, audio_tokens=a, masks=AudioMasks(zero, zero, zero)) for a in (audio, changed)]
        assert torch.equal(masked[0], masked[1])  # all masks zero: the audio tokens do not matter
        only_lip = [module(x, audio_tokens=a, masks=AudioMasks(full=zero, face=zero)) for a in (audio, changed)]
        assert not torch.equal(only_lip[0], only_lip[1])


def test_audio_locality_through_unet(cfg, dims):
    """Without motion modules every layer is per frame: changing frame k's audio changes only frame k."""
    den, _ = _models(cfg, use_motion_modules=False)
    _perturb_zero_inits(den.down_blocks)  # audio zero convs / proj_out (SFM stays fresh: its gate pools frames)
    _perturb_zero_inits(den.up_blocks)
    _perturb_zero_inits(den.mid_block)
    inp = _inputs(dims)
    k = 3
    changed = inp["audio_tokens"].clone()
    changed[:, k] += 1.0
    with torch.no_grad():
        a = den(inp["sample"], inp["timestep"], **_cond(inp, None))
        b = den(inp["sample"], inp["timestep"], **{**_cond(inp, None), "audio_tokens": changed})
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert diff[k] > 1e-5
    assert torch.all(diff[torch.arange(F) != k] == 0)


# ---------------------------------------------------------------------------------------------------------------
# training


def _train_step(den, ref, loc, inp, cfg):
    states = _encode(ref, inp, references_per_sample=R)
    mask = torch.rand(B, 1, F, cfg.crop.resolution, cfg.crop.resolution, generator=torch.Generator().manual_seed(3))
    out = den(inp["sample"], inp["timestep"], **_cond(inp, states), face_features=loc(mask))
    loss = (out - inp["sample"]).pow(2).mean()
    loss.backward()
    return loss


def test_gradients_reach_every_trainable_parameter(cfg, dims):
    den, ref = _models(cfg)
    torch.manual_seed(0)
    loc = FaceLocator.from_model_config(cfg.model)
    for module in (den, ref, loc):
        _perturb_zero_inits(module)
        module.train()
    _train_step(den, ref, loc, _inputs(dims), cfg)
    unused = set(ref.unused_parameter_names())
    last = ref.attention_layer_names()[-1]
    assert unused and all(n.startswith(last + ".") for n in unused)
    # Hallo's blocks without attention skip their motion modules: those, and only those, get no gradient
    den_unused = set(den.unused_parameter_names())
    assert den_unused and all(".motion_modules." in n for n in den_unused)
    assert all(p.grad is None for n, p in den.named_parameters() if n in den_unused)
    for prefix, module, skip in (("denoising", den, den_unused), ("reference", ref, unused), ("locator", loc, set())):
        dead = [n for n, p in module.named_parameters() if n not in skip and (p.grad is None or not p.grad.any())]
        assert not dead, f"{prefix}: no gradient for {dead[:10]}"
    assert all(p.grad is None for n, p in ref.named_parameters() if n in unused)


def test_gradient_checkpointing_matches(cfg, dims):
    inp = _inputs(dims)
    grads = []
    for checkpointing in (False, True):
        den, ref = _models(cfg)
        _perturb_zero_inits(den)
        torch.manual_seed(0)
        loc = FaceLocator.from_model_config(cfg.model)
        if checkpointing:
            den.enable_gradient_checkpointing()
            ref.enable_gradient_checkpointing()
        den.train(), ref.train()
        loss = _train_step(den, ref, loc, inp, cfg)
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in den.named_parameters() if p.grad is not None}))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], rtol=1e-3, atol=1e-6), name


# ---------------------------------------------------------------------------------------------------------------
# persistence


def test_save_pretrained_round_trip(tmp_path, cfg, dims):
    den, ref = _models(cfg)
    _perturb_zero_inits(den)
    torch.manual_seed(0)
    loc = FaceLocator.from_model_config(cfg.model)
    _perturb_zero_inits(loc)
    inp = _inputs(dims)
    for name, model in (("den", den), ("ref", ref), ("loc", loc)):
        model.save_pretrained(tmp_path / name)
    den2 = DenoisingUNet3D.from_pretrained(tmp_path / "den").eval()
    ref2 = ReferenceUNet2D.from_pretrained(tmp_path / "ref").eval()
    loc2 = FaceLocator.from_pretrained(tmp_path / "loc").eval()
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(den2.config) == public(den.config)
    for a, b in ((den, den2), (ref, ref2), (loc, loc2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        out = den2(inp["sample"], inp["timestep"], **_cond(inp, _encode(ref2, inp, references_per_sample=R)))
        expected = den(inp["sample"], inp["timestep"], **_cond(inp, _encode(ref, inp, references_per_sample=R)))
    assert torch.equal(out, expected)
