"""Audio encoder: wav2vec2 (all layers, resampled to video frames, +-w window) + Hallo's audio projection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from factories import CHECKPOINT_MANIFESTS

from singer.config import load_config
from singer.models.audio import (
    AudioEncoder,
    AudioProjection,
    make_audio_encoder,
    normalize_waveform,
    tiny_wav2vec2_config,
    window_frames,
)

MANIFESTS = CHECKPOINT_MANIFESTS
SR = 16000


@pytest.fixture(scope="module")
def model_cfg():
    return load_config("params.yaml", preset="tiny").model


@pytest.fixture(scope="module")
def encoder(model_cfg):
    return make_audio_encoder(model_cfg, seed=0).eval()


def _wave(batch=2, seconds=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, int(seconds * SR), generator=gen)


def test_tiny_shapes(encoder, model_cfg):
    x = _wave()
    with torch.no_grad():
        tokens = encoder(x, num_frames=8, fps=25)
        feats = encoder.features(x, num_frames=8)
        hidden = encoder.hidden_states(x, num_frames=8)
    assert tokens.shape == (2, 8, model_cfg.audio_tokens, model_cfg.cross_attention_dim) == (2, 8, 32, 64)
    w = model_cfg.audio_window
    assert feats.shape == (2, 8, 2 * w + 1, model_cfg.audio_layers, model_cfg.audio_hidden_size)
    assert hidden.shape == (2, 8, model_cfg.audio_layers, model_cfg.audio_hidden_size)
    assert torch.isfinite(tokens).all()
    # forward == project(features); features == window(hidden_states)
    assert torch.allclose(tokens, encoder.project(feats), atol=1e-6)
    assert torch.equal(feats, encoder.window(hidden))
    # LayerNorm output per token
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 8, 32), atol=1e-4)


@pytest.mark.parametrize("samples", [100, 399, 4000, 16000, 33333])
@pytest.mark.parametrize("frames", [1, 7, 50])
def test_any_length_gives_the_requested_frames(encoder, samples, frames):
    with torch.no_grad():
        out = encoder(_wave(1, samples / SR), num_frames=frames)
    assert out.shape[:2] == (1, frames)
    assert torch.isfinite(out).all()


def test_default_frame_count_is_hallos(encoder):
    x = _wave(1, 1.3)
    with torch.no_grad():
        h = encoder.hidden_states(x, fps=25)
    assert h.shape[1] == math.ceil(1.3 * 25) == encoder.num_frames_for(x.shape[1], 25)
    assert encoder.hidden_states(x[0], num_frames=4).shape[:2] == (1, 4)  # (S,) is a batch of one


def test_window_edge_padding():
    frames, w = 6, 2
    hidden = torch.arange(frames, dtype=torch.float32).reshape(1, frames, 1, 1).expand(2, frames, 3, 4)
    out = window_frames(hidden, w)
    assert out.shape == (2, frames, 2 * w + 1, 3, 4)
    expected = torch.tensor([[min(max(f + k, 0), frames - 1) for k in range(-w, w + 1)] for f in range(frames)],
                            dtype=torch.float32)
    assert torch.equal(out[0, :, :, 0, 0], expected)
    assert torch.equal(out[1, :, :, 2, 3], expected)
    assert torch.equal(out[:, :, w], hidden)  # the centre is the frame itself
    assert torch.equal(window_frames(hidden, 0)[:, :, 0], hidden)


def test_all_hidden_layers_match_transformers(encoder):
    """At the CNN's own frame rate (no resampling) our layers are transformers' hidden_states[1:], exactly."""
    x = _wave(2, 1.0)
    native = int(encoder.wav2vec2._get_feat_extract_output_lengths(x.shape[1]))
    with torch.no_grad():
        ours = encoder.hidden_states(x, num_frames=native)
        ref = encoder.wav2vec2(normalize_waveform(x), output_hidden_states=True)
    assert len(ref.hidden_states) == encoder.num_layers + 1
    assert ours.shape[2] == encoder.num_layers == 2
    assert torch.allclose(ours, torch.stack(ref.hidden_states[1:], dim=2), atol=1e-5)


def test_silent_and_constant_audio_are_finite(encoder):
    with torch.no_grad():
        silent = encoder(torch.zeros(2, SR), num_frames=5)
        dc = encoder(torch.full((1, SR), 0.3), num_frames=5)
    assert torch.isfinite(silent).all() and torch.isfinite(dc).all()
    assert torch.equal(normalize_waveform(torch.zeros(1, 10)), torch.zeros(1, 10))


def test_waveform_is_normalised_per_sample(encoder):
    x = _wave(1, 1.0)
    with torch.no_grad():
        a = encoder(x, num_frames=6)
        b = encoder(3.0 * x + 0.05, num_frames=6)
    assert torch.allclose(a, b, atol=1e-4)


def test_chunked_cnn_equals_one_pass(model_cfg):
    enc = make_audio_encoder(model_cfg, seed=1).eval()
    x = _wave(2, 3.0, seed=3)
    with torch.no_grad():
        one = enc.hidden_states(x, num_frames=75)
        enc.register_to_config(cnn_chunk_seconds=0.37)  # 9 chunks, not aligned to anything in particular
        chunked = enc.hidden_states(x, num_frames=75)
    assert torch.allclose(one, chunked, atol=1e-4), (one - chunked).abs().max()


def test_long_input_is_windowed(model_cfg):
    enc = make_audio_encoder(model_cfg, seed=1).eval()
    enc.register_to_config(max_frames=40, context_frames=10)
    x = _wave(1, 4.0, seed=4)
    with torch.no_grad():
        short = enc.hidden_states(x[:, :SR], num_frames=25)  # fits in one pass: untouched by windowing
        long = enc.hidden_states(x, num_frames=100)
    assert long.shape == (1, 100, 2, 32) and torch.isfinite(long).all()
    enc.register_to_config(max_frames=1500, context_frames=128)
    with torch.no_grad():
        assert torch.equal(short, enc.hidden_states(x[:, :SR], num_frames=25))
        one_pass = enc.hidden_states(x, num_frames=100)
    # windows see 40 frames instead of 100: close to the one-pass result, not equal
    assert (long - one_pass).abs().mean() < 0.2 * one_pass.abs().mean()


def test_gradients_reach_wav2vec2_and_projection(model_cfg):
    enc = make_audio_encoder(model_cfg, seed=0).train()
    enc.freeze_feature_encoder()
    enc(_wave(1, 0.5), num_frames=4).square().mean().backward()
    assert enc.projection.proj1.weight.grad is not None
    assert enc.wav2vec2.encoder.layers[0].attention.q_proj.weight.grad is not None
    assert enc.wav2vec2.feature_extractor.conv_layers[0].conv.weight.grad is None


def test_seeded_init_is_deterministic_and_leaves_rng_alone(model_cfg):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = make_audio_encoder(model_cfg, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = make_audio_encoder(model_cfg, seed=7)
    c = make_audio_encoder(model_cfg, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["projection.proj1.weight"], sc["projection.proj1.weight"])


def test_paper_projection_matches_hallo_manifest():
    manifest = json.loads((MANIFESTS / "hallo_net.pth.audioproj.json").read_text())["params"]
    proj = AudioProjection(window_frames=5, layers=12, hidden=768, proj_dim=512, tokens=32, out_dim=768)
    shapes = {k: list(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == manifest
    assert list(shapes) == list(manifest)  # same key order
    out = proj(torch.randn(1, 2, 5, 12, 768))
    assert out.shape == (1, 2, 32, 768)


def test_projection_rejects_wrong_feature_size():
    proj = AudioProjection(5, 2, 8, 16, 4, 8)
    with pytest.raises(ValueError, match="flatten to"):
        proj(torch.randn(1, 2, 3, 2, 8))


def test_save_and_load_pretrained(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "audio")
    loaded = AudioEncoder.from_pretrained(tmp_path / "audio").eval()
    x = _wave(1, 0.7)
    with torch.no_grad():
        assert torch.equal(loaded(x, num_frames=5), encoder(x, num_frames=5))


def _ctc_checkpoint(folder: Path, model_cfg, seed: int = 5) -> dict:
    """A tiny Wav2Vec2ForCTC saved like the released wav2vec2-base-960h: prefix `wav2vec2.`, an lm_head, the old
    weight-norm names weight_g / weight_v, no masked_spec_embed. Returns the file's tensors."""
    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = tiny_wav2vec2_config(model_cfg) | {"mask_time_prob": 0.05}
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(Wav2Vec2Config(**cfg)).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        if "masked_spec_embed" in key:
            continue
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        renamed[key] = value
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    assert "lm_head.weight" in renamed and any(k.endswith("weight_g") for k in renamed)
    return tensors


