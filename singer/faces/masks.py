"""Hallo's conditioning masks from crop-space landmarks: soft ``full`` / ``face`` / ``lip``, hard ``face_region``.

    m = make_masks(landmarks, 64)                  # a clip's (T, 68, 2) crop-space landmarks: training masks
    m = make_masks(lm[None], 64, INFERENCE_FACE_EXPAND, INFERENCE_LIP_EXPAND)   # one portrait (generation)
    m["full"], m["face"], m["lip"]   (64, 64) float32 in [0, 1]   the audio-attention masks (soft)
    m["face_region"]                 (64, 64) uint8 {0, 1}        the face locator's input (hard face box)

The rule is Hallo's (fudan-generative-vision/hallo at 8fd7c57; file:line below), on dlib's 68 points where Hallo
uses MediaPipe's 478:

1. **Boxes** (``hallo/utils/util.py:407-495``, ``expand_region`` ``:529-564``). The bounding box of the face
   silhouette and that of the outer lip, corners rounded to whole pixels, scaled about their (floored) centre by
   an expansion ratio (half side ``floor(side * ratio / 2)``; a box that leaves the image is shifted back in) and
   filled. Over a clip the per-frame boxes are united into their bounding box (``get_union_mask``,
   ``util.py:923-957``). Ratios: Hallo's training data (``ImageProcessorForDataProcessing.preprocess``,
   ``hallo/datasets/image_processor.py:304-305``) unites the boxes of every frame with ratio 1 for both
   (``get_union_face_mask`` / ``get_union_lip_mask`` default ``expand_ratio=1``); one image at inference
   (``get_mask``, ``util.py:497-527``, via ``image_processor.py:141``) enlarges the face box by
   ``face_expand_ratio`` = 1.2 (``configs/inference/default.yaml:41``) and the lip box by 2.0 (``get_lip_mask``'s
   default, ``util.py:407``): one still image must cover where the face and lips will move.
   Silhouette here: ``face_outline`` (jaw 0-16, brows 17-26, and the brows raised by ``FOREHEAD`` x the
   chin-to-nose-bridge distance, reaching the upper forehead as MediaPipe's face oval does); lip: the outer lip
   48-59 (MediaPipe's ``lip_ids`` are its outer lip contour).
2. **Blur** (``blur_mask``, ``util.py:589-609``): the hard box resized to a fixed 64x64 canvas whatever the image
   size (so the blur is relative to the image side), Gaussian blur with a 51x51 kernel for the face and 31x31 for
   the lip (sigma from the kernel size by OpenCV's rule: 8.0 and 5.0 canvas pixels), min-max normalised to [0, 1].
3. **Separation** (``image_processor.py:311-314``): ``full`` = 1 - blurred face (the background), ``face`` =
   max(blurred face - blurred lip, 0), ``lip`` = blurred lip. So full + face + lip = 1 wherever the blurred lip
   does not exceed the blurred face.
4. **face_region** (Hallo's ``face_mask``: the meta file's ``mask_path``, ``talk_video.py:212, 269-270``, and
   ``image_processor.py:143-146`` at inference; the face locator's input, ``scripts/train_stage2.py:142, 784-793``,
   ``scripts/inference.py:326``): the hard face box itself.

The soft masks are resized from the canvas back to the crop resolution (bilinear); the model resizes them to each
UNet level. Deliberate differences: float values where Hallo stores 8-bit PNGs (it rounds to 1/255), and a
box covering the whole canvas keeps its value instead of normalising to 0 (OpenCV's min-max of a constant image).
"""

from __future__ import annotations

import cv2
import numpy as np

from singer.faces.landmarks import BROWS, CHIN, JAW_BROWS, NOSE_TOP, OUTER_LIP

__all__ = [
    "BLUR_CANVAS",
    "FACE_KERNEL",
    "INFERENCE_FACE_EXPAND",
    "INFERENCE_LIP_EXPAND",
    "LIP_KERNEL",
    "TRAIN_FACE_EXPAND",
    "TRAIN_LIP_EXPAND",
    "blur_box",
    "expand_box",
    "face_outline",
    "make_masks",
]

FOREHEAD = 0.4               # brows raised by this x |chin - nose bridge| to reach the top of the face oval
TRAIN_FACE_EXPAND = 1.0      # Hallo's training data: get_union_face_mask(expand_ratio=1)
TRAIN_LIP_EXPAND = 1.0       # get_union_lip_mask(expand_ratio=1)
INFERENCE_FACE_EXPAND = 1.2  # one image at inference: configs/inference/default.yaml face_expand_ratio
INFERENCE_LIP_EXPAND = 2.0   # get_lip_mask(expand_ratio=2.0)
BLUR_CANVAS = 64             # blur_mask(resize_dim=(64, 64))
FACE_KERNEL = 51             # get_mask / preprocess: blur_mask(face, (64, 64), (51, 51))
LIP_KERNEL = 31              # blur_mask(lip, (64, 64), (31, 31))


