"""Face detection with dlib's HOG frontal face detector, and the box helpers every face user shares.

dlib's detector and its model files (the 68-point shape predictor, the face recognition ResNet) run offline.
The `face_recognition_models` package that ships the files is located without importing it (its `__init__`
imports `pkg_resources`, which setuptools >= 81 no longer ships; DESIGN.md section 6).

Boxes are (x0, y0, x1, y1) in pixels, as dlib reports them (pixel centres are integers).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, as dlib reports them

HOG_MIN_FACE = 85  # px: the smallest face HOG finds reliably without upsampling (its window is 80 px)


def model_dir() -> Path:
    """The `models/` folder of the installed `face_recognition_models` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed (pip install face_recognition_models)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models"
    if not path.is_dir():
        raise RuntimeError(f"face_recognition_models has no models/ folder at {path}")
    return path


@functools.lru_cache(maxsize=1)
def get_detector():
    """dlib's HOG + linear SVM frontal face detector (cached)."""
    import dlib

    return dlib.get_frontal_face_detector()


def dlib_image(image: np.ndarray) -> np.ndarray:
    """The image as dlib takes it: uint8 (H, W) or (H, W, 3), alpha dropped, contiguous. Raises ValueError."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"image must be (H,W) or (H,W,3), got {image.shape}")
    return np.ascontiguousarray(image)


def detect_faces(
    image_rgb: np.ndarray, upsample: int = 0, threshold: float = -0.5
) -> list[tuple[Box, float]]:
    """Detect frontal faces. Returns [(box (x0,y0,x1,y1), score)] sorted by score, best first.

    The threshold is deliberately permissive (-0.5) so that callers see weak candidates with their
    scores and judge "several faces" by score and size: with upsampling, HOG reports low-scoring
    false faces (DESIGN section 6).
    """
    image = dlib_image(image_rgb)
    rects, scores, _ = get_detector().run(image, int(upsample), float(threshold))
    found = [
        ((float(r.left()), float(r.top()), float(r.right()), float(r.bottom())), float(s))
        for r, s in zip(rects, scores)
    ]
    found.sort(key=lambda item: -item[1])
    return found


def box_side(box: Box) -> float:
    """The larger of a box's width and height."""
    return float(max(box[2] - box[0], box[3] - box[1]))


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_region(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int, scale: float,
                  upsample: int = 0) -> list[tuple[Box, float]]:
    """Detect faces in frame[y0:y1, x0:x1] rescaled by `scale`; boxes come back in frame coordinates."""
    region = frame[y0:y1, x0:x1]
    h, w = region.shape[:2]
    if h < 8 or w < 8:
        return []
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        region = cv2.resize(region, size, interpolation=interp)
    sx, sy = size[0] / w, size[1] / h
    out = []
    for (bx0, by0, bx1, by1), score in detect_faces(region, upsample):
        box = (x0 + (bx0 + 0.5) / sx - 0.5, y0 + (by0 + 0.5) / sy - 0.5,
               x0 + (bx1 + 0.5) / sx - 0.5, y0 + (by1 + 0.5) / sy - 0.5)
        out.append((box, float(score)))
    return out


def search_faces(image: np.ndarray, detect_max_side: int = 320, min_face_px: int = 80,
                 min_score: float = 0.3) -> list[tuple[Box, float]]:
    """A whole image searched coarse to fine, without a prior; the first level with a face answers.

    The first level is the image with its long side at `detect_max_side` (fast, finds the big faces); each
    next one doubles the scale, up to the one at which a face of `min_face_px` source pixels measures HOG's
    85-px window (x1.06 for 80 px: a phone photo's small face is searched at full resolution), and at least
    to x4 of the first level (dlib's own upsampling, x2 then x4, for small images, as before). Boxes in
    source pixels, best first; candidates below `min_score` are dropped."""
    h, w = image.shape[:2]
    first = min(1.0, detect_max_side / max(h, w))
    finest = max(HOG_MIN_FACE / max(min_face_px, 1), 4 * first)
    scale = first
    while True:
        doublings = math.log2(scale) if scale > 1 else 0.0
        if doublings and doublings == round(doublings):   # x2, x4 of the full image: dlib's upsampling
            found = detect_region(image, 0, 0, w, h, 1.0, int(doublings))
        else:
            found = detect_region(image, 0, 0, w, h, scale, 0)
        faces = [f for f in found if f[1] >= min_score]
        if faces or scale >= finest:
            return faces
        scale = min(2 * scale, finest)


def detect_scaled(image: np.ndarray, scale: float, upsample: int = 0) -> list[tuple[Box, float]]:
    """Faces in the whole image rescaled by `scale` (then dlib-upsampled); boxes in source pixels, best first."""
    h, w = image.shape[:2]
    return detect_region(image, 0, 0, w, h, scale, upsample)
