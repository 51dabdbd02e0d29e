"""dlib's 68-point landmarks (iBUG 68, weights from `face_recognition_models`), the landmark groups the
project uses, and THE mouth-opening measure.

Landmark indices (iBUG 68): jaw 0-16, brows 17-26, nose 27-35, right eye 36-41, left eye 42-47,
outer lip 48-59, inner lip 60-67.
"""

from __future__ import annotations

import functools

import numpy as np

from singer.faces.detect import Box, detect_faces, dlib_image, model_dir

# Landmark groups (iBUG 68).
RIGID = np.r_[0:3, 14:17, 27:36, 36:48]   # upper jaw near the ears, nose, eyes: unmoved by the mouth
JAW_BROWS = np.r_[0:27]
BROWS = np.r_[17:27]
OUTER_LIP = np.r_[48:60]
CHIN, NOSE_TOP = 8, 27
# Inner-lip pairs (upper, lower) whose distances define the mouth opening.
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)


@functools.lru_cache(maxsize=1)
def get_predictor():
    """dlib's 68-point shape predictor (cached)."""
    import dlib

    return dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))


def landmarks68(image_rgb: np.ndarray, box: Box) -> np.ndarray:
    """The 68 landmarks (x, y) inside a face box -> (68, 2) float32."""
    import dlib

    image = dlib_image(image_rgb)
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


def mouth_width(landmarks: np.ndarray) -> np.ndarray | float:
    """The mouth width of the project: the distance between the outer lip corners (48, 54) divided by the
    inter-ocular distance. Scale-free; it narrows for rounded vowels (/u/, /o/) and widens for spread ones (/i/).

    landmarks: (68, 2) -> float; (..., 68, 2) -> array of shape (...).
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.shape[-2:] != (68, 2):
        raise ValueError(f"landmarks must be (..., 68, 2), got {lm.shape}")
    value = np.linalg.norm(lm[..., 54, :] - lm[..., 48, :], axis=-1) / np.maximum(inter_ocular(lm), 1e-9)
    return float(value) if np.ndim(value) == 0 else value


def detect_landmarks(
    image_rgb: np.ndarray, upsample_schedule: tuple[int, ...] = (0, 1, 2)
) -> tuple[np.ndarray, Box, float] | None:
    """Find the best face, trying each upsampling level in turn until one is found, and return
    (landmarks (68, 2) float32, box, score), or None when no level finds a face.

    Only candidates with a positive score count as found (the permissive threshold of `detect_faces`
    is for callers that want to inspect weak candidates).
    """
    image = dlib_image(image_rgb)
    for upsample in upsample_schedule:
        faces = [f for f in detect_faces(image, upsample) if f[1] > 0]
        if faces:
            box, score = faces[0]
            return landmarks68(image, box), box, score
    return None
