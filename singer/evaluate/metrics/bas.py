"""BAS, the Beat Align Score of Bailando (Siyao et al. 2022, github.com/lisiyao21/Bailando,
``utils/beat_align_score.py``: ``calc_db``, ``get_mb`` and ``BA``; the music beats of its ``_prepro_aistpp.py``
and ``extractor.py``), with face landmarks in place of body joints.

Definitions used:
* music beats, as Bailando computes them: the audio resampled to sr = fps * 512 Hz (Bailando: 60 fps,
  30720 Hz), so that the onset envelope's default hop of 512 samples is one video frame;
  ``librosa.effects.percussive`` (HPSS, margin 1), ``librosa.onset.onset_strength(y=perc, sr,
  aggregate=np.median)``, ``librosa.beat.beat_track(onset_envelope=env, sr)``: the beats are envelope frames,
  i.e. video frames. Only beats before frame T - 1 are kept (Bailando's ``get_mb(key, length)`` with length
  = the T - 1 velocity samples), so a beat on the last frame does not count.
* motion beats: kinetic velocity v[i] = mean over the 68 points of |lm[i+1] - lm[i]| (i = 0..T-2, as
  Bailando indexes it), Gaussian-smoothed (``scipy.ndimage.gaussian_filter1d``, sigma 5 frames), motion
  beats = its local minima (``scipy.signal.argrelextrema(v, np.less)``).
* score = mean over music beats b of exp(-d(b)^2 / (2 * 9)), d(b) = distance in frames to the nearest
  motion beat. In [0, 1]; higher is better.
Frames without a face (NaN rows) are filled by linear interpolation before the velocity is taken.
"""

from __future__ import annotations

import os

import numpy as np

from singer.evaluate.metrics.base import MetricResult, as_landmarks, valid_rows, video_landmarks

SIGMA_FRAMES = 5.0
BEAT_SIGMA2 = 9.0  # the 9 of exp(-d^2 / 2 / 9)
HOP = 512  # onset-envelope hop; the audio is resampled to fps * HOP Hz so that one hop is one video frame


def bas_from_beats(music_beats, motion_beats) -> float:
    """Bailando's BA: mean over music beats of exp(-min_m (m - b)^2 / 18). NaN if either set is empty."""
    music = np.asarray(music_beats, np.float64).ravel()
    motion = np.asarray(motion_beats, np.float64).ravel()
    if music.size == 0 or motion.size == 0:
        return float("nan")
    d2 = ((motion[None, :] - music[:, None]) ** 2).min(axis=1)
    return float(np.mean(np.exp(-d2 / 2.0 / BEAT_SIGMA2)))


def beat_sample_rate(fps: float) -> int:
    """The rate Bailando analyses music at for a given frame rate: fps * 512 (12800 Hz at 25 fps)."""
    return int(round(float(fps) * HOP))


def music_beats(audio: np.ndarray, sr: int, fps: float, n_frames: int | None = None) -> np.ndarray:
    """Beat positions as video frame indices (int array, increasing); with `n_frames` = T, only those before
    T - 1 (the frames the T - 1 kinetic-velocity samples cover)."""
    import librosa

    warm_up()
    y = np.asarray(audio, np.float32).ravel()
    if y.size == 0:
        return np.zeros(0, int)
    rate = beat_sample_rate(fps)
    if int(sr) != rate:
        y = librosa.resample(y, orig_sr=int(sr), target_sr=rate)
    perc = librosa.effects.percussive(y)
    env = librosa.onset.onset_strength(y=perc, sr=rate, hop_length=HOP, aggregate=np.median)
    _, beats = librosa.beat.beat_track(onset_envelope=env, sr=rate, hop_length=HOP)
    frames = np.asarray(beats, int)
    if n_frames is not None:
        frames = frames[frames < int(n_frames) - 1]
    return np.unique(frames)


_COMPILED = False


def warm_up() -> None:
    """Compile (or load) librosa's numba beat tracker once per process, one process at a time.

    librosa caches its numba gufuncs on disk. On a fresh install two processes compiling them at the same
    moment (two Ray workers, two pytest workers) left a corrupt cache, and every later call segfaulted inside
    numba's gufunc (measured 2026-11-21; deleting librosa's __pycache__/*.nbi/*.nbc cured it). A file lock
    makes the first compile happen in one process while the others wait and then read the finished cache.
    """
    global _COMPILED
    if _COMPILED:
        return
    import tempfile

    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), "singer-librosa-numba.lock")):
        _COMPILED = True
        t = np.arange(16000 * 2) / 16000.0
        clicks = (np.sin(2 * np.pi * 220 * t) * (np.mod(t, 0.5) < 0.05)).astype(np.float32)
        music_beats(clicks, 16000, 25.0)


def kinetic_velocity(landmarks: np.ndarray, sigma: float = SIGMA_FRAMES) -> np.ndarray:
    """(T-1,) smoothed mean landmark displacement between consecutive frames."""
    from scipy.ndimage import gaussian_filter1d

    lm = as_landmarks(landmarks).copy()
    ok = valid_rows(lm)
    if ok.sum() < 2:
        raise ValueError("fewer than 2 frames with landmarks")
    if not ok.all():  # interpolate missing frames coordinate-wise
        t = np.arange(len(lm))
        flat = lm.reshape(len(lm), -1)
        for c in range(flat.shape[1]):
            flat[~ok, c] = np.interp(t[~ok], t[ok], flat[ok, c])
        lm = flat.reshape(lm.shape)
    vel = np.linalg.norm(lm[1:] - lm[:-1], axis=-1).mean(axis=1)
    return gaussian_filter1d(vel, sigma) if sigma > 0 else vel


def motion_beats(landmarks: np.ndarray, sigma: float = SIGMA_FRAMES) -> np.ndarray:
    """Local minima of the smoothed kinetic velocity (indices into the (T-1,) velocity, as Bailando)."""
    from scipy.signal import argrelextrema

    return argrelextrema(kinetic_velocity(landmarks, sigma), np.less)[0]


def bas(landmarks: np.ndarray, audio: np.ndarray, sr: int, fps: float) -> MetricResult:
    lm = as_landmarks(landmarks)
    ok = valid_rows(lm)
    if ok.sum() < 2:
        return MetricResult.unavailable("fewer than 2 frames with a face", missing=int((~ok).sum()))
    music = music_beats(audio, sr, fps, len(lm))
    motion = motion_beats(lm)
    if music.size == 0:
        return MetricResult.unavailable("no music beat found in the audio", motion_beats=int(motion.size))
    if motion.size == 0:
        return MetricResult.unavailable("no motion beat (the smoothed velocity has no local minimum)",
                                        music_beats=int(music.size))
    return MetricResult.ok(bas_from_beats(music, motion), music_beats=int(music.size),
                           motion_beats=int(motion.size), missing=int((~ok).sum()))


def metric(*, generated=None, gen_landmarks=None, audio=None, sample_rate=None, fps=None, upsample=None,
           **_) -> MetricResult:
    if audio is None or sample_rate is None or fps is None:
        return MetricResult.unavailable("BAS needs the audio, its sample rate and the video fps")
    if gen_landmarks is None and generated is not None:
        gen_landmarks = video_landmarks(generated, upsample)
    if gen_landmarks is None:
        return MetricResult.unavailable("BAS needs generated frames (or their landmarks)")
    return bas(gen_landmarks, audio, int(sample_rate), float(fps))
