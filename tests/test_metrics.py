"""The exact, offline metrics of `singer.evaluate.metrics` (definitions in reference/metrics.md)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage import color, data, filters
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from singer.evaluate.metrics import METRICS, MetricResult, compute
from singer.evaluate.metrics import bas as bas_mod
from singer.evaluate.metrics.base import video_landmarks
from singer.evaluate.metrics.cpbd import cpbd, cpbd_frame, to_grey255
from singer.evaluate.metrics.diversity import diversity
from singer.evaluate.metrics.identity import identity_similarity
from singer.evaluate.metrics.lmd import lmd
from singer.evaluate.metrics.mouth import curve_correlation, mouth_correlation, mouth_width_correlation
from singer.evaluate.metrics.psnr import PSNR_CAP, psnr
from singer.evaluate.metrics.ssim import ssim


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


def _random_pair(rng, t=3, h=40, w=48):
    a = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    noise = rng.normal(0, 20, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    return b, a


def _landmarks(rng, t=6):
    return rng.uniform(10, 90, (t, 68, 2))


# ------------------------------------------------------------------ SSIM / PSNR
def test_ssim_matches_skimage():
    gen, gt = _random_pair(np.random.default_rng(0))
    expected = np.mean([
        structural_similarity(gt[i], gen[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=255, channel_axis=-1)
        for i in range(len(gt))
    ])
    assert ssim(gen, gt) == pytest.approx(expected, abs=1e-12)
    assert ssim(gt, gt) == pytest.approx(1.0)


def test_psnr_matches_skimage_and_caps():
    gen, gt = _random_pair(np.random.default_rng(1))
    expected = np.mean([peak_signal_noise_ratio(gt[i], gen[i], data_range=255) for i in range(len(gt))])
    assert psnr(gen, gt) == pytest.approx(expected, abs=1e-9)
    assert psnr(gt, gt) == PSNR_CAP
    mixed = gen.copy()
    mixed[0] = gt[0]
    per = [PSNR_CAP] + [peak_signal_noise_ratio(gt[i], gen[i], data_range=255) for i in (1, 2)]
    assert psnr(mixed, gt) == pytest.approx(np.mean(per))


def test_shape_mismatch_raises():
    gen, gt = _random_pair(np.random.default_rng(2))
    with pytest.raises(ValueError):
        ssim(gen[:2], gt)


# ------------------------------------------------------------------ CPBD
def test_cpbd_reference_value_and_blur(astronaut):
    assert cpbd_frame(astronaut) == pytest.approx(0.3855, abs=0.002)
    blurred = filters.gaussian(to_grey255(astronaut), sigma=2, preserve_range=True)
    assert cpbd_frame(blurred) < 0.05
    # the video form is the mean over frames (a 2-frame video of the same frame)
    assert cpbd(np.stack([astronaut, astronaut]), max_frames=1) == pytest.approx(0.3855, abs=0.002)
    grey = np.round(color.rgb2gray(astronaut) * 255)
    np.testing.assert_array_equal(to_grey255(astronaut), grey)


# ------------------------------------------------------------------ LMD
def test_lmd_zero_known_scale_and_translation_invariant():
    rng = np.random.default_rng(3)
    gt = _landmarks(rng)
    assert lmd(gt, gt).value == 0.0
    scaled = gt.copy()
    mouth = gt[:, 48:68]
    c = mouth.mean(axis=1, keepdims=True)
    scaled[:, 48:68] = c + 1.1 * (mouth - c)
    expected = 0.1 * np.linalg.norm(mouth - c, axis=-1).mean()
    assert lmd(scaled, gt).value == pytest.approx(expected, rel=1e-9)
    shifted = scaled + rng.normal(0, 5, (len(gt), 1, 2))  # a different shift per frame
    assert lmd(shifted, gt).value == pytest.approx(expected, rel=1e-9)


def test_lmd_drops_missing_and_unavailable():
    gt = _landmarks(np.random.default_rng(4))
    gen = gt.copy()
    gen[1] = np.nan
    res = lmd(gen, gt)
    assert res.is_ok and res.value == 0.0 and res.details["missing"] == 1
    res = lmd(np.full_like(gt, np.nan), gt)
    assert res.status == "unavailable" and res.value is None and res.reason


# ------------------------------------------------------------------ Diversity
def test_diversity_static_and_oscillation():
    base = _landmarks(np.random.default_rng(5), t=1)
    static = np.repeat(base, 20, axis=0)
    assert diversity(static).value == pytest.approx(0.0, abs=1e-12)
    a, period, periods = 3.0, 10, 4
    t = np.arange(period * periods)
    moving = np.repeat(base, len(t), axis=0).copy()
    moving[:, :, 0] += a * np.sin(2 * np.pi * t / period)[:, None]
    assert diversity(moving).value == pytest.approx(a / (2 * math.sqrt(2)), rel=1e-9)
    assert diversity(static[:1]).status == "unavailable"


# ------------------------------------------------------------------ BAS
def test_bas_from_beats_coincide_and_drift():
    music = np.array([10, 30, 50, 70])
    assert bas_mod.bas_from_beats(music, music) == 1.0
    scores = [bas_mod.bas_from_beats(music, music + k) for k in range(6)]
    assert scores[0] == 1.0
    assert all(b < a for a, b in zip(scores, scores[1:]))
    assert scores[3] == pytest.approx(math.exp(-9 / 18))
    assert math.isnan(bas_mod.bas_from_beats([], music))


def test_motion_beats_at_planted_pauses():
    # the head moves, then pauses every 20 frames: the smoothed velocity has its minima at the pauses
    n, pauses = 100, np.array([20, 40, 60, 80])
    speed = np.ones(n - 1)
    for p in pauses:
        speed[p - 3 : p + 4] = 0.0  # odd width: one strict minimum at p
    x = np.concatenate([[0.0], np.cumsum(speed)])
    lm = np.zeros((n, 68, 2)) + x[:, None, None]
    beats = bas_mod.motion_beats(lm)
    found = [beats[np.argmin(np.abs(beats - p))] for p in pauses]
    assert np.all(np.abs(np.array(found) - pauses) <= 1)


def _drum_track(sr, seconds, beat_times, rng):
    y = np.zeros(int(sr * seconds))
    n = int(0.08 * sr)
    env = np.exp(-np.arange(n) / (0.012 * sr))
    kick = env * (rng.normal(0, 1, n) * 0.5 + np.sin(2 * np.pi * 90 * np.arange(n) / sr))
    for t in beat_times:
        i = int(round(t * sr))
        y[i : i + n] += kick[: len(y) - i]
    return (y / np.abs(y).max() * 0.8).astype(np.float32)


@pytest.mark.slow  # librosa's numba JIT on first use: ~10-20 s cold
def test_music_beats_on_synthetic_drums():
    sr, fps, seconds = 11025, 25.0, 8.0
    interval = 12 / fps  # 125 bpm, 12 video frames per beat
    planted = np.arange(0.24, seconds - 0.1, interval)
    y = _drum_track(sr, seconds, planted, np.random.default_rng(6))
    n_frames = int(seconds * fps)
    beats = bas_mod.music_beats(y, sr, fps, n_frames)
    planted_frames = np.round(planted * fps)
    assert len(beats) >= len(planted_frames) - 2
    for b in beats:
        assert np.min(np.abs(planted_frames - b)) <= 1
    # the whole metric: a head that pauses on each beat aligns well, a shifted one worse
    def head(offset):
        speed = np.ones(n_frames - 1)
        for f in planted_frames.astype(int) + offset:
            speed[max(f - 3, 0) : f + 4] = 0.0
        x = np.concatenate([[0.0], np.cumsum(speed)])
        return np.zeros((n_frames, 68, 2)) + x[:, None, None]

    aligned = bas_mod.bas(head(0), y, sr, fps)
    off = bas_mod.bas(head(6), y, sr, fps)
    assert aligned.is_ok and aligned.value > 0.8
    assert off.value < aligned.value - 0.3


def test_beats_are_analysed_at_bailandos_rate():
    assert bas_mod.beat_sample_rate(60) == 30720  # Bailando's AIST++ setting: 60 fps, sr 15360 * 2
    assert bas_mod.beat_sample_rate(25) == 12800 and bas_mod.HOP == 512  # one envelope hop per video frame


@pytest.mark.slow  # librosa's numba JIT on first use
def test_a_beat_on_the_last_frame_does_not_count():
    """Bailando keeps the music beats before T - 1 (`get_mb(key, length)`, length = the T - 1 velocity
    samples): a clip that ends on a beat does not score it."""
    sr, fps = 16000, 25.0
    planted = np.arange(5, 160, 12)
    y = _drum_track(sr, 7.0, planted / fps, np.random.default_rng(1))
    detected = bas_mod.music_beats(y, sr, fps)
    assert all(np.min(np.abs(planted - f)) <= 1 for f in detected) and len(detected) >= len(planted) - 2
    last = int(detected[-2])
    n_frames = last + 1  # the clip's last frame is a beat
    kept = bas_mod.music_beats(y, sr, fps, n_frames)
    assert last not in kept and list(kept) == [int(f) for f in detected if f < last]
    assert last in bas_mod.music_beats(y, sr, fps, n_frames + 1)  # one frame more and it counts


# ------------------------------------------------------------------ mouth correlation
def test_mouth_curve_correlation():
    t = np.linspace(0, 4 * np.pi, 40)
    curve = 0.2 + 0.1 * np.sin(t)
    assert curve_correlation(curve, curve).value == pytest.approx(1.0)
    assert curve_correlation(-curve, curve).value == pytest.approx(-1.0)
    with_nan = curve.copy()
    with_nan[3] = np.nan
    res = curve_correlation(with_nan, curve)
    assert res.value == pytest.approx(1.0) and res.details["dropped"] == 1
    assert curve_correlation(np.full(40, 0.3), curve).status == "unavailable"
    assert curve_correlation(curve[:2], curve[:2]).status == "unavailable"


@pytest.fixture(scope="module")
def synth_take():
    """10 frames of the synthetic singer at 128^2 with a planted mouth opening."""
    from singer.data.synth_face import FaceAnimator, Pose, make_variant

    animator = FaceAnimator(make_variant(0, 0, 128), 128)
    openings = [0.02, 0.1, 0.25, 0.4, 0.3, 0.15, 0.05, 0.35, 0.2, 0.02]
    rendered = [animator.render(o, Pose(0.0, 0.0, 0.0)) for o in openings]
    return np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])


def test_mouth_correlation_on_detected_synthetic_frames(synth_take):
    frames, truth_lm = synth_take
    gen_lm = video_landmarks(frames)
    assert np.isfinite(gen_lm).all()
    res = mouth_correlation(gen_lm, truth_lm)
    assert res.is_ok and res.value > 0.8
    # the 64^2 version (x2 cubic upsampling before dlib), landmarks mapped back to 64^2 pixels
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames])
    small_lm = video_landmarks(small)
    assert np.isfinite(small_lm).all()
    assert np.abs(small_lm - (truth_lm + 0.5) / 2 + 0.5).mean() < 2.0
    assert mouth_correlation(small_lm, truth_lm).value > 0.8
    # the registry computes the same from frames
    out = compute(["mouth_correlation", "lmd", "diversity"], generated=frames, ground_truth=frames)
    assert out["mouth_correlation"].value == pytest.approx(1.0)
    assert out["lmd"].value == 0.0


def test_mouth_width_correlation_on_detected_synthetic_frames():
    """Planted widths (rounded 0.7 to spread 1.2) under a varying opening: dlib reads the width, not the
    opening, back at 128^2 and at 64^2; the truth may be landmarks or a curve; a constant width is unavailable."""
    from singer.data.synth_face import FaceAnimator, Pose, make_variant
    from singer.faces import mouth_width

    animator = FaceAnimator(make_variant(0, 0, 128), 128)
    widths = [1.0, 0.72, 0.85, 1.2, 1.1, 0.8, 0.95, 1.15, 0.7, 1.05]
    openings = [0.05, 0.3, 0.1, 0.2, 0.35, 0.15, 0.25, 0.05, 0.3, 0.2]
    rendered = [animator.render(o, Pose(0.0, 0.0, 0.0), w) for o, w in zip(openings, widths)]
    frames, truth_lm = np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])
    gen_lm = video_landmarks(frames)
    res = mouth_width_correlation(gen_lm, truth_lm)
    assert res.is_ok and res.value > 0.9
    assert mouth_width_correlation(gen_lm, mouth_width(truth_lm)).value == pytest.approx(res.value)
    assert abs(mouth_correlation(gen_lm, mouth_width(truth_lm)).value) < 0.6  # the opening is not the width
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames])
    assert mouth_width_correlation(video_landmarks(small), truth_lm).value > 0.8
    out = compute(["mouth_width_correlation"], generated=frames, truth_width=mouth_width(truth_lm))
    assert out["mouth_width_correlation"].value == pytest.approx(res.value)
    flat = mouth_width_correlation(gen_lm, np.full(len(frames), 0.9))
    assert flat.status == "unavailable" and "mouth-width" in flat.reason


# ------------------------------------------------------------------ identity
@pytest.mark.slow  # loads dlib's ResNet, embeds at 256^2 and upscaled LFW faces
def test_identity_similarity(astronaut):
    crop = astronaut[0:256, 96:352]  # the face
    shifted = np.roll(crop, (3, -2), axis=(0, 1))
    same = identity_similarity(shifted[None], crop)
    assert same.is_ok and same.value > 0.9 and same.details["no_face"] == 0
    faces = data.lfw_subset()
    for face in faces[:20]:
        other = cv2.resize(np.round(face * 255).astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
        res = identity_similarity(np.stack([other] * 3, axis=-1)[None], crop)
        if res.is_ok:
            break
    assert res.is_ok and res.value < same.value and res.details["distance"] > same.details["distance"]
    blank = np.zeros((2, 64, 64, 3), np.uint8)
    assert identity_similarity(blank, crop).status == "unavailable"


def test_registry_unavailable_without_inputs():
    assert set(METRICS) >= {"ssim", "psnr", "cpbd", "lmd", "diversity", "bas", "identity", "mouth_correlation"}
    for name, fn in METRICS.items():
        res = fn()
        assert isinstance(res, MetricResult) and res.status == "unavailable" and res.reason, name
