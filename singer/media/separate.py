"""Vocal isolation before the audio encoder hears a song (as Hallo does, with a separator run first).

Methods (`METHODS`):
- "none": the mix itself.
- "hpss": two-stage median-filtering harmonic/percussive separation (FitzGerald & Gainza 2010, "Single
  channel vocal separation using median filtering and factorisation techniques") with `librosa.decompose.hpss`.
  With a long window (0.5 s) the voice, which glides and has vibrato, is "percussive" next to sustained chords
  and is kept; with a short window (0.13 s) the voice is "harmonic" next to the drums, and is kept again.
- "repet_sim": REPET-SIM (Rafii & Pardo 2012) as in librosa's vocal separation example: the repeating
  background of each frame is the median of its most similar frames (`librosa.decompose.nn_filter`, cosine,
  at least 2 s away), and the vocals are what a soft mask keeps of the rest.
- "model": an MDX-Net ONNX model the user points to (Kim_Vocal_2.onnx is what Hallo runs, through
  audio-separator); `MdxModel` runs it with onnxruntime the way audio-separator's MDX separator does.

Both librosa methods also drop what lies below 80 Hz (no sung fundamental goes that low; kick and bass do).
Their settings were chosen on the synthetic corpus (benchmarks/separation.py prints the table).

Memory: songs are processed in chunks of at most `chunk_seconds` of output, each with `context_seconds` of
audio either side, cross-faded over 2 s; the similarity search of REPET-SIM grows faster than linearly with
length, so it only ever sees one chunk. Chunk starts fall on the coarsest STFT hop, so for HPSS (whose
influence reaches ~3 s) chunked and whole processing agree to float rounding; REPET-SIM's neighbours come from
the chunk, so its result depends (a little) on the chunking.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

METHODS = ("none", "hpss", "repet_sim", "model")
LOW_CUT_HZ = 80.0
_HPSS_LONG_S, _HPSS_SHORT_S = 0.512, 0.128  # window lengths (8192 and 2048 samples at 16 kHz)
_REPET_WINDOW_S = 0.256  # 4096 samples at 16 kHz
_REPET_WIDTH_S = 2.0  # neighbours at least this far apart: a held note is not its own background
_REPET_MARGIN = 2.0  # soft-mask margin for the vocals: > 1 keeps less background at the cost of some voice
_CROSSFADE_S = 2.0


class SeparationError(ValueError):
    """A separation setting or model that cannot be used; the message is one line for the user."""


def _n_fft(seconds: float, rate: int) -> int:
    """The power of two nearest (in log) to `seconds` of samples: the same time span at any rate."""
    return int(2 ** round(math.log2(max(16.0, seconds * rate))))


def _low_cut(n_fft: int, rate: int) -> np.ndarray:
    """(n_fft//2+1, 1) gain: 0 below 40 Hz, rising linearly to 1 at 80 Hz (a soft edge rings less)."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    return np.clip((freqs - LOW_CUT_HZ / 2) / (LOW_CUT_HZ / 2), 0.0, 1.0)[:, None].astype(np.float32)


def _hpss(y: np.ndarray, rate: int) -> np.ndarray:
    """(S,) -> (S,) vocals: percussive part of a long-window HPSS, then harmonic part of a short-window one."""
    import librosa

    n1, n2 = _n_fft(_HPSS_LONG_S, rate), _n_fft(_HPSS_SHORT_S, rate)
    length = len(y)
    # scipy's reflecting median filter returns NaN on an axis of fewer than ~5 frames (a clip under ~0.6 s):
    # such a clip is padded with silence to 2 long windows (9 frames) and cut back after
    y = np.pad(y, (0, max(0, 2 * n1 - length)))
    spec = librosa.stft(y, n_fft=n1, hop_length=n1 // 4)
    _, percussive = librosa.decompose.hpss(spec)
    stage1 = librosa.istft(percussive * _low_cut(n1, rate), n_fft=n1, hop_length=n1 // 4, length=len(y))
    spec = librosa.stft(stage1, n_fft=n2, hop_length=n2 // 4)
    harmonic, _ = librosa.decompose.hpss(spec)
    return librosa.istft(harmonic, n_fft=n2, hop_length=n2 // 4, length=len(y))[:length]


def _repet_sim(y: np.ndarray, rate: int) -> np.ndarray:
    """(S,) -> (S,) vocals by REPET-SIM. Fewer than 5 frames (~0.3 s): only the low cut (nothing repeats)."""
    import librosa

    n_fft = _n_fft(_REPET_WINDOW_S, rate)
    hop = n_fft // 4
    spec = librosa.stft(y, n_fft=n_fft, hop_length=hop)
    mag = np.abs(spec)
    frames = mag.shape[-1]
    # librosa needs 1 <= width <= (frames - 1) // 2; clips of a few seconds get a shorter exclusion zone
    width = min(int(round(_REPET_WIDTH_S * rate / hop)), (frames - 1) // 2 - 1)
    if width >= 1:
        background = librosa.decompose.nn_filter(mag, aggregate=np.median, metric="cosine", width=width)
        background = np.minimum(mag, background)
        mask = librosa.util.softmask(mag - background, _REPET_MARGIN * background, power=1)
    else:
        mask = np.ones_like(mag)
    return librosa.istft(spec * (mask * _low_cut(n_fft, rate)), n_fft=n_fft, hop_length=hop, length=len(y))


def _chunked(y: np.ndarray, rate: int, fn, chunk_seconds: float, context_seconds: float, align: int) -> np.ndarray:
    """Apply `fn` ((n,) -> (n,)) to `y` (S,) in chunks; returns (S,) float32, the only song-sized allocation.

    Cores of at most `chunk_seconds` (equal lengths, multiples of `align` samples) tile the song; each is
    processed with `context_seconds` of audio either side, and neighbours are cross-faded linearly over 2 s
    (at most twice the context) centred on their boundary (weights sum to 1 everywhere).
    """
    n = len(y)
    context = int(math.ceil(context_seconds * rate / align)) * align
    fade = min(int(_CROSSFADE_S * rate), 2 * context)
    if n <= chunk_seconds * rate + 2 * context:
        return np.asarray(fn(y), dtype=np.float32)
    count = int(math.ceil(n / (chunk_seconds * rate)))
    core = int(math.ceil(n / count / align)) * align
    out = np.zeros(n, dtype=np.float32)
    bounds = list(range(0, n, core)) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo, hi = max(0, a - context), min(n, b + context)
        est = np.asarray(fn(y[lo:hi]), dtype=np.float32)
        t = np.arange(lo, hi, dtype=np.float64)
        weight = np.ones(hi - lo)
        if fade > 0:  # without context the chunks only touch: nothing to cross-fade
            if a > 0:
                weight *= np.clip(0.5 + (t - a) / fade, 0.0, 1.0)
            if b < n:
                weight *= np.clip(0.5 + (b - t) / fade, 0.0, 1.0)
        out[lo:hi] += (est * weight).astype(np.float32)
    return out


def separate_vocals(
    audio: np.ndarray,
    rate: int,
    method: str = "repet_sim",
    model_path: str | None = None,
    *,
    chunk_seconds: float = 30.0,
    context_seconds: float = 5.0,
) -> np.ndarray:
    """Estimate the vocal stem of a song.

    audio: (S,) mono float at `rate` (a (C, S) array is downmixed to mono first) -> (S,) float32 vocals, same
    length and rate. `model_path` (an MDX-Net .onnx file) is read only with method "model", and the model is
    loaded only then. Raises SeparationError (one line) for an unknown method or an unusable model.
    """
    if method not in METHODS:
        raise SeparationError(f"unknown separation method {method!r}; choose one of {', '.join(METHODS)}")
    y = np.asarray(audio, dtype=np.float32)
    if y.ndim == 2:
        y = y.mean(axis=0)
    if y.ndim != 1:
        raise SeparationError(f"audio must be (samples,) or (channels, samples), got shape {np.shape(audio)}")
    if not np.isfinite(y).all():
        raise SeparationError("audio contains NaN or infinite samples")
    if chunk_seconds <= 0 or context_seconds < 0:
        raise SeparationError("chunk_seconds must be positive and context_seconds not negative")
    if method == "none" or len(y) == 0:
        return y.copy()
    if method == "model":
        if not model_path:
            raise SeparationError("separation 'model' needs a separator model file (separator_model)")
        model = load_mdx(model_path)  # validates the file before any audio is processed
        # audio-separator lowers a mix peaking above 0.9 to 0.9 before the network (trained on such levels);
        # one scale for the whole song, undone afterwards, so the estimate is in the mix's units
        scale = min(1.0, _MDX_PEAK / max(float(np.abs(y).max()), 1e-12))
        vocals = _chunked(y if scale == 1.0 else y * scale, rate, lambda x: model.separate(x, rate), chunk_seconds, context_seconds, 1)
        return vocals / np.float32(scale)
    fn, align = ((_hpss, _n_fft(_HPSS_LONG_S, rate) // 4) if method == "hpss"
                 else (_repet_sim, _n_fft(_REPET_WINDOW_S, rate) // 4))
    with warnings.catch_warnings():
        # librosa warns when a clip is shorter than its window; short clips are handled (zero-padded frames)
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large", category=UserWarning)
        return _chunked(y, rate, lambda x: fn(x, rate), chunk_seconds, context_seconds, align)


# ------------------------------------------------------------------------------------------------ MDX-Net
# MDX-Net models (UVR's; what audio-separator and Hallo run) take a stereo STFT as 4 channels
# [L.re, L.im, R.re, R.im] x dim_f bins x dim_t frames and return the same for their stem. n_fft, hop and the
# output gain ("compensate") are not in the file: UVR's model data keys them by file hash. The two vocal
# models below are known by name; any other needs a `<model>.json` beside it with the same keys.
_KNOWN_MDX = {
    "kim_vocal_2": {"n_fft": 7680, "hop_length": 1024, "compensate": 1.009, "stem": "vocals"},
    "uvr-mdx-net-voc_ft": {"n_fft": 7680, "hop_length": 1024, "compensate": 1.021, "stem": "vocals"},
}
_MDX_RATE = 44100
_MDX_OVERLAP = 0.25  # audio-separator's default between the network's segments
_MDX_PEAK = 0.9  # audio-separator's normalization_threshold


class MdxModel:
    """An MDX-Net ONNX separator: `separate((n,) mono at rate) -> (n,) vocals`, segments cross-faded."""

    def __init__(self, path: str, session, n_fft: int, hop_length: int, dim_f: int, dim_t: int,
                 compensate: float, stem: str, sample_rate: int):
        self.path, self.session, self.input = path, session, session.get_inputs()[0].name
        self.n_fft, self.hop, self.dim_f, self.dim_t = n_fft, hop_length, dim_f, dim_t
        self.compensate, self.stem, self.rate = compensate, stem, sample_rate

    def _run(self, segment: np.ndarray) -> np.ndarray:
        """(hop*(dim_t-1),) -> same, the network's stem for one segment (mono in both stereo channels)."""
        import torch

        window = torch.hann_window(self.n_fft, periodic=True)
        spec = torch.stft(torch.from_numpy(segment), self.n_fft, self.hop, window=window, center=True,
                          return_complex=True)[: self.dim_f]  # (dim_f, dim_t)
        spec[:3] = 0  # audio-separator zeroes the lowest 3 bins before the network
        x = torch.stack([spec.real, spec.imag] * 2)[None].numpy().astype(np.float32)  # (1, 4, dim_f, dim_t)
        try:
            y = self.session.run(None, {self.input: x})[0]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise SeparationError(f"separator model {self.path} failed: {str(exc).splitlines()[0][:200]}") from None
        if y.shape != x.shape:
            raise SeparationError(f"separator model {self.path} returned shape {list(y.shape)}, "
                                  f"expected {list(x.shape)}")
        full = np.zeros((2, self.n_fft // 2 + 1, self.dim_t), dtype=np.complex64)
        full[:, : self.dim_f] = y[0, 0::2] + 1j * y[0, 1::2]
        wave = torch.istft(torch.from_numpy(full), self.n_fft, self.hop, window=window, center=True,
                           length=len(segment))
        return wave.mean(dim=0).numpy()

    def _demix(self, x: np.ndarray) -> np.ndarray:
        """(n,) at the model rate -> (n,) stem: audio-separator's `demix` (Hann-weighted segments)."""
        trim = self.n_fft // 2
        size = self.hop * (self.dim_t - 1)
        gen = size - 2 * trim
        pad = gen + trim - len(x) % gen
        mixture = np.concatenate([np.zeros(trim, np.float32), x.astype(np.float32), np.zeros(pad, np.float32)])
        result = np.zeros(len(mixture), np.float64)
        divider = np.zeros(len(mixture), np.float64)
        step = max(1, int((1 - _MDX_OVERLAP) * size))
        for start in range(0, len(mixture), step):
            end = min(start + size, len(mixture))
            segment = np.zeros(size, np.float32)
            segment[: end - start] = mixture[start:end]
            window = np.hanning(end - start)
            result[start:end] += self._run(segment)[: end - start] * window
            divider[start:end] += window
        out = np.divide(result, divider, out=np.zeros_like(result), where=divider > 1e-8)
        return (out[trim : trim + len(x)] * self.compensate).astype(np.float32)

    def separate(self, y: np.ndarray, rate: int) -> np.ndarray:
        """(n,) mono at `rate` -> (n,) vocals at `rate` (resampled to the model's rate and back)."""
        from singer.media.audio import resample_audio

        x = resample_audio(y, rate, self.rate)
        stem = self._demix(x)
        if self.stem == "instrumental":  # audio-separator's secondary stem: the mix minus the primary one
            stem = x - stem
        out = resample_audio(stem, self.rate, rate)[: len(y)]
        return np.pad(out, (0, len(y) - len(out)))


def _mdx_settings(path) -> dict:
    import json

    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
            return {"n_fft": int(data["n_fft"]), "hop_length": int(data.get("hop_length", 1024)),
                    "compensate": float(data.get("compensate", 1.0)),
                    "stem": str(data.get("stem", "vocals")).lower(),
                    "sample_rate": int(data.get("sample_rate", _MDX_RATE))}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SeparationError(f"{sidecar} must be JSON with n_fft and optionally hop_length, compensate, "
                                  f"stem, sample_rate ({type(exc).__name__}: {exc})") from None
    known = _KNOWN_MDX.get(path.stem.lower())
    if known is None:
        raise SeparationError(f"unknown MDX-Net model {path.name}: write {sidecar.name} beside it with its n_fft, "
                              f"hop_length, compensate (known: {', '.join(_KNOWN_MDX)})")
    return {**known, "sample_rate": _MDX_RATE}


def load_mdx(model_path: str) -> MdxModel:
    """Open and check an MDX-Net ONNX file; SeparationError (one line) when it is missing or unusable."""
    from pathlib import Path

    path = Path(model_path).expanduser()
    if not path.is_file():
        raise SeparationError(f"separator model not found: {path}")
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # a file that is not a model: onnxruntime's own error types
        raise SeparationError(f"{path} is not a usable ONNX model: {str(exc).splitlines()[0][:160]}") from None
    inputs = session.get_inputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    batch_ok = len(shape) == 4 and (shape[0] in (1, None) or isinstance(shape[0], str))  # 1 or symbolic
    dims_ok = len(shape) == 4 and shape[1] == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:])
    if not (batch_ok and dims_ok):
        got = [(i.name, i.shape) for i in inputs]
        raise SeparationError(f"{path.name} is not an MDX-Net model: expected one input (batch, 4, dim_f, dim_t), "
                              f"got {got}")
    settings = _mdx_settings(path)
    dim_f, dim_t = int(shape[2]), int(shape[3])
    n_fft, hop = settings["n_fft"], settings["hop_length"]
    if dim_f > n_fft // 2 + 1 or hop * (dim_t - 1) <= n_fft or settings["stem"] not in ("vocals", "instrumental"):
        raise SeparationError(f"{path.name}: dim_f {dim_f}, dim_t {dim_t} do not fit n_fft {n_fft}, hop {hop} "
                              f"(stem {settings['stem']!r}: vocals or instrumental)")
    return MdxModel(str(path), session, n_fft, hop, dim_f, dim_t, settings["compensate"], settings["stem"],
                    settings["sample_rate"])
