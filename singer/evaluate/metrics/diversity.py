"""Diversity of head and face motion (the paper's "Diversity"), landmark-based.

Definition used: the standard deviation over time (population, ddof = 0) of each of the 136 landmark
coordinates of a video (dlib 68 points x (x, y), pixels at the evaluated resolution), averaged over the
coordinates. Frames without a face are dropped (counted). A static face gives 0; every point moving as
x(t) = x0 + A sin(2 pi t / P) over whole periods (y fixed) gives A / sqrt(2) on x and 0 on y, so
A / (2 sqrt 2) overall. NOT comparable to numbers computed from Hopenet head poses.
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import MetricResult, as_landmarks, valid_rows, video_landmarks


def diversity(landmarks: np.ndarray) -> MetricResult:
    """Diversity of a (T, 68, 2) landmark sequence (NaN rows = no face)."""
    lm = as_landmarks(landmarks)
    ok = valid_rows(lm)
    missing = int((~ok).sum())
    if ok.sum() < 2:
        return MetricResult.unavailable("fewer than 2 frames with a face", frames=int(ok.sum()), missing=missing)
    return MetricResult.ok(float(lm[ok].std(axis=0).mean()), frames=int(ok.sum()), missing=missing)


def metric(*, generated=None, gen_landmarks=None, upsample=None, **_) -> MetricResult:
    if gen_landmarks is None and generated is not None:
        gen_landmarks = video_landmarks(generated, upsample)
    if gen_landmarks is None:
        return MetricResult.unavailable("Diversity needs generated frames (or their landmarks)")
    return diversity(gen_landmarks)
