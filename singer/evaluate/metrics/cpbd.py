"""CPBD, the cumulative probability of blur detection (Narvekar and Karam 2011), no-reference sharpness.

Implementation: the ``cpbd`` module of the PyPI package ``cpbd-py312`` (the original ``cpbd`` package
imports ``scipy.ndimage.imread`` and fails on current SciPy): Canny edges decide the 64x64 edge blocks
(> 0.2 % edge pixels), Sobel edges and the Marziliano edge width, just-noticeable-blur width 5 when the
block contrast <= 50 else 3, P_blur = 1 - exp(-|w / w_JNB|^3.6), score = fraction of edges with
P_blur <= 0.63.

Greyscale conversion (THE one used): ``np.round(skimage.color.rgb2gray(rgb) * 255)`` as float64 --
ITU-R BT.709 luma (0.2125 R + 0.7154 G + 0.0721 B) rounded to integer grey levels, as reading an 8-bit
greyscale image gives. It reproduces the reference value 0.3855 on ``skimage.data.astronaut()``
(unrounded ``rgb2gray * 255`` gives 0.349, OpenCV's BT.601 grey 0.3836, truncation to uint8 0.3839).
Score per frame, mean over (optionally subsampled) frames. Higher is sharper.
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import MetricResult, as_video, subsample_indices


def to_grey255(frame_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float64 integer grey levels 0-255 (BT.709, rounded)."""
    from skimage.color import rgb2gray

    return np.round(rgb2gray(np.asarray(frame_rgb)) * 255.0)


def cpbd_frame(frame_rgb: np.ndarray) -> float:
    import cpbd as _cpbd

    frame = np.asarray(frame_rgb)
    grey = to_grey255(frame) if frame.ndim == 3 else np.asarray(frame, np.float64)
    return float(_cpbd.compute(grey))


def cpbd(frames: np.ndarray, every: int = 1, max_frames: int | None = None) -> float:
    """Mean CPBD over the frames of a (T, H, W, 3) uint8 video (every `every`-th frame, at most
    `max_frames` evenly spread)."""
    video = as_video(frames, "frames")
    idx = subsample_indices(len(video), every, max_frames)
    return float(np.mean([cpbd_frame(video[i]) for i in idx]))


def metric(*, generated=None, cpbd_every: int = 1, cpbd_max_frames: int | None = None, **_) -> MetricResult:
    if generated is None:
        return MetricResult.unavailable("CPBD needs generated frames")
    try:
        import cpbd as _cpbd  # noqa: F401
    except ImportError as exc:
        return MetricResult.unavailable(f"the cpbd module is not installed (pip install cpbd-py312): {exc}")
    n = len(subsample_indices(len(np.asarray(generated)), cpbd_every, cpbd_max_frames))
    return MetricResult.ok(cpbd(generated, cpbd_every, cpbd_max_frames), frames=n)
