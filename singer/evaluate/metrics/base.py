"""Shared conventions of the metrics.

* Videos are (T, H, W, 3) uint8 RGB arrays; landmarks (T, 68, 2) float (pixels, NaN rows where no face);
  audio (S,) float at a given sample rate.
* A metric result is a `MetricResult`: ``value`` (float or None), ``status`` ("ok" | "unavailable"),
  ``reason`` (why unavailable, or a note) and ``details`` (counts such as frames without a face).
  A metric that cannot be computed is "unavailable" with a reason, never a made-up number.
* `video_landmarks` is THE way generated and ground-truth frames get their 68 dlib landmarks, so that
  both sides of a comparison see the same detector and preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

OK = "ok"
UNAVAILABLE = "unavailable"


@dataclass
class MetricResult:
    value: float | None
    status: str = OK
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, value: float, reason: str | None = None, **details: Any) -> MetricResult:
        return cls(float(value), OK, reason, dict(details))

    @classmethod
    def unavailable(cls, reason: str, **details: Any) -> MetricResult:
        return cls(None, UNAVAILABLE, str(reason), dict(details))

    @property
    def is_ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_video(frames: np.ndarray, what: str = "video") -> np.ndarray:
    """Check and return a (T, H, W, 3) uint8 video (a single (H, W, 3) frame becomes T = 1)."""
    v = np.asarray(frames)
    if v.ndim == 3 and v.shape[-1] == 3:
        v = v[None]
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"{what} must be (T, H, W, 3), got {v.shape}")
    if v.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {v.dtype}")
    return v


def check_pair(generated: np.ndarray, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, t = as_video(generated, "generated"), as_video(ground_truth, "ground_truth")
    if g.shape != t.shape:
        raise ValueError(f"generated {g.shape} and ground truth {t.shape} differ in shape")
    return g, t


def as_landmarks(landmarks: np.ndarray, what: str = "landmarks") -> np.ndarray:
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"{what} must be (T, 68, 2), got {lm.shape}")
    return lm


def auto_upsample(height: int, width: int) -> int:
    """The cubic upscaling factor before dlib's HOG detector (DESIGN section 6: the astronaut face is
    found directly at >= 96 px, at 48-64 px only after x2, at 32 px after x4)."""
    side = min(height, width)
    if side >= 96:
        return 1
    if side >= 48:
        return 2
    return 4


def video_landmarks(
    frames: np.ndarray, upsample: int | None = None, upsample_schedule: tuple[int, ...] = (0, 1)
) -> np.ndarray:
    """dlib 68 landmarks of every frame -> (T, 68, 2) float64 in the frames' pixels, NaN rows where no
    face is found.

    Each frame is first enlarged by the integer factor `upsample` with cv2.INTER_CUBIC (None: 1 at
    >= 96 px, 2 at 48-95 px, 4 below, see `auto_upsample`), then `singer.faces.detect_landmarks`
    runs with dlib's own pyramid `upsample_schedule` (the best face with a positive score), and the
    points are mapped back to the original pixel grid with the pixel-centre convention
    x = (x_up + 0.5) / k - 0.5. Sequential: dlib is not thread-safe.
    """
    from singer.faces import detect_landmarks

    video = as_video(frames, "frames")
    t, h, w = video.shape[:3]
    k = auto_upsample(h, w) if upsample is None else max(1, int(upsample))
    out = np.full((t, 68, 2), np.nan, np.float64)
    for i in range(t):
        frame = video[i]
        if k > 1:
            frame = cv2.resize(frame, (w * k, h * k), interpolation=cv2.INTER_CUBIC)
        found = detect_landmarks(frame, upsample_schedule)
        if found is not None:
            out[i] = (found[0].astype(np.float64) + 0.5) / k - 0.5
    return out


def valid_rows(landmarks: np.ndarray) -> np.ndarray:
    """(T,) bool: frames whose 68 points are all finite."""
    return np.isfinite(np.asarray(landmarks, np.float64)).all(axis=(-1, -2))


def subsample_indices(n: int, every: int = 1, max_frames: int | None = None) -> np.ndarray:
    """Frame indices 0, every, 2*every, ...; thinned evenly to at most `max_frames`."""
    idx = np.arange(0, n, max(1, int(every)))
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, int(max_frames))).astype(int)]
    return idx


def finite_mean(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.mean(v)) if v.size and np.isfinite(v).all() else math.nan
