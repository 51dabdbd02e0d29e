"""Crop geometry: the square crop of a face (its side from the face size, its centre from the rigid landmarks,
smoothed in time), the crop itself, and source points mapped into it.

How "face crop with scale ratio 0.8" is read, and why the centre follows the rigid landmarks, is step 3 of
`singer.data.crop`'s docstring. Coordinates: pixel centres are integers (a W-wide image spans
[-0.5, W - 0.5]); a source point x maps into the crop as u = (x - x0) * resolution / side - 0.5.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np

from singer.config import CropConfig
from singer.faces.landmarks import RIGID
from singer.faces.track import fill_missing


@dataclass
class Geometry:
    centres: np.ndarray     # (T, 2) smoothed crop centres, source pixels
    raw_centres: np.ndarray  # (T, 2) unsmoothed (rigid centre + offset), interpolated where missing
    side: float             # crop side, source pixels
    face_px: float          # face size (landmark extent), source pixels
    jumps: np.ndarray       # (T-1,) raw centre jumps / face size, NaN where not measurable

    def boxes(self) -> np.ndarray:
        half = self.side / 2
        return np.concatenate([self.centres - half, self.centres + half], axis=1)


def face_size(landmarks: np.ndarray) -> np.ndarray:
    """Larger side of the landmarks' bounding box, (..., 68, 2) -> (...)."""
    extent = landmarks.max(axis=-2) - landmarks.min(axis=-2)
    return extent.max(axis=-1)


def crop_geometry(landmarks: np.ndarray, detected: np.ndarray, cc: CropConfig) -> Geometry:
    """Crop centres (smoothed), side and jitter from per-frame landmarks (NaN rows where not detected)."""
    from scipy.ndimage import gaussian_filter1d

    lm = landmarks[detected].astype(np.float64)
    size = float(np.median(face_size(lm)))
    rigid = np.full((len(landmarks), 2), np.nan)
    rigid[detected] = lm[:, RIGID].mean(axis=1)
    box_centre = (lm.max(axis=1) + lm.min(axis=1)) / 2
    offset = np.median(box_centre - rigid[detected], axis=0)
    raw = fill_missing(rigid, detected) + offset
    centres = gaussian_filter1d(raw, cc.smooth_sigma, axis=0, mode="nearest") if cc.smooth_sigma > 0 else raw
    jumps = np.full(max(len(landmarks) - 1, 0), np.nan)
    idx = np.flatnonzero(detected)
    for a, b in itertools.pairwise(idx):
        jumps[a] = np.linalg.norm(rigid[b] - rigid[a]) / (b - a) / max(size, 1e-9)
    return Geometry(centres, raw, size / cc.scale, size, jumps)


def crop_frame(frame: np.ndarray, centre: np.ndarray, side: float, resolution: int) -> np.ndarray:
    """The square of `side` source pixels centred on `centre`, resized to resolution^2 (edges replicated)."""
    m = max(1, int(side // resolution))
    inter = resolution * m
    a = inter / side
    x0, y0 = centre[0] - side / 2, centre[1] - side / 2
    warp = np.float64([[a, 0, -x0 * a - 0.5], [0, a, -y0 * a - 0.5]])
    out = cv2.warpAffine(frame, warp, (inter, inter), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if m > 1:
        out = cv2.resize(out, (resolution, resolution), interpolation=cv2.INTER_AREA)
    return out


def to_crop(points: np.ndarray, centres: np.ndarray, side: float, resolution: int) -> np.ndarray:
    """Source points (T, K, 2) -> crop pixels, with per-frame crop centres (T, 2)."""
    origin = centres[:, None, :] - side / 2
    return (points - origin) * (resolution / side) - 0.5
