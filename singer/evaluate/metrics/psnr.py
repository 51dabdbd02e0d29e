"""PSNR, as the paper reports it.

Definition used: per frame ``20 * log10(255 / sqrt(MSE))`` with the MSE over all pixels and channels
(float64), identical frames (MSE = 0) capped at 100 dB rather than infinite, then the mean over frames.
Equals ``skimage.metrics.peak_signal_noise_ratio(gt, gen, data_range=255)`` for every non-identical frame.
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import MetricResult, check_pair

PSNR_CAP = 100.0


def psnr_frame(generated: np.ndarray, ground_truth: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(generated, np.float64) - np.asarray(ground_truth, np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 20.0 * np.log10(255.0 / np.sqrt(mse))))


def psnr(generated: np.ndarray, ground_truth: np.ndarray) -> float:
    """Mean per-frame PSNR (dB) of two (T, H, W, 3) uint8 videos of the same shape."""
    g, t = check_pair(generated, ground_truth)
    return float(np.mean([psnr_frame(g[i], t[i]) for i in range(len(g))]))


def metric(*, generated=None, ground_truth=None, **_) -> MetricResult:
    if generated is None or ground_truth is None:
        return MetricResult.unavailable("PSNR needs generated and ground-truth frames")
    return MetricResult.ok(psnr(generated, ground_truth), frames=int(len(np.asarray(generated))))
