"""LMD, landmark distance of the mouth (Chen et al. 2018, "Lip movements generation at a glance"), as the
paper reports it.

Definition used: dlib 68-point landmarks of generated and ground-truth frames (both from
`base.video_landmarks`, the same detector and preprocessing); the 20 mouth points 48-67; each frame's
mouth centroid is subtracted on each side (so a global shift of the face does not count); the mean
Euclidean distance over the 20 points, then the mean over frames. Units: pixels at the evaluated
resolution. Frames where either side has no face are dropped and counted. Lower is better.
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import MetricResult, as_landmarks, check_pair, valid_rows, video_landmarks

MOUTH = slice(48, 68)


def lmd_per_frame(generated_landmarks: np.ndarray, truth_landmarks: np.ndarray) -> np.ndarray:
    """(T,) mouth landmark distance per frame (NaN where either side is missing)."""
    g = as_landmarks(generated_landmarks, "generated landmarks")[:, MOUTH]
    t = as_landmarks(truth_landmarks, "ground-truth landmarks")[:, MOUTH]
    if g.shape != t.shape:
        raise ValueError(f"landmark sequences differ in shape: {g.shape} vs {t.shape}")
    g = g - g.mean(axis=1, keepdims=True)
    t = t - t.mean(axis=1, keepdims=True)
    return np.linalg.norm(g - t, axis=-1).mean(axis=1)


def lmd(generated_landmarks: np.ndarray, truth_landmarks: np.ndarray) -> MetricResult:
    """LMD from (T, 68, 2) landmarks of both sides (NaN rows = no face)."""
    per = lmd_per_frame(generated_landmarks, truth_landmarks)
    ok = valid_rows(as_landmarks(generated_landmarks)) & valid_rows(as_landmarks(truth_landmarks))
    missing = int((~ok).sum())
    if not ok.any():
        return MetricResult.unavailable("no frame has a face on both sides", frames=len(per), missing=missing)
    return MetricResult.ok(float(per[ok].mean()), frames=int(ok.sum()), missing=missing)


def lmd_videos(generated: np.ndarray, ground_truth: np.ndarray, upsample: int | None = None) -> MetricResult:
    """LMD from (T, H, W, 3) uint8 videos: dlib landmarks of both with `video_landmarks`."""
    g, t = check_pair(generated, ground_truth)
    return lmd(video_landmarks(g, upsample), video_landmarks(t, upsample))


def metric(*, generated=None, ground_truth=None, gen_landmarks=None, gt_landmarks=None, upsample=None,
           **_) -> MetricResult:
    if gen_landmarks is None and generated is not None:
        gen_landmarks = video_landmarks(generated, upsample)
    if gt_landmarks is None and ground_truth is not None:
        gt_landmarks = video_landmarks(ground_truth, upsample)
    if gen_landmarks is None or gt_landmarks is None:
        return MetricResult.unavailable("LMD needs generated and ground-truth frames (or their landmarks)")
    return lmd(gen_landmarks, gt_landmarks)