def test_load_wav2vec2_ctc_checkpoint_from_local_folder(tmp_path, model_cfg):
    tensors = _ctc_checkpoint(tmp_path / "w2v", model_cfg)
    cfg = model_cfg.model_copy(update={"audio_encoder_path": str(tmp_path / "w2v")})
    enc = make_audio_encoder(cfg, seed=0)
    state = enc.wav2vec2.state_dict()
    for key, value in tensors.items():
        if key.startswith("wav2vec2.") and "masked_spec_embed" not in key:
            assert torch.equal(state[key.removeprefix("wav2vec2.")], value), key
    assert not any(k.startswith("lm_head") for k in enc.state_dict())
    with torch.no_grad():
        assert enc.eval()(_wave(1, 0.5), num_frames=3).shape == (1, 3, 32, 64)
    # The wrapped config rebuilds the same architecture (save_pretrained / from_pretrained round trip).
    enc.save_pretrained(tmp_path / "enc")
    again = AudioEncoder.from_pretrained(tmp_path / "enc")
    assert torch.equal(again.wav2vec2.feature_extractor.conv_layers[1].conv.weight,
                       enc.wav2vec2.feature_extractor.conv_layers[1].conv.weight)


def test_loaded_sizes_must_match_params(tmp_path, model_cfg):
    _ctc_checkpoint(tmp_path / "w2v", model_cfg)
    cfg = model_cfg.model_copy(update={"audio_encoder_path": str(tmp_path / "w2v"), "audio_layers": 12})
    with pytest.raises(ValueError, match="audio_layers"):
        make_audio_encoder(cfg)


def test_missing_wav2vec2_folder_is_a_one_line_error(tmp_path, model_cfg):
    cfg = model_cfg.model_copy(update={"audio_encoder_path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError) as err:
        make_audio_encoder(cfg)
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioEncoder.from_wav2vec2(tmp_path / "empty")


def test_paper_sized_encoder_shapes():
    """wav2vec2-base sizes (random init): 12 layers of 768 -> proj1 [512, 46080], tokens (F, 32, 768)."""
    cfg = load_config("params.yaml", preset="paper").model.model_copy(update={"audio_encoder_path": None})
    enc = AudioEncoder.from_model_config(cfg, seed=0).eval()
    assert enc.projection.proj1.weight.shape == (512, 46080)
    assert enc.projection.proj3.weight.shape == (24576, 512)
    with torch.no_grad():
        out = enc(_wave(1, 0.64), num_frames=16)
    assert out.shape == (1, 16, 32, 768)
