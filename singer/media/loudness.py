"""Loudness measurement and normalisation (ITU-R BS.1770-4 integrated loudness, via `pyloudnorm`).

A quiet master and a loud master of the same song should drive the mouth alike, so before the audio encoder
hears a song its gain is set to a target integrated loudness (LUFS). Only a gain is applied: no compressor or
limiter, so the waveform's shape (what the encoder hears) is the same at any input level.

Audio arrays follow `singer.media.audio`: float in [-1, 1], (S,) mono or (C, S) with channels first.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

BLOCK_SECONDS = 0.4  # BS.1770's gating block
OVERSAMPLE = 4  # BS.1770-4 Annex 2: true peak estimated on a x4 oversampled signal
_PEAK_SPAN = 1 << 16  # samples per piece when oversampling, so a long song never exists x4 in memory
_PEAK_MARGIN = 64  # input samples of context each side of a piece (resample_poly's filter reaches ~10)


def _samples_channels(audio: np.ndarray) -> np.ndarray:
    """(S,) or (C, S) -> (S, C') float64 in pyloudnorm's layout and BS.1770's channel order.

    pyloudnorm weights up to 5 channels as L, R, C, Ls, Rs (surrounds x1.41). Six channels are read as 5.1 in
    the usual (SMPTE / FFmpeg) order L, R, C, LFE, Ls, Rs, and the LFE is left out as BS.1770 says.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"audio must be (samples,) or (channels, samples), got shape {x.shape}")
    if x.shape[0] == 6:
        x = x[[0, 1, 2, 4, 5]]
    elif x.shape[0] > 6:
        raise ValueError(f"loudness of {x.shape[0]}-channel audio is not defined here (at most 5.1)")
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    return x.T


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """Integrated loudness in LUFS (BS.1770-4: K-weighting, 400 ms blocks, absolute and relative gates).

    audio: (S,) or (C, S). Returns -inf for digital silence and for audio whose every block lies below the
    -70 LUFS absolute gate (there is nothing to measure).

    Audio shorter than one 400 ms block cannot be gated as the standard says; it is measured on itself looped
    (tiled) to one block. Looping keeps the level of what is there, where padding with silence would measure
    the clip quieter than it sounds (the silence would be averaged in).
    """
    import pyloudnorm

    x = _samples_channels(audio)
    if x.shape[0] == 0 or not np.any(x):
        return -math.inf
    block = int(math.ceil(BLOCK_SECONDS * rate)) + 1  # pyloudnorm wants strictly more than one block
    if x.shape[0] < block:
        x = np.tile(x, (int(math.ceil(block / x.shape[0])), 1))[:block]
    with warnings.catch_warnings():
        # pyloudnorm warns about possible clipping above 0 dBFS and numpy about an empty mean when every
        # block is gated away; both cases are handled by the caller or by the -inf below
        warnings.simplefilter("ignore")
        lufs = float(pyloudnorm.Meter(int(rate), block_size=BLOCK_SECONDS).integrated_loudness(x))
    return lufs if math.isfinite(lufs) else -math.inf


def true_peak(audio: np.ndarray) -> float:
    """The larger of the sample peak and the x4-oversampled peak (BS.1770-4 Annex 2), linear (1.0 = 0 dBFS).

    audio: (S,) or (C, S). Computed in pieces of 65 536 samples (plus context), so memory stays a few MB.
    """
    from scipy.signal import resample_poly

    x = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    n = x.shape[-1]
    if n == 0:
        return 0.0
    peak = float(np.abs(x).max())
    for start in range(0, n, _PEAK_SPAN):
        lo, hi = max(0, start - _PEAK_MARGIN), min(n, start + _PEAK_SPAN + _PEAK_MARGIN)
        up = resample_poly(x[:, lo:hi], OVERSAMPLE, 1, axis=-1)
        keep = up[:, (start - lo) * OVERSAMPLE : (min(n, start + _PEAK_SPAN) - lo) * OVERSAMPLE]
        peak = max(peak, float(np.abs(keep).max()))
    return peak


def normalize_loudness(
    audio: np.ndarray, rate: int, target_lufs: float = -23.0, peak: float = 0.99
) -> np.ndarray:
    """Scale `audio` to `target_lufs` integrated loudness, never past `peak` true peak.

    audio: (S,) or (C, S) float -> float32 of the same shape; all channels get the same gain.

    - Silence (and audio entirely below the -70 LUFS gate) is returned as is: there is no loudness to scale.
    - When reaching the target would put the true peak (see `true_peak`) above `peak`, the gain is lowered
      until the true peak equals `peak`, and the result is quieter than the target. A limiter could reach the
      target, but it would change the waveform's shape with the input level, which is what this normalisation
      exists to avoid (a quiet and a loud master must give the encoder the same input).
    - Audio shorter than 400 ms is measured looped (see `integrated_loudness`).
    """
    if not peak > 0:
        raise ValueError(f"peak must be positive, got {peak}")
    x = np.asarray(audio)
    lufs = integrated_loudness(x, rate)
    if not math.isfinite(lufs):
        return x.astype(np.float32, copy=True)
    gain = 10.0 ** ((float(target_lufs) - lufs) / 20.0)
    tp = true_peak(x)
    if tp * gain > peak:
        gain = peak / tp
    # float64 product, then float32: the same song at any input level lands on the same float32 samples
    return (x.astype(np.float64) * gain).astype(np.float32)
