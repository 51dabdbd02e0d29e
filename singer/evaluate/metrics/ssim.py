"""SSIM (Wang, Bovik, Sheikh and Simoncelli 2004), as the paper reports it.

Definition used: per frame, scikit-image ``structural_similarity(gt, gen, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255, channel_axis=-1)`` -- Wang's settings: 11x11 Gaussian window
(sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population covariances, mean over the three
channels -- then the mean over frames. Higher is better; 1 for identical videos.
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import MetricResult, check_pair


def ssim_frame(generated: np.ndarray, ground_truth: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            ground_truth,
            generated,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=-1,
        )
    )


def ssim(generated: np.ndarray, ground_truth: np.ndarray) -> float:
    """Mean per-frame SSIM of two (T, H, W, 3) uint8 videos of the same shape."""
    g, t = check_pair(generated, ground_truth)
    return float(np.mean([ssim_frame(g[i], t[i]) for i in range(len(g))]))


def metric(*, generated=None, ground_truth=None, **_) -> MetricResult:
    if generated is None or ground_truth is None:
        return MetricResult.unavailable("SSIM needs generated and ground-truth frames")
    return MetricResult.ok(ssim(generated, ground_truth), frames=int(len(np.asarray(generated))))
