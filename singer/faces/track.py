"""Following one face through a clip's frames: detection on every frame (cheaply, in a window around the
previous face, with a whole-frame search on keyframes), 68 landmarks per frame, and gap filling in time.

The rules (scales, keyframes, how a second face is counted) are the crop stage's, described step 1 of
`singer.data.crop`'s docstring; the settings are `CropConfig`'s (`crop.*` in params.yaml).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from singer.config import CropConfig
from singer.faces.detect import HOG_MIN_FACE, Box, box_side, detect_region, iou, search_faces
from singer.faces.landmarks import landmarks68

ROI_FACTOR = 1.6  # tracking window side, x the previous face box side (2.0 until 2026-12: 1.5x slower, same faces)
MAX_DETECT_SIDE = 1280  # cap on the long side of a rescaled whole-frame detection image


def _search(frame: np.ndarray, cc: CropConfig) -> list[tuple[Box, float]]:
    """Whole-frame search without a prior, coarse to fine (`search_faces`, the one portraits get too)."""
    return search_faces(frame, cc.detect_max_side, cc.min_face_px, cc.min_face_score)


def _whole_at_face_scale(frame: np.ndarray, face_side: float, cc: CropConfig) -> list[tuple[Box, float]]:
    """Whole-frame detection rescaled so that the tracked face (`face_side` pixels) measures at least
    detect_face_px and a face `second_face_ratio` times its size is still above HOG's 80 px window."""
    h, w = frame.shape[:2]
    target = max(cc.detect_face_px, HOG_MIN_FACE / max(cc.second_face_ratio, 1e-3))
    scale = min(target / max(face_side, 1.0), MAX_DETECT_SIDE / max(h, w))
    return [f for f in detect_region(frame, 0, 0, w, h, scale) if f[1] >= cc.min_face_score]


def _window(frame: np.ndarray, prev: Box, cc: CropConfig) -> list[tuple[Box, float]]:
    """Detection in a window ROI_FACTOR x the previous box, rescaled so the face is detect_face_px."""
    h, w = frame.shape[:2]
    side = box_side(prev)
    cx, cy = (prev[0] + prev[2]) / 2, (prev[1] + prev[3]) / 2
    half = ROI_FACTOR * side / 2
    x0, y0 = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    x1, y1 = min(w, int(np.ceil(cx + half)) + 1), min(h, int(np.ceil(cy + half)) + 1)
    scale = cc.detect_face_px / max(side, 1.0)
    return [f for f in detect_region(frame, x0, y0, x1, y1, scale) if f[1] >= cc.min_face_score]


def _pick(faces: list[tuple[Box, float]], prev: Box | None) -> tuple[Box, float] | None:
    if not faces:
        return None
    if prev is not None:
        best = max(faces, key=lambda f: (iou(f[0], prev), f[1]))
        if iou(best[0], prev) > 0:
            return best
    return faces[0]  # sorted by score


@dataclass
class Track:
    """Per-frame detection results of one clip."""

    boxes: np.ndarray                 # (T, 4) detector boxes in source pixels, NaN where missing
    scores: np.ndarray                # (T,) detection scores, NaN where missing
    landmarks: np.ndarray             # (T, 68, 2) source pixels, NaN where missing
    keyframes: list[int] = field(default_factory=list)
    multi_face: list[int] = field(default_factory=list)  # keyframes with a second face
    second_scores: list[float] = field(default_factory=list)
    stopped_at: int | None = None     # frame where tracking gave up (too many missing frames)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent: detect, landmarks

    @property
    def detected(self) -> np.ndarray:
        return ~np.isnan(self.scores)


def track_faces(frames: np.ndarray, cc: CropConfig, max_missing: int | None = None) -> Track:
    """Detect and follow the face through (T, H, W, 3) frames and fit 68 landmarks on each frame.

    Stops early (Track.stopped_at) once more than `max_missing` frames have no face.
    """
    n = len(frames)
    track = Track(np.full((n, 4), np.nan), np.full(n, np.nan), np.full((n, 68, 2), np.nan, np.float32))
    prev: Box | None = None
    missing = 0
    every = max(1, int(cc.redetect_every))
    t_detect = t_landmarks = 0.0
    for t, frame in enumerate(frames):
        t0 = time.perf_counter()
        key = prev is None or t % every == 0
        chosen = None
        if not key:
            chosen = _pick(_window(frame, prev, cc), prev)
        if chosen is None:
            faces = _whole_at_face_scale(frame, box_side(prev), cc) if prev is not None else []
            if not faces and (prev is None or key):
                faces = _search(frame, cc)  # no prior, or a keyframe: look for any size of face
            chosen = _pick(faces, prev)
            if key and chosen is not None:
                track.keyframes.append(t)
                side = box_side(chosen[0])
                others = [f for f in faces if f[0] != chosen[0] and box_side(f[0]) >= cc.second_face_ratio * side]
                if others:
                    track.multi_face.append(t)
                    track.second_scores.append(max(f[1] for f in others))
        t1 = time.perf_counter()
        t_detect += t1 - t0
        if chosen is None:
            missing += 1
            if max_missing is not None and missing > max_missing:
                track.stopped_at = t
                break
            continue
        box, score = chosen
        track.boxes[t] = box
        track.scores[t] = score
        track.landmarks[t] = landmarks68(frame, box)
        t_landmarks += time.perf_counter() - t1
        prev = box
    track.seconds = {"detect": t_detect, "landmarks": t_landmarks}
    return track


def fill_missing(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation over time of (T, ...) values at the frames where `valid` is False."""
    values = np.array(values, dtype=np.float64)
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        raise ValueError("no valid frame to interpolate from")
    if len(idx) == len(values):
        return values
    t = np.arange(len(values))
    flat = values.reshape(len(values), -1)
    for j in range(flat.shape[1]):
        flat[:, j] = np.interp(t, idx, flat[idx, j])
    return flat.reshape(values.shape)
