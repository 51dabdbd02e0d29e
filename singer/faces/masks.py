"""Face, lip and pose masks from crop-space landmarks (Hallo-style), uint8 {0, 1}, unions over a clip's frames.

- `face`: convex hull of the jaw and brows (0-26) with the brows raised by `FOREHEAD` x the
  chin-to-nose-bridge distance to take in the forehead;
- `lip`: convex hull of the outer lip (48-59), dilated by `LIP_MARGIN` x the mouth width;
- `pose`: the bounding boxes of the face region, grown by `POSE_GROW` about their centres: the region
  the head moves in. By construction lip is (nearly) inside face, and face inside pose.
"""

from __future__ import annotations

import cv2
import numpy as np

from singer.faces.landmarks import BROWS, CHIN, JAW_BROWS, NOSE_TOP, OUTER_LIP

FOREHEAD = 0.4    # brows raised by this x |chin - nose bridge| for the face mask
LIP_MARGIN = 0.15  # lip mask dilation, x mouth width
POSE_GROW = 1.1   # pose mask: face-region boxes grown by this factor about their centres


def face_region(landmarks: np.ndarray) -> np.ndarray:
    """Jaw + brows + forehead points (raised brows) of one frame: (68, 2) -> (37, 2)."""
    chin, top = landmarks[CHIN], landmarks[NOSE_TOP]
    up = top - chin
    length = float(np.linalg.norm(up))
    up = up / length if length > 0 else np.array([0.0, -1.0])
    forehead = landmarks[BROWS] + up * FOREHEAD * length
    return np.concatenate([landmarks[JAW_BROWS], forehead])


def _fill_hull(canvas: np.ndarray, points: np.ndarray) -> None:
    shift = 4
    hull = cv2.convexHull(np.round(points * (1 << shift)).astype(np.int32))
    cv2.fillConvexPoly(canvas, hull, 1, lineType=cv2.LINE_8, shift=shift)


def make_masks(landmarks: np.ndarray, resolution: int) -> dict[str, np.ndarray]:
    """Face, lip and pose masks (H, W) uint8 {0,1} from crop-space landmarks (T, 68, 2), unions over T."""
    shape = (resolution, resolution)
    face = np.zeros(shape, np.uint8)
    lip = np.zeros(shape, np.uint8)
    pose = np.zeros(shape, np.uint8)
    for lm in np.asarray(landmarks, np.float64):
        region = face_region(lm)
        _fill_hull(face, region)
        _fill_hull(lip, lm[OUTER_LIP])
        lo, hi = region.min(axis=0), region.max(axis=0)
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * POSE_GROW
        x0, y0 = np.clip(np.ceil(mid - half), 0, resolution).astype(int)
        x1, y1 = np.clip(np.floor(mid + half) + 1, 0, resolution).astype(int)
        pose[y0:y1, x0:x1] = 1
    width = float(np.median(np.linalg.norm(landmarks[:, 54] - landmarks[:, 48], axis=-1)))
    radius = max(1, round(LIP_MARGIN * width))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    lip = cv2.dilate(lip, kernel)
    return {"face": face, "lip": lip, "pose": pose}
