"""Audio encoder: wav2vec2 (all hidden layers, one hidden state per video frame) + Hallo's audio projection.

    enc = make_audio_encoder(cfg.model)                   # tiny: random init; paper: local wav2vec2-base-960h
    tokens = enc(waveform, num_frames=8)                  # (B, S) 16 kHz -> (B, 8, audio_tokens, cross_attention_dim)
    feats = enc.features(waveform, num_frames=8)          # (B, F, 2w+1, L, H): cacheable, before the projection
    tokens = enc.project(feats)
    tokens = enc.window_tokens(clip_wave, start, num_frames=16, fps=25)   # training: a window of a whole clip

What ``forward`` does (Hallo's ``Wav2VecModel`` + ``AudioProjModel``, checked against them):

1. Normalise each waveform to zero mean and unit variance, ``(x - mean) / sqrt(var + 1e-7)``, as
   ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does; silence stays exactly 0 (no NaN).
2. wav2vec2's CNN feature encoder (50 feature frames per second, receptive field 400 samples, stride 320).
3. **Linear resampling of the CNN features to ``num_frames``** (``F.interpolate(..., align_corners=True)``, as Hallo's
   ``linear_interpolation``) *before* the feature projection and transformer, so each transformer position is
   one video frame. The whole waveform is spread over ``num_frames``; with ``num_frames=None`` it is
   ``ceil(S / 16000 * fps)`` (Hallo's ``seq_len``).
4. Feature projection + transformer encoder; ALL hidden layers are kept (transformers' ``hidden_states[1:]``:
   the output of every layer, ``L`` of them; for the "stable layer norm" variant the last one after the final
   layer norm, as transformers 4.x returned them).
5. For each frame ``f`` a window of frames ``f-w .. f+w`` (indices clamped to ``[0, F-1]``: edge padding) ->
   ``(B, F, 2w+1, L, H)``.
6. Projection (Hallo's ``AudioProjModel``, parameter names ``proj1``, ``proj2``, ``proj3``, ``norm``): flatten
   ``(2w+1) * L * H`` -> proj1 -> ReLU -> proj2 -> ReLU -> proj3 -> ``(audio_tokens, cross_attention_dim)`` ->
   LayerNorm. Paper sizes: proj1 [512, 46080], proj3 [24576, 512], as in ``hallo_net.pth.audioproj.json``.

Training windows (``window_tokens``) follow Hallo's training data: wav2vec2 over the whole clip
(``hallo/datasets/audio_processor.py:108-119``), the +-w windows over that whole sequence, the window's frames
sliced out (``hallo/datasets/talk_video.py:242-250``), so a window's edge frames see their true neighbours and
the normalisation is the clip's; never wav2vec2 on the window's samples alone.

Long audio (a whole song; memory stays bounded, results documented):

* CNN: inputs longer than ``cnn_chunk_seconds`` are run in chunks aligned to the CNN's total stride, with the
  receptive-field overlap, so every feature frame is computed from exactly the samples it would see in one pass.
  The first conv layer of wav2vec2-base has a GroupNorm over the *whole* time axis; its statistics are
  accumulated over all chunks first (a cheap pass over that one layer), so the chunked result equals the
  one-pass result up to float rounding (tested). Peak memory then grows with the chunk, not the song
  (one pass over 4 minutes of audio at base size would hold about 1.5 GB per conv activation).
* Transformer: up to ``max_frames`` frames (default 1500 = 60 s at 25 fps) go through in one pass, exactly like
  Hallo. Longer inputs are processed in windows of ``max_frames`` frames overlapping by ``context_frames`` on
  each side (default 128 frames = 5 s, which also covers the 128-frame positional convolution); each frame is
  taken from the window where it has the most context. This bounds attention memory (O(max_frames^2)) at the
  price of a context limited to the window for songs over a minute (wav2vec2 itself was pre-trained on crops
  of at most ~15 s).

Training notes: SpecAugment masking is off unless ``spec_augment=True`` (it needs at least
``mask_time_length`` frames; Hallo never ran wav2vec2 in training mode); dropout and LayerDrop follow the
wav2vec2 config in ``train()`` mode. ``freeze_feature_encoder()`` freezes the CNN (Hallo does), ``freeze_wav2vec2()``
all of wav2vec2 (then cache ``features()`` per clip and train ``projection`` alone).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = [
    "SAMPLE_RATE",
    "AudioEncoder",
    "AudioProjection",
    "make_audio_encoder",
    "normalize_waveform",
    "tiny_wav2vec2_config",
    "window_frames",
]

SAMPLE_RATE = 16000
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


def tiny_wav2vec2_config(model_cfg: Any) -> dict:
    """A small ``Wav2Vec2Config`` (as a dict) from ``ModelConfig``'s ``audio_*`` sizes: 7 conv layers with
    wav2vec2's strides (50 Hz features), no LayerDrop, no SpecAugment."""
    hidden = int(model_cfg.audio_hidden_size)
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(model_cfg.audio_layers),
        "num_attention_heads": int(model_cfg.audio_heads),
        "intermediate_size": int(model_cfg.audio_intermediate_size),
        "conv_dim": [int(model_cfg.audio_conv_dim)] * 7,
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_bias": False,
        "feat_extract_norm": "group",
        "num_conv_pos_embeddings": 32,
        "num_conv_pos_embedding_groups": 16 if hidden % 16 == 0 else 1,
        "layerdrop": 0.0,
        "mask_time_prob": 0.0,
        "do_stable_layer_norm": False,
        "vocab_size": 32,
    }


