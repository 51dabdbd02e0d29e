"""Mouth-opening and mouth-width correlation with ground truth (beyond the paper; the opening is the quantity
of its Fig. 9 and 10, the width is the lip shape that singing's vowels change).

Definition used: the mouth-opening curve of a video is `singer.faces.mouth_opening` per frame
(mean inner-lip gap 61-67, 62-66, 63-65 over the inter-ocular distance) of its dlib landmarks
(`base.video_landmarks`); the width curve is `singer.faces.mouth_width` (lip corners 48-54 over the
inter-ocular distance). Each metric is Pearson's r between the generated curve and the ground-truth
curve (from the ground-truth frames' landmarks, or a given truth array such as the synthetic corpus's
``truth.json["mouth_opening"]`` / ``["mouth_width"]``), over the frames where both are finite. Unavailable
(with the reason) with fewer than `MIN_FRAMES` such frames or when either curve is constant there. In [-1, 1].
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import MetricResult, as_landmarks, video_landmarks

MIN_FRAMES = 3


def opening_curve(landmarks: np.ndarray) -> np.ndarray:
    """(T,) mouth opening per frame (NaN where no face)."""
    from singer.faces import mouth_opening

    return np.asarray(mouth_opening(as_landmarks(landmarks)), np.float64).reshape(-1)


def width_curve(landmarks: np.ndarray) -> np.ndarray:
    """(T,) mouth width per frame (NaN where no face)."""
    from singer.faces import mouth_width

    return np.asarray(mouth_width(as_landmarks(landmarks)), np.float64).reshape(-1)


def curve_correlation(generated_curve, truth_curve, min_frames: int = MIN_FRAMES,
                      what: str = "mouth-opening") -> MetricResult:
    g = np.asarray(generated_curve, np.float64).ravel()
    t = np.asarray(truth_curve, np.float64).ravel()
    if g.shape != t.shape:
        raise ValueError(f"curves differ in length: {g.shape} vs {t.shape}")
    ok = np.isfinite(g) & np.isfinite(t)
    n, dropped = int(ok.sum()), int((~ok).sum())
    if n < min_frames:
        return MetricResult.unavailable(f"only {n} frames with both curves (< {min_frames})", frames=n,
                                        dropped=dropped)
    g, t = g[ok] - g[ok].mean(), t[ok] - t[ok].mean()
    sg, st = float(np.sqrt(np.sum(g * g))), float(np.sqrt(np.sum(t * t)))
    scale = max(np.abs(g).max(initial=0.0), np.abs(t).max(initial=0.0), 1e-12)
    if sg <= 1e-9 * scale * np.sqrt(n) or sg == 0.0:
        return MetricResult.unavailable(f"the generated {what} curve is constant", frames=n, dropped=dropped)
    if st <= 1e-9 * scale * np.sqrt(n) or st == 0.0:
        return MetricResult.unavailable(f"the ground-truth {what} curve is constant", frames=n,
                                        dropped=dropped)
    r = float(np.clip(np.sum(g * t) / (sg * st), -1.0, 1.0))
    return MetricResult.ok(r, frames=n, dropped=dropped)


def mouth_correlation(generated_landmarks: np.ndarray, truth: np.ndarray) -> MetricResult:
    """r between the mouth opening of generated landmarks (T, 68, 2) and `truth`: either ground-truth
    landmarks (T, 68, 2) or a truth curve (T,)."""
    truth = np.asarray(truth, np.float64)
    truth_curve = truth if truth.ndim == 1 else opening_curve(truth)
    return curve_correlation(opening_curve(generated_landmarks), truth_curve)


def mouth_correlation_videos(generated: np.ndarray, ground_truth: np.ndarray | None = None,
                             truth_curve: np.ndarray | None = None, upsample: int | None = None) -> MetricResult:
    gen = video_landmarks(generated, upsample)
    if truth_curve is None:
        if ground_truth is None:
            raise ValueError("give ground_truth frames or a truth_curve")
        truth_curve = opening_curve(video_landmarks(ground_truth, upsample))
    return curve_correlation(opening_curve(gen), truth_curve)


def _landmark_metric(correlation, name: str, truth_curve, generated, ground_truth, gen_landmarks, gt_landmarks,
                     upsample) -> MetricResult:
    """The registry's call of a curve metric: landmarks from frames where not given, and the truth curve when
    there is one, else the ground truth's landmarks."""
    if gen_landmarks is None and generated is not None:
        gen_landmarks = video_landmarks(generated, upsample)
    if gen_landmarks is None:
        return MetricResult.unavailable(f"{name} needs generated frames (or their landmarks)")
    if truth_curve is not None:
        return correlation(gen_landmarks, np.asarray(truth_curve, np.float64).ravel())
    if gt_landmarks is None and ground_truth is not None:
        gt_landmarks = video_landmarks(ground_truth, upsample)
    if gt_landmarks is None:
        return MetricResult.unavailable(f"{name} needs ground-truth frames, landmarks or a truth curve")
    return correlation(gen_landmarks, gt_landmarks)


def metric(*, generated=None, ground_truth=None, gen_landmarks=None, gt_landmarks=None, truth_mouth=None,
           upsample=None, **_) -> MetricResult:
    return _landmark_metric(mouth_correlation, "mouth correlation", truth_mouth, generated, ground_truth,
                            gen_landmarks, gt_landmarks, upsample)


def mouth_width_correlation(generated_landmarks: np.ndarray, truth: np.ndarray) -> MetricResult:
    """r between the mouth width of generated landmarks (T, 68, 2) and `truth`: ground-truth landmarks
    (T, 68, 2) or a truth width curve (T,)."""
    truth = np.asarray(truth, np.float64)
    truth_curve = truth if truth.ndim == 1 else width_curve(truth)
    return curve_correlation(width_curve(generated_landmarks), truth_curve, what="mouth-width")


def width_metric(*, generated=None, ground_truth=None, gen_landmarks=None, gt_landmarks=None, truth_width=None,
                 upsample=None, **_) -> MetricResult:
    return _landmark_metric(mouth_width_correlation, "mouth-width correlation", truth_width, generated,
                            ground_truth, gen_landmarks, gt_landmarks, upsample)
