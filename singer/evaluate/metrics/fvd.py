"""FVD: Fréchet distance between Gaussian fits of I3D features of real and generated 16-frame clips.

Reference (reference/metrics.md; the StyleGAN-V / common PyTorch FVD code): Kinetics-400 I3D, clips of
16 frames resized to 224x224 (bilinear, align_corners False) and scaled to [-1, 1]; features are the
400-d pre-softmax logits (`InceptionI3d.forward`: the final `logits` 1x1x1 conv after the 2x7x7 average
pool; a TorchScript file is called with ``rescale=False, resize=False, return_features=True``, which
returns the same logits); mu = mean, sigma = `np.cov(rowvar=False)`.

The matrix square root: with full-rank covariances (more clips than feature dimensions on both sides),
`scipy.linalg.sqrtm(sigma1 @ sigma2)` with pytorch-fid's handling of singular products (eps*I offset) and of
tiny imaginary parts. With fewer clips the covariances are rank-deficient and that product's square root is
ill-conditioned (a set of 50 clips against itself: -9e-5, where 0 is right), so the trace is taken as TF-GAN's
`trace_sqrt_product` (and VideoGPT's FVD) takes it: Tr sqrt(A^1/2 B A^1/2) with symmetric square roots from
an eigendecomposition, which is exact for positive semi-definite matrices of any rank.

Weights are the user's (`SINGER_I3D_PATH` or an argument). Without them the result is "unavailable"
with the reason, never a number from another network. Batch-norm eps: as `load_i3d` chose it for the
weights' format (see singer.evaluate.networks.i3d), reported in `details`.

Clips: one 16-frame clip per video by default (frames 0-15), as the common FVD code takes them;
`clips_per_video` = k takes up to k non-overlapping clips (0-15, 16-31, ...), None all of them. More clips
of the same video are not independent samples, and the estimator's bias over few videos stays. The clip
counts, the covariance ranks, the eps and the square-root method are always in `details`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from singer.evaluate.metrics.base import MetricResult, as_video
from singer.evaluate.networks.i3d import ENV_VAR, WeightsUnavailable, load_i3d

CLIP_LEN = 16
SIZE = 224
FEATURE_DIM = 400


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
    symmetric: bool = False,
) -> float:
    """||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    symmetric: the trace by `trace_sqrt_product` (rank-deficient covariances). Otherwise as pytorch-fid:
    `linalg.sqrtm(sigma1 @ sigma2)`; if the result is not finite (singular product),
    retry with ``eps * I`` added to both covariances; imaginary parts from numerical error are dropped
    (the real part is kept, as StyleGAN-V's FVD does).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    if symmetric:
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # StyleGAN-V's FVD keeps the real part; with rank-deficient covariances (few clips) the
        # imaginary residue can exceed pytorch-fid's 1e-3 check without meaning a wrong input.
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _null_to_zero(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those in its null space (below the rank tolerance of
    `np.linalg.matrix_rank`: max * n * machine eps) set to 0. A square root would blow that rounding noise up
    (1e-14 -> 1e-7, summed over hundreds of null directions); TF-GAN leaves values below 1e-10 unrooted for
    the same reason."""
    tol = max(float(values.max(initial=0.0)), 0.0) * len(values) * np.finfo(np.float64).eps
    return np.where(values > tol, values, 0.0)


def symmetric_sqrt(a: np.ndarray) -> np.ndarray:
    """The positive semi-definite square root of a symmetric PSD matrix."""
    values, vectors = np.linalg.eigh((a + a.T) / 2.0)
    return (vectors * np.sqrt(_null_to_zero(values))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrt(sigma1 sigma2) = Tr sqrt(s sigma2 s), s = sigma1^1/2: the second matrix is symmetric PSD, so
    its root's trace is the sum of the roots of its eigenvalues (TF-GAN `trace_sqrt_product`)."""
    root = symmetric_sqrt(sigma1)
    inner = root @ sigma2 @ root
    return float(np.sqrt(_null_to_zero(np.linalg.eigvalsh((inner + inner.T) / 2.0))).sum())


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # SciPy >= 1.16 deprecates `disp` (and then returns the array alone): call it plainly.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "singular matrix" notes; checked by isfinite
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), covariance (D, D) with the N-1 normalisation (np.cov, rowvar False)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def video_clips(
    video: np.ndarray, clip_len: int = CLIP_LEN, max_clips: int | None = 1
) -> list[np.ndarray]:
    """Up to `max_clips` (None: all) non-overlapping `clip_len`-frame clips of a (T, H, W, 3) uint8 video, from
    its first frame on (a shorter video gives none)."""
    v = as_video(video)
    n = v.shape[0] // clip_len
    if max_clips is not None:
        n = min(n, int(max_clips))
    return [v[i * clip_len : (i + 1) * clip_len] for i in range(n)]


def preprocess_clips(clips: Sequence[np.ndarray] | np.ndarray, size: int = SIZE) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 RGB -> (N, 3, T, size, size) float32 in [-1, 1] (bilinear resize)."""
    x = torch.from_numpy(
        np.ascontiguousarray(np.stack(list(clips)) if not isinstance(clips, np.ndarray) else clips)
    )
    n, t, h, w, c = x.shape
    x = x.reshape(n * t, h, w, c).permute(0, 3, 1, 2).float() / 255.0
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x * 2.0 - 1.0
    return x.reshape(n, t, c, size, size).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def i3d_features(
    model: torch.nn.Module, clips: Sequence[np.ndarray], batch_size: int = 4, size: int = SIZE
) -> np.ndarray:
    """I3D logits of the clips -> (N, 400) float64."""
    out = []
    for i in range(0, len(clips), batch_size):
        out.append(model(preprocess_clips(clips[i : i + batch_size], size)).double().cpu().numpy())
    return np.concatenate(out, 0) if out else np.zeros((0, FEATURE_DIM))


def fvd_from_features(real_features: np.ndarray, fake_features: np.ndarray, **conventions) -> MetricResult:
    """FVD of two (N, D) feature sets (any N >= 2 each; rank-deficient below D + 1, noted and computed with
    symmetric square roots). `conventions` (e.g. bn_eps, clips_per_video) go into `details` as given."""
    real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
    details = {
        "n_clips_real": int(real.shape[0]),
        "n_clips_fake": int(fake.shape[0]),
        "feature_dim": int(real.shape[-1]),
        **conventions,
    }
    if real.shape[0] < 2 or fake.shape[0] < 2:
        return MetricResult.unavailable("FVD needs at least 2 clips on each side", **details)
    dim = real.shape[-1]
    rank_deficient = min(real.shape[0], fake.shape[0]) <= dim
    (mu_real, sigma_real), (mu_fake, sigma_fake) = gaussian_stats(real), gaussian_stats(fake)
    value = frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake, symmetric=rank_deficient)
    details.update(rank_deficient=bool(rank_deficient),
                   covariance_rank_real=int(np.linalg.matrix_rank(sigma_real)),
                   covariance_rank_fake=int(np.linalg.matrix_rank(sigma_fake)),
                   sqrt="symmetric eigendecomposition" if rank_deficient else "scipy.linalg.sqrtm")
    note = None
    if rank_deficient:
        note = (
            f"covariance rank-deficient: {real.shape[0]} real / {fake.shape[0]} generated clips for {dim}-d features; "
            "not comparable to FVDs over many clips"
        )
    return MetricResult.ok(value, note, **details)


def fvd(
    real_videos: Iterable[np.ndarray],
    fake_videos: Iterable[np.ndarray],
    i3d_path: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    clips_per_video: int | None = 1,
    batch_size: int = 4,
    bn_eps: float | None = None,
) -> MetricResult:
    """FVD between real and generated videos ((T, H, W, 3) uint8 RGB each, any size, >= 16 frames).

    `model` (an already loaded I3D) wins over `i3d_path`, which wins over `$SINGER_I3D_PATH`; `bn_eps` is
    passed to `load_i3d` (None: the weights' format decides). Unavailable, with the reason, when no weights
    can be loaded or too few clips exist.
    """
    if model is None:
        try:
            model = load_i3d(i3d_path, bn_eps=bn_eps)
        except WeightsUnavailable as exc:
            return MetricResult.unavailable(str(exc), env_var=ENV_VAR)
    real_clips = [c for v in real_videos for c in video_clips(v, max_clips=clips_per_video)]
    fake_clips = [c for v in fake_videos for c in video_clips(v, max_clips=clips_per_video)]
    if len(real_clips) < 2 or len(fake_clips) < 2:
        return MetricResult.unavailable(
            f"FVD needs at least 2 clips of {CLIP_LEN} frames on each side "
            f"(got {len(real_clips)} real, {len(fake_clips)} generated)",
            n_clips_real=len(real_clips),
            n_clips_fake=len(fake_clips),
        )
    model = model.eval()
    return fvd_from_features(
        i3d_features(model, real_clips, batch_size), i3d_features(model, fake_clips, batch_size),
        bn_eps=getattr(model, "bn_eps", None), clips_per_video=clips_per_video,
    )


__all__ = [
    "CLIP_LEN",
    "FEATURE_DIM",
    "frechet_distance",
    "fvd",
    "fvd_from_features",
    "gaussian_stats",
    "i3d_features",
    "preprocess_clips",
    "symmetric_sqrt",
    "trace_sqrt_product",
    "video_clips",
]
