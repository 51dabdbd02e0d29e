"""Geometry of the synthetic singers' faces: the face's axes from its landmarks, a similarity fit, and the
backward piecewise-affine warp over a fixed triangulation of control points (landmarks plus the canvas border)
that `synth_face` animates a portrait with (one `cv2.remap` per frame, built from a rasterised
triangle-index map: per-pixel scikit-image warps are too slow for a corpus, DESIGN.md section 6).
"""

from __future__ import annotations

import cv2
import numpy as np


def face_axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(right unit vector along the eye line, down unit vector perpendicular to it, eye distance)."""
    right_eye, left_eye = lm[36:42].mean(0), lm[42:48].mean(0)
    across = left_eye - right_eye
    iod = float(np.linalg.norm(across))
    across = across / iod
    down = np.array([-across[1], across[0]])
    if np.dot(lm[57] - lm[27], down) < 0:
        down = -down
    return across, down, iod


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama) taking points `src` onto `dst`, as a 2x3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s)
    sign = 1.0 if np.linalg.det(u @ vt) >= 0 else -1.0
    rot = u @ np.diag([1.0, sign]) @ vt
    scale = (sig * [1.0, sign]).sum() / (s**2).sum()
    lin = scale * rot
    return np.concatenate([lin, (mu_d - lin @ mu_s)[:, None]], axis=1)


def border_points(width: int, height: int, per_side: int = 4) -> np.ndarray:
    xs = np.linspace(0, width - 1, per_side + 1)
    ys = np.linspace(0, height - 1, per_side + 1)
    pts = (
        [(x, 0) for x in xs]
        + [(x, height - 1) for x in xs]
        + [(0, y) for y in ys[1:-1]]
        + [(width - 1, y) for y in ys[1:-1]]
    )
    return np.asarray(pts, np.float64)


class PiecewiseAffine:
    """Backward piecewise-affine warp over a fixed triangulation (indices into the control points)."""

    def __init__(self, triangles: np.ndarray, canvas_shape: tuple[int, int]):
        self.triangles = np.asarray(triangles, np.int64)
        self.canvas_shape = canvas_shape

    def affines(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """(n_tri, 2, 3) affine maps taking destination triangles onto source triangles."""
        d = dst[self.triangles]  # (n, 3, 2)
        s = src[self.triangles]
        a = np.concatenate([d, np.ones(d.shape[:2] + (1,))], axis=2)  # (n, 3, 3)
        det = np.linalg.det(a)
        bad = np.abs(det) < 1e-9
        a[bad] = np.eye(3)  # degenerate destination triangle: covers no pixel; any map will do
        s = s.copy()
        s[bad] = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        return np.transpose(np.linalg.solve(a, s), (0, 2, 1))

    def raster(self, dst: np.ndarray) -> np.ndarray:
        """Triangle index of every canvas pixel for the destination control points (-1: none)."""
        h, w = self.canvas_shape
        index = np.full((h, w), -1, np.int32)
        pts = np.round(dst[self.triangles] * 16).astype(np.int32)
        for i, tri in enumerate(pts):
            cv2.fillConvexPoly(index, tri, int(i), lineType=cv2.LINE_8, shift=4)
        return index

    def maps(self, src: np.ndarray, dst: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Source coordinates (…, 2) for destination canvas coordinates `query` (…, 2)."""
        h, w = self.canvas_shape
        index = self.raster(dst)
        qi = np.clip(np.round(query[..., 1]).astype(np.int64), 0, h - 1)
        qj = np.clip(np.round(query[..., 0]).astype(np.int64), 0, w - 1)
        tri = index[qi, qj]
        aff = self.affines(src, dst)
        identity = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        m = np.concatenate([aff, identity], axis=0)[tri]  # tri == -1 (no triangle) -> the identity, last
        x, y = query[..., 0], query[..., 1]
        return np.stack(
            [
                m[..., 0, 0] * x + m[..., 0, 1] * y + m[..., 0, 2],
                m[..., 1, 0] * x + m[..., 1, 1] * y + m[..., 1, 2],
            ],
            axis=-1,
        )


def signed_areas(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    p = points[triangles]
    return 0.5 * (
        (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
        - (p[:, 2, 0] - p[:, 0, 0]) * (p[:, 1, 1] - p[:, 0, 1])
    )


def warp_image(image: np.ndarray, src: np.ndarray, dst: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Warp `image` so that control points `src` land on `dst` (same canvas)."""
    h, w = image.shape[:2]
    pa = PiecewiseAffine(triangles, (h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = pa.maps(src, dst, np.stack([xx, yy], axis=-1)).astype(np.float32)
    return cv2.remap(
        image, coords[..., 0], coords[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