def face_outline(landmarks: np.ndarray) -> np.ndarray:
    """Jaw + brows + forehead points (raised brows) of one frame: (68, 2) -> (37, 2), the face silhouette."""
    chin, top = landmarks[CHIN], landmarks[NOSE_TOP]
    up = top - chin
    length = float(np.linalg.norm(up))
    up = up / length if length > 0 else np.array([0.0, -1.0])
    forehead = landmarks[BROWS] + up * FOREHEAD * length
    return np.concatenate([landmarks[JAW_BROWS], forehead])


def expand_box(points: np.ndarray, ratio: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Hallo's box of (N, 2) points in crop pixels (pixel centres integers) -> (x0, y0, x1, y1), slice bounds.

    In Hallo's frame (pixel edges integers, so x + 0.5 here) the corners are rounded, the box is scaled by
    ``ratio`` about its floored centre with half side ``floor(side * ratio / 2)``, and shifted back inside the
    image where it leaves it (then clipped, where it is larger than the image)."""
    pts = np.asarray(points, np.float64) + 0.5
    lo, hi = np.round(pts.min(axis=0)), np.round(pts.max(axis=0))
    mid = np.floor((lo + hi) / 2)
    half = np.floor((hi - lo) * float(ratio) / 2)
    a, b = mid - half, mid + half
    size = np.array([width, height], np.float64)
    b = np.where(a < 0, b - a, b)
    a = np.maximum(a, 0)
    a = np.where(b > size, a - (b - size), a)
    b = np.minimum(b, size)
    a = np.maximum(a, 0)
    return int(a[0]), int(a[1]), int(b[0]), int(b[1])


def _union_box(boxes: list[tuple[int, int, int, int]], height: int, width: int) -> np.ndarray:
    """The bounding box of the boxes (Hallo's get_union_mask), filled: (H, W) uint8 {0, 1}."""
    out = np.zeros((height, width), np.uint8)
    boxes = [bx for bx in boxes if bx[2] > bx[0] and bx[3] > bx[1]]
    if boxes:
        arr = np.array(boxes)
        out[arr[:, 1].min():arr[:, 3].max(), arr[:, 0].min():arr[:, 2].max()] = 1
    return out


def blur_box(box: np.ndarray, kernel: int, canvas: int = BLUR_CANVAS) -> np.ndarray:
    """Hallo's blur_mask: (H, W) {0, 1} -> bilinear to canvas^2 -> Gaussian (kernel^2, sigma from the kernel)
    -> min-max to [0, 1]: (canvas, canvas) float32."""
    small = cv2.resize(box.astype(np.float32), (canvas, canvas), interpolation=cv2.INTER_LINEAR)
    blurred = cv2.GaussianBlur(small, (kernel, kernel), 0)
    lo, hi = float(blurred.min()), float(blurred.max())
    if hi - lo < 1e-6:  # a constant canvas (empty, or a box covering everything): keep it
        return np.clip(blurred, 0.0, 1.0)
    return (blurred - lo) / (hi - lo)


def make_masks(landmarks: np.ndarray, resolution: int, face_expand: float = TRAIN_FACE_EXPAND,
               lip_expand: float = TRAIN_LIP_EXPAND) -> dict[str, np.ndarray]:
    """Crop-space landmarks (T, 68, 2) -> ``full``, ``face``, ``lip`` (H, W) float32 in [0, 1] and
    ``face_region`` (H, W) uint8 {0, 1}, H = W = resolution; boxes united over the T frames."""
    res = int(resolution)
    lms = np.asarray(landmarks, np.float64).reshape(-1, 68, 2)
    face_boxes = [expand_box(face_outline(lm), face_expand, res, res) for lm in lms]
    lip_boxes = [expand_box(lm[OUTER_LIP], lip_expand, res, res) for lm in lms]
    face_hard = _union_box(face_boxes, res, res)
    lip_hard = _union_box(lip_boxes, res, res)
    face_soft = blur_box(face_hard, FACE_KERNEL)
    lip_soft = blur_box(lip_hard, LIP_KERNEL)
    separated = {
        "full": 1.0 - face_soft,
        "face": np.maximum(face_soft - lip_soft, 0.0),
        "lip": lip_soft,
    }
    out = {k: np.clip(cv2.resize(v, (res, res), interpolation=cv2.INTER_LINEAR), 0.0, 1.0).astype(np.float32)
           for k, v in separated.items()}
    out["face_region"] = face_hard
    return out
