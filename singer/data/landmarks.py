"""Face detection and 68-point landmarks with dlib (weights from `face_recognition_models`), and the
project's mouth-opening measure.

dlib's HOG frontal face detector and the iBUG 68-point shape predictor both run offline. The
`face_recognition_models` package is located without importing it (its `__init__` imports
`pkg_resources`, which setuptools >= 81 no longer ships).

Landmark indices (iBUG 68): jaw 0-16, brows 17-26, nose 27-35, right eye 36-41, left eye 42-47,
outer lip 48-59, inner lip 60-67.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, as dlib reports them

# Inner-lip pairs (upper, lower) whose distances define the mouth opening.
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)


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


@functools.lru_cache(maxsize=1)
def get_predictor():
    """dlib's 68-point shape predictor (cached)."""
    import dlib

    return dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
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
    image = _as_rgb_uint8(image_rgb)
    rects, scores, _ = get_detector().run(image, int(upsample), float(threshold))
    found = [
        ((float(r.left()), float(r.top()), float(r.right()), float(r.bottom())), float(s))
        for r, s in zip(rects, scores)
    ]
    found.sort(key=lambda item: -item[1])
    return found


def landmarks68(image_rgb: np.ndarray, box: Box) -> np.ndarray:
    """The 68 landmarks (x, y) inside a face box -> (68, 2) float32."""
    import dlib

    image = _as_rgb_uint8(image_rgb)
    x0, y0, x1, y1 = (round(v) for v in box)
    shape = get_predictor()(image, dlib.rectangle(x0, y0, x1, y1))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def inter_ocular(landmarks: np.ndarray) -> np.ndarray | float:
    """Distance between the eye centres (mean of 36-41 and of 42-47). landmarks: (..., 68, 2)."""
    lm = np.asarray(landmarks, np.float64)
    right = lm[..., RIGHT_EYE, :].mean(axis=-2)
    left = lm[..., LEFT_EYE, :].mean(axis=-2)
    d = np.linalg.norm(left - right, axis=-1)
    return float(d) if np.ndim(d) == 0 else d


def mouth_opening(landmarks: np.ndarray) -> np.ndarray | float:
    """THE mouth-opening measure of the project: the mean inner-lip gap (61-67, 62-66, 63-65) divided
    by the inter-ocular distance. Scale-free; about 0 for a closed mouth.

    landmarks: (68, 2) -> float; (..., 68, 2) -> array of shape (...).
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape[-2:] != (68, 2):
        raise ValueError(f"landmarks must be (..., 68, 2), got {lm.shape}")
    gaps = [np.linalg.norm(lm[..., a, :] - lm[..., b, :], axis=-1) for a, b in INNER_LIP_PAIRS]
    gap = np.mean(gaps, axis=0)
    value = gap / np.maximum(inter_ocular(lm), 1e-9)
    return float(value) if np.ndim(value) == 0 else value


def detect_landmarks(
    image_rgb: np.ndarray, upsample_schedule: tuple[int, ...] = (0, 1, 2)
) -> tuple[np.ndarray, Box, float] | None:
    """Find the best face, trying each upsampling level in turn until one is found, and return
    (landmarks (68, 2) float32, box, score), or None when no level finds a face.

    Only candidates with a positive score count as found (the permissive threshold of `detect_faces`
    is for callers that want to inspect weak candidates).
    """
    image = _as_rgb_uint8(image_rgb)
    for upsample in upsample_schedule:
        faces = [f for f in detect_faces(image, upsample) if f[1] > 0]
        if faces:
            box, score = faces[0]
            return landmarks68(image, box), box, score
    return None
