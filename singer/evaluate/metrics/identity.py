"""Identity similarity to the reference (beyond the paper).

Definition used: dlib's 128-d face descriptor (`singer.faces.DlibFaceEmbedder`, ResNet on a 150 px
chip aligned from the 68 landmarks, padding 0.25) of the reference image and of each (optionally
subsampled) generated frame; landmarks come from `base.video_landmarks` for both (same detector and
preprocessing), and the frame is embedded at those landmarks; cosine similarity per frame; mean over the
frames with a face. Frames without a face are counted in ``details["no_face"]``; unavailable when the
reference or every frame has none. Note: dlib descriptors are not centred, so even different people
score a fairly high cosine (about 0.8-0.9); the Euclidean distance (dlib's same-person threshold 0.6) is
reported alongside in ``details["distance"]``.
"""

from __future__ import annotations

import numpy as np

from singer.evaluate.metrics.base import (
    MetricResult,
    as_video,
    subsample_indices,
    valid_rows,
    video_landmarks,
)


def _embed(embedder, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    return np.asarray(embedder.embed(image, landmarks=landmarks), np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def identity_similarity(
    generated: np.ndarray,
    reference: np.ndarray,
    every: int = 1,
    max_frames: int | None = None,
    upsample: int | None = None,
    embedder=None,
) -> MetricResult:
    """Mean cosine similarity of the generated frames' dlib embeddings to the reference image's.

    generated: (T, H, W, 3) uint8; reference: (H', W', 3) uint8.
    """
    if embedder is None:
        from singer.faces import DlibFaceEmbedder

        embedder = DlibFaceEmbedder()
    ref = as_video(reference, "reference")[0]
    ref_lm = video_landmarks(ref[None], upsample)[0]
    if not np.isfinite(ref_lm).all():
        return MetricResult.unavailable("no face found in the reference image")
    ref_emb = _embed(embedder, ref, ref_lm)

    video = as_video(generated, "generated")
    idx = subsample_indices(len(video), every, max_frames)
    lms = video_landmarks(video[idx], upsample)
    ok = valid_rows(lms)
    sims, dists = [], []
    for j in np.flatnonzero(ok):
        emb = _embed(embedder, video[idx[j]], lms[j])
        sims.append(cosine(emb, ref_emb))
        dists.append(float(np.linalg.norm(emb - ref_emb)))
    no_face = int((~ok).sum())
    if not sims:
        return MetricResult.unavailable("no face found in any generated frame", frames=len(idx), no_face=no_face)
    return MetricResult.ok(float(np.mean(sims)), frames=len(sims), no_face=no_face,
                           distance=float(np.mean(dists)))


def metric(*, generated=None, reference=None, identity_every: int = 1, identity_max_frames: int | None = None,
           upsample=None, **_) -> MetricResult:
    if generated is None or reference is None:
        return MetricResult.unavailable("identity similarity needs generated frames and the reference image")
    return identity_similarity(generated, reference, identity_every, identity_max_frames, upsample)
