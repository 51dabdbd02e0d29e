"""The exact, offline metrics (reference/metrics.md), one module each, and their registry.

Each module has a plain function (``ssim(generated, ground_truth) -> float``, ``lmd(gen_lm, gt_lm) ->
MetricResult``, ...) and a uniform ``metric(**inputs) -> MetricResult`` used by the registry. Inputs a
registry call may receive (keywords; a metric ignores those it does not need and is "unavailable" with a
reason when one it needs is missing):

    generated      (T, H, W, 3) uint8 RGB        ground_truth   (T, H, W, 3) uint8 RGB
    reference      (H, W, 3) uint8 RGB           audio, sample_rate, fps
    gen_landmarks / gt_landmarks  (T, 68, 2), NaN rows = no face (computed with
                   `base.video_landmarks` when absent; pass them to avoid running dlib once per metric)
    truth_mouth    (T,) ground-truth mouth-opening curve     truth_width    (T,) ground-truth mouth-width curve
    upsample, cpbd_every, cpbd_max_frames, identity_every, identity_max_frames

    from singer.evaluate.metrics import compute
    results = compute(["ssim", "lmd"], generated=gen, ground_truth=gt)   # {name: MetricResult}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from singer.evaluate.metrics import bas, cpbd, diversity, identity, lmd, mouth, psnr, ssim
from singer.evaluate.metrics.base import MetricResult, video_landmarks

METRICS: dict[str, Callable[..., MetricResult]] = {
    "ssim": ssim.metric,
    "psnr": psnr.metric,
    "cpbd": cpbd.metric,
    "lmd": lmd.metric,
    "diversity": diversity.metric,
    "bas": bas.metric,
    "identity": identity.metric,
    "mouth_correlation": mouth.metric,
    "mouth_width_correlation": mouth.width_metric,
}

LANDMARK_METRICS = ("lmd", "diversity", "bas", "mouth_correlation", "mouth_width_correlation")


def compute(names: Iterable[str] | None = None, **inputs) -> dict[str, MetricResult]:
    """Run the named metrics (all when None) on the same inputs. Landmarks of generated and ground-truth
    frames are computed once here (with `video_landmarks`) when a landmark metric needs them."""
    names = list(METRICS) if names is None else list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    if any(n in LANDMARK_METRICS for n in names):
        up = inputs.get("upsample")
        if inputs.get("gen_landmarks") is None and inputs.get("generated") is not None:
            inputs["gen_landmarks"] = video_landmarks(inputs["generated"], up)
        if inputs.get("gt_landmarks") is None and inputs.get("ground_truth") is not None and (
            "lmd" in names or ("mouth_correlation" in names and inputs.get("truth_mouth") is None)
            or ("mouth_width_correlation" in names and inputs.get("truth_width") is None)
        ):
            inputs["gt_landmarks"] = video_landmarks(inputs["ground_truth"], up)
    return {n: METRICS[n](**inputs) for n in names}


__all__ = ["LANDMARK_METRICS", "METRICS", "MetricResult", "compute", "video_landmarks"]