def normalize_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per row of (B, S), in float32: ``(x - mean) / sqrt(var + 1e-7)``."""
    x = waveform.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + NORM_EPS)


def window_frames(hidden: torch.Tensor, window: int) -> torch.Tensor:
    """(B, F, ...) -> (B, F, 2w+1, ...): entry [:, f, k] is frame clamp(f + k - w, 0, F - 1) (edge padding)."""
    frames = hidden.shape[1]
    offsets = torch.arange(-window, window + 1, device=hidden.device)
    idx = (torch.arange(frames, device=hidden.device)[:, None] + offsets[None]).clamp_(0, frames - 1)
    return hidden[:, idx]


class AudioProjection(nn.Module):
    """Hallo's ``AudioProjModel``: windowed wav2vec2 features -> ``tokens`` context tokens per frame."""

    def __init__(self, window_frames: int, layers: int, hidden: int, proj_dim: int, tokens: int, out_dim: int):
        super().__init__()
        self.input_dim = window_frames * layers * hidden
        self.tokens = tokens
        self.out_dim = out_dim
        self.proj1 = nn.Linear(self.input_dim, proj_dim)
        self.proj2 = nn.Linear(proj_dim, proj_dim)
        self.proj3 = nn.Linear(proj_dim, tokens * out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, 2w+1, L, H) -> (B, F, tokens, out_dim)."""
        b, f = features.shape[:2]
        x = features.reshape(b * f, -1)
        if x.shape[1] != self.input_dim:
            raise ValueError(
                f"audio features flatten to {x.shape[1]} per frame, the projection expects {self.input_dim} "
                f"(window x layers x hidden); got shape {tuple(features.shape)}"
            )
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        x = self.proj3(x).reshape(b * f, self.tokens, self.out_dim)
        return self.norm(x).reshape(b, f, self.tokens, self.out_dim)


class AudioEncoder(ModelMixin, ConfigMixin):
    """wav2vec2 + Hallo's audio projection. Submodules: ``wav2vec2`` (``transformers.Wav2Vec2Model``) and
    ``projection`` (``AudioProjection``).

    Config:
        wav2vec2_config: a ``Wav2Vec2Config`` as a dict (None: the tiny preset's sizes).
        window: +-frames of features per video frame (2 -> 5 frames).
        tokens, cross_attention_dim: output tokens per frame and their width.
        proj_dim: hidden width of the projection MLP.
        sample_rate: of the input waveform (wav2vec2 expects 16 kHz).
        normalize: zero-mean unit-variance normalisation of the waveform (Wav2Vec2FeatureExtractor's do_normalize).
        spec_augment: apply wav2vec2's SpecAugment time masking in train() mode.
        max_frames, context_frames: transformer windowing for long inputs (see the module docstring).
        cnn_chunk_seconds: CNN chunking for long inputs.
    """

    @register_to_config
    def __init__(
        self,
        wav2vec2_config: dict | None = None,
        window: int = 2,
        tokens: int = 32,
        cross_attention_dim: int = 64,
        proj_dim: int = 64,
        sample_rate: int = SAMPLE_RATE,
        normalize: bool = True,
        spec_augment: bool = False,
        max_frames: int = 1500,
        context_frames: int = 128,
        cnn_chunk_seconds: float = 30.0,
    ):
        super().__init__()
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        if window < 0 or max_frames < 1 or context_frames < 0 or max_frames <= 2 * context_frames:
            raise ValueError(
                f"need window >= 0 and max_frames > 2 * context_frames >= 0, got window={window}, "
                f"max_frames={max_frames}, context_frames={context_frames}"
            )
        if wav2vec2_config is None:
            from singer.config import ModelConfig

            wav2vec2_config = tiny_wav2vec2_config(ModelConfig())
        w2v_cfg = Wav2Vec2Config(**{k: v for k, v in wav2vec2_config.items() if k != "transformers_version"})
        self.wav2vec2 = Wav2Vec2Model(w2v_cfg)
        self.projection = AudioProjection(
            2 * window + 1, w2v_cfg.num_hidden_layers, w2v_cfg.hidden_size, proj_dim, tokens, cross_attention_dim
        )

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_model_config(cls, model_cfg: Any, seed: int | None = None, **overrides) -> AudioEncoder:
        """Tiny preset: random init from ``ModelConfig`` sizes (deterministic for a given ``seed``, or the current
        torch RNG when None). With ``audio_encoder_path`` set, loads wav2vec2 from that local folder instead."""
        kwargs = {
            "window": model_cfg.audio_window,
            "tokens": model_cfg.audio_tokens,
            "cross_attention_dim": getattr(model_cfg, "audio_attention_dim", None) or model_cfg.cross_attention_dim,
            "proj_dim": model_cfg.audio_proj_dim,
            **overrides,
        }
        if model_cfg.audio_encoder_path:
            enc = cls.from_wav2vec2(model_cfg.audio_encoder_path, seed=seed, **kwargs)
            w = enc.wav2vec2.config
            if (w.hidden_size, w.num_hidden_layers) != (model_cfg.audio_hidden_size, model_cfg.audio_layers):
                raise ValueError(
                    f"wav2vec2 at {model_cfg.audio_encoder_path} has hidden size {w.hidden_size} and "
                    f"{w.num_hidden_layers} layers; params.yaml says model.audio_hidden_size="
                    f"{model_cfg.audio_hidden_size}, model.audio_layers={model_cfg.audio_layers}"
                )
            return enc
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(wav2vec2_config=tiny_wav2vec2_config(model_cfg), **kwargs)

    @classmethod
    def from_wav2vec2(cls, path: str | os.PathLike, seed: int | None = None, **kwargs) -> AudioEncoder:
        """wav2vec2 weights from a local folder (e.g. ``wav2vec2-base-960h``: a ``Wav2Vec2ForCTC`` checkpoint; the
        ``wav2vec2.`` prefix is stripped and ``lm_head`` dropped by transformers); a fresh projection."""
        from transformers import Wav2Vec2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise FileNotFoundError(
                f"wav2vec2 folder {path} {what} (model.audio_encoder_path: a local copy of wav2vec2-base-960h)"
            )
        loaded = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True)
        config = {k: v for k, v in loaded.config.to_dict().items() if not k.startswith("_")}
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            enc = cls(wav2vec2_config=config, **kwargs)
        enc.wav2vec2 = loaded
        return enc

    def freeze_feature_encoder(self) -> None:
        """No gradients for wav2vec2's CNN (as Hallo)."""
        self.wav2vec2.freeze_feature_encoder()

    def freeze_wav2vec2(self) -> None:
        """No gradients for any of wav2vec2 (only ``projection`` trains)."""
        self.wav2vec2.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        return int(self.wav2vec2.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.wav2vec2.config.hidden_size)

    # ------------------------------------------------------------------------------------------ pieces
    def num_frames_for(self, num_samples: int, fps: float) -> int:
        """Hallo's frame count for a waveform: ceil(seconds * fps)."""
        return max(1, math.ceil(num_samples / self.config.sample_rate * fps))

    def _conv_geometry(self) -> tuple[int, int]:
        """(total stride, receptive field) of the CNN, in samples (320, 400 for wav2vec2)."""
        cfg = self.wav2vec2.config
        stride, field = 1, 1
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            field += (k - 1) * stride
            stride *= s
        return stride, field

    def cnn_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Normalised (B, S) -> CNN features (B, T, C) at 50 Hz; chunked (exactly) for long inputs."""
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GroupNormConvLayer

        fe = self.wav2vec2.feature_extractor
        stride, field = self._conv_geometry()
        if waveform.shape[1] < field:  # shorter than one feature frame (25 ms): pad with silence
            waveform = F.pad(waveform, (0, field - waveform.shape[1]))
        n = waveform.shape[1]
        chunk = max(int(self.config.cnn_chunk_seconds * self.config.sample_rate), field)
        if n <= chunk:
            return fe(waveform).transpose(1, 2)
        total = int(self.wav2vec2._get_feat_extract_output_lengths(n))
        layers = list(fe.conv_layers)
        first = layers[0]
        stats = None
        if isinstance(first, Wav2Vec2GroupNormConvLayer):
            # GroupNorm(C, C) normalises each channel over the whole time axis: accumulate its statistics first.
            k0, s0 = first.conv.kernel_size[0], first.conv.stride[0]
            length0 = (n - k0) // s0 + 1
            per = max(1, chunk // s0)
            total_sum = total_sq = 0
            for c in range(0, length0, per):
                d = min(length0, c + per)
                y = first.conv(waveform[:, None, c * s0:(d - 1) * s0 + k0]).double()
                total_sum = total_sum + y.sum(-1)
                total_sq = total_sq + (y * y).sum(-1)
            mean = total_sum / length0
            var = (total_sq / length0 - mean * mean).clamp_min(0)
            stats = (mean.float()[..., None], var.float()[..., None])
        per_frames = max(1, chunk // stride)
        out = []
        for a in range(0, total, per_frames):
            b = min(total, a + per_frames)
            h = waveform[:, None, a * stride:(b - 1) * stride + field]
            for i, layer in enumerate(layers):
                if i == 0 and stats is not None:
                    gn = first.layer_norm
                    h = first.conv(h)
                    h = (h - stats[0].to(h.dtype)) / torch.sqrt(stats[1].to(h.dtype) + gn.eps)
                    h = h * gn.weight[:, None] + gn.bias[:, None]
                    h = first.activation(h)
                else:
                    h = layer(h)
            if h.shape[-1] != b - a:  # pragma: no cover - guards the geometry above
                raise RuntimeError(f"chunked CNN produced {h.shape[-1]} frames, expected {b - a}")
            out.append(h)
        return torch.cat(out, dim=-1).transpose(1, 2)

    def _transformer(self, hidden: torch.Tensor) -> torch.Tensor:
        """wav2vec2's encoder on (B, F, H) -> all layer outputs (B, F, L, H)."""
        enc = self.wav2vec2.encoder
        stable = bool(self.wav2vec2.config.do_stable_layer_norm)
        hidden = hidden + enc.pos_conv_embed(hidden)
        if not stable:
            hidden = enc.layer_norm(hidden)
        hidden = enc.dropout(hidden)
        layerdrop = float(self.wav2vec2.config.layerdrop) if self.training else 0.0
        outputs = []
        for layer in enc.layers:
            if layerdrop > 0 and float(torch.rand([])) < layerdrop:
                outputs.append(hidden)
                continue
            hidden = layer(hidden, attention_mask=None)
            outputs.append(hidden)
        if stable:
            outputs[-1] = enc.layer_norm(outputs[-1])
        return torch.stack(outputs, dim=2)

    def hidden_states(self, waveform: torch.Tensor, num_frames: int | None = None, fps: float = 25.0) -> torch.Tensor:
        """(B, S) or (S,) waveform -> all wav2vec2 hidden layers, one per video frame: (B, F, L, H)."""
        if waveform.ndim == 1:
            waveform = waveform[None]
        if waveform.ndim != 2:
            raise ValueError(f"waveform must be (B, S) or (S,), got shape {tuple(waveform.shape)}")
        if num_frames is None:
            num_frames = self.num_frames_for(waveform.shape[1], fps)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        x = normalize_waveform(waveform) if self.config.normalize else waveform.float()
        x = x.to(device=self.device, dtype=self.dtype)
        feats = self.cnn_features(x)  # (B, T, C)
        feats = F.interpolate(feats.transpose(1, 2), size=int(num_frames), mode="linear", align_corners=True)
        hidden, _ = self.wav2vec2.feature_projection(feats.transpose(1, 2))
        if self.config.spec_augment and self.training:
            hidden = self.wav2vec2._mask_hidden_states(hidden)
        frames = hidden.shape[1]
        limit, ctx = int(self.config.max_frames), int(self.config.context_frames)
        if frames <= limit:
            return self._transformer(hidden)
        core = limit - 2 * ctx
        out = []
        for s in range(0, frames, core):
            e = min(frames, s + core)
            a = max(0, min(s - ctx, frames - limit))
            b = min(frames, a + limit)
            out.append(self._transformer(hidden[:, a:b])[:, s - a:e - a])
        return torch.cat(out, dim=1)

    def window(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, F, L, H) -> (B, F, 2w+1, L, H), edge-padded."""
        return window_frames(hidden, int(self.config.window))

    def features(self, waveform: torch.Tensor, num_frames: int | None = None, fps: float = 25.0) -> torch.Tensor:
        """Windowed features before the projection: (B, F, 2w+1, L, H). Cache ``hidden_states`` (5x smaller)
        and call ``window`` when storing many clips."""
        return self.window(self.hidden_states(waveform, num_frames, fps))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, 2w+1, L, H) -> (B, F, audio_tokens, cross_attention_dim)."""
        return self.projection(features.to(self.projection.proj1.weight.dtype))

    def window_tokens(self, waveform: torch.Tensor, start_frame: torch.Tensor | None, num_frames: int,
                      fps: float = 25.0) -> torch.Tensor:
        """Tokens of a window of whole clips, as Hallo trains: (B, S) 16 kHz clips, start_frame (B,) long (None: 0)
        -> (B, num_frames, audio_tokens, cross_attention_dim). wav2vec2 encodes each whole clip to
        ceil(S / 16000 * fps) frames (Hallo's seq_len); frame f of the window gets the clip's frames
        clamp(start + f + k, 0, T - 1) for k in -w..w (clamped at the clip's edges only), then the projection."""
        if waveform.ndim == 1:
            waveform = waveform[None]
        hidden = self.hidden_states(waveform, None, fps)                     # (B, T, L, H)
        b, total = hidden.shape[:2]
        if start_frame is None:
            start = torch.zeros(b, dtype=torch.long, device=hidden.device)
        else:
            start = torch.as_tensor(start_frame, device=hidden.device).long().reshape(-1)
            if start.numel() not in (1, b):
                raise ValueError(f"start_frame has {start.numel()} values for {b} clips")
            start = start.expand(b)
        last = int(start.max()) + int(num_frames)
        if int(start.min()) < 0 or last > total:
            raise ValueError(f"audio window frames {int(start.min())}..{last} do not fit the clip's {total} frames "
                             f"({waveform.shape[1]} samples at {fps} fps)")
        windows = self.window(hidden)                                        # (B, T, 2w+1, L, H), whole clips
        frames = start[:, None] + torch.arange(int(num_frames), device=hidden.device)[None]
        rows = torch.arange(b, device=hidden.device)[:, None]
        return self.project(windows[rows, frames])                           # (B, F, 2w+1, L, H) -> tokens

    def forward(self, waveform: torch.Tensor, num_frames: int | None = None, fps: float = 25.0) -> torch.Tensor:
        """(B, S) 16 kHz waveform -> (B, num_frames, audio_tokens, cross_attention_dim)."""
        return self.project(self.features(waveform, num_frames, fps))


def make_audio_encoder(model_cfg: Any, seed: int | None = None) -> AudioEncoder:
    """The preset's audio encoder: tiny (random init, ``seed``) or paper (wav2vec2 from ``audio_encoder_path``)."""
    return AudioEncoder.from_model_config(model_cfg, seed=seed)
