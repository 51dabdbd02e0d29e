"""`singer evaluate`: generate every test clip from its reference frame and audio, score it, report.

    from singer.evaluate.runner import run_evaluate
    summary = run_evaluate(cfg)          # the dict written to metrics/eval.json (+ paths)

Flow: the test clips (`data/split/test.txt`, at most `evaluate.max_clips`) are tasks. A `ClipEvaluator`
holds the heavy networks (the pipeline, the dlib face embedders, SyncNet and I3D when their weights are
configured) and turns one clip into a row of metrics; with `evaluate.num_workers` = 0 (or a single clip
and no `RAY_ADDRESS`) one evaluator runs them in-process, else that many workers do, each taking the next
clip when free: Ray actors (`address="auto"` when `RAY_ADDRESS` is set, or the Ray session already
initialised by the caller), or, when the runner starts a local Ray itself (`ray.init()`, workers at the
driver's priority), the driver plus `num_workers - 1` actors (see `run_clips`). Each clip is generated with
``torch.Generator().manual_seed(seed + clip index)`` and evaluated single-threaded in torch, so serial and
parallel runs give the same numbers. Set-level metrics (FVD) are computed after the fan-out from the
per-clip I3D features. `singer.evaluate.report` writes the outputs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from singer.config import Config
from singer.evaluate.fanout import WORKER_ENV, run_ray

log = logging.getLogger(__name__)

PER_CLIP_METRICS = ("ssim", "psnr", "cpbd", "lmd", "diversity", "bas", "identity", "mouth_correlation",
                    "mouth_width_correlation")
SET_METRICS = ("fvd",)
LSE_NAMES = ("LSE-D", "LSE-C")


def metric_columns(names: list[str]) -> list[str]:
    """Per-clip value columns for the configured `evaluate.metrics` ("lse" -> LSE-D and LSE-C)."""
    cols: list[str] = []
    for n in names:
        if n == "lse":
            cols += list(LSE_NAMES)
        elif n in PER_CLIP_METRICS:
            cols.append(n)
    return cols


def _check_metric_names(names: list[str]) -> None:
    known = set(PER_CLIP_METRICS) | set(SET_METRICS) | {"lse"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown evaluate.metrics {unknown}; known: {sorted(known)}")


def test_clips(cfg: Config) -> list[dict[str, Any]]:
    """[{index, clip_id, subject}] of the test split, in its order, at most `max_clips`."""
    import pandas as pd

    ids = (Path(cfg.paths.split) / "test.txt").read_text().split()
    if cfg.evaluate.max_clips is not None:
        ids = ids[: int(cfg.evaluate.max_clips)]
    manifest = pd.read_parquet(Path(cfg.paths.crops) / "manifest.parquet").set_index("clip_id")
    missing = [c for c in ids if c not in manifest.index]
    if missing:
        raise FileNotFoundError(f"test clips missing from {cfg.paths.crops}/manifest.parquet: {missing[:3]}")
    clips = [{"index": i, "clip_id": c, "subject": str(manifest.loc[c].get("subject", ""))} for i, c in enumerate(ids)]
    if cfg.evaluate.audio_control == "shuffled":
        for clip in clips:
            clip["audio_from"] = shuffled_partner(clips, clip["index"])
    return clips


def shuffled_partner(clips: list[dict[str, Any]], index: int) -> str:
    """The clip whose audio clip `index` gets in the shuffled-audio control: the next clip (cyclically) of
    another subject, else simply the next clip. Deterministic, and never the clip itself when there are two."""
    n = len(clips)
    order = [clips[(index + k) % n] for k in range(1, n)]
    other = [c for c in order if c["subject"] != clips[index]["subject"]]
    return (other or order or [clips[index]])[0]["clip_id"]


class ClipEvaluator:
    """Loads the heavy networks once; `evaluate(clip)` generates one clip and scores it.

    `project_root`: the folder relative paths of the config refer to (a Ray worker changes into it).
    `threads`: torch threads while generating (1 by default: identical numbers in every process layout).
    """

    def __init__(self, cfg: Config, project_root: str | os.PathLike | None = None, threads: int | None = 1):
        t_start = time.perf_counter()
        import torch

        from singer.faces import DlibFaceEmbedder, make_face_embedder
        from singer.pipeline import SingerPipeline

        t_imported = time.perf_counter()

        if project_root is not None and Path(project_root).is_dir():
            os.chdir(project_root)
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = threads
        self.cfg = cfg
        ec = cfg.evaluate
        self.names = list(ec.metrics)
        model_dir = Path(ec.model_dir)
        if not (model_dir / "model_index.json").exists():
            raise FileNotFoundError(f"no saved model at {model_dir} (model_index.json missing); train first")
        self.pipe = SingerPipeline.from_pretrained(str(model_dir))
        if torch.cuda.is_available():  # the noise is drawn on the CPU generator: same numbers on any device
            self.pipe.to("cuda")
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.set_compute(cfg.compute)  # compute.dtype / compute.compile, as in training and generation
        self.face_embedder = make_face_embedder(self.pipe.model_cfg)
        self.identity_embedder = DlibFaceEmbedder() if "identity" in self.names else None
        self.syncnet, self.syncnet_reason = None, None
        if "lse" in self.names:
            from singer.evaluate.networks.i3d import WeightsUnavailable
            from singer.evaluate.networks.syncnet import load_syncnet

            try:
                self.syncnet = load_syncnet(os.environ.get("SINGER_SYNCNET_PATH") or ec.syncnet_path)
            except WeightsUnavailable as exc:
                self.syncnet_reason = str(exc)
        self.i3d, self.i3d_reason = None, None
        if "fvd" in self.names:
            from singer.evaluate.networks.i3d import WeightsUnavailable, load_i3d

            try:
                self.i3d = load_i3d(os.environ.get("SINGER_I3D_PATH") or ec.i3d_path, bn_eps=ec.i3d_bn_eps)
            except WeightsUnavailable as exc:
                self.i3d_reason = str(exc)
        self._datasets: dict[tuple, Any] = {}
        # where a worker's start-up goes (the benchmark's breakdown): imports, then the networks
        self.startup = {"pid": os.getpid(), "imports_seconds": t_imported - t_start,
                        "load_seconds": time.perf_counter() - t_imported, "ready_at": time.time()}

    def _read(self, clip_id: str):
        from singer.data.dataset import SingerClipDataset

        ds = SingerClipDataset(self.cfg, "test", clip_ids=[clip_id], random_windows=False)
        frames, audio, reference, masks, mouth = ds._read_clip(clip_id)
        return ds, frames, audio, reference, masks, mouth

    def _driving_audio(self, clip: dict[str, Any], audio: np.ndarray) -> np.ndarray:
        """The audio the video is generated from: the clip's own, or the control's (same length). The
        metrics keep using the clip's own audio and ground truth."""
        control = self.cfg.evaluate.audio_control
        if control == "silent":
            return np.zeros_like(audio)
        if control == "shuffled" and clip.get("audio_from"):
            other = self._read(clip["audio_from"])[0].encoder_audio(clip["audio_from"])[: len(audio)]
            return np.pad(other, (0, len(audio) - len(other)))
        return audio

    def ping(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        """{pid, imports_seconds, load_seconds, ready_at (epoch seconds)}: this evaluator's start-up."""
        return dict(self.startup)

    def evaluate(self, clip: dict[str, Any], keep_frames: bool = False) -> dict[str, Any]:
        """One clip -> {index, clip_id, subject, results: {name: MetricResult dict}, curves, timings,
        i3d_real/i3d_fake (features or None), frames (ground truth, generated) when `keep_frames`}."""
        import torch

        from singer.data.dataset import fit_length
        from singer.evaluate.metrics import METRICS
        from singer.evaluate.metrics.base import MetricResult, video_landmarks
        from singer.evaluate.metrics.identity import identity_similarity
        from singer.evaluate.metrics.mouth import opening_curve

        if self.threads:
            torch.set_num_threads(int(self.threads))
        ec = self.cfg.evaluate
        began, cpu_began = time.time(), time.process_time()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        ds, frames, audio, reference, masks, mouth = self._read(clip["clip_id"])
        fps, rate = ds.fps, ds.sample_rate
        n = len(frames)
        audio = audio[: int(round(n / fps * rate))]
        embedding = self.face_embedder.embed(reference, what=f"clip {clip['clip_id']}")
        timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ref = {"image": reference, "masks": masks}  # full/face/lip/face_region, as prepare_reference gives
        # the encoder hears the clip's vocals when it has them (Hallo separates them); the metrics hear the song
        heard = fit_length(ds.encoder_audio(clip["clip_id"]), len(audio))
        generator = torch.Generator().manual_seed(int(ec.seed) + int(clip["index"]))
        out = self.pipe(ref, self._driving_audio(clip, heard), embedding, num_inference_steps=ec.inference_steps,
                        guidance_scale=ec.guidance_scale, generator=generator, num_frames=n, progress=False,
                        sampler=ec.sampler)
        generated = np.ascontiguousarray(out.frames[:n])
        timings["generate"] = time.perf_counter() - t0

        truth_mouth = mouth.astype(np.float64) if np.isfinite(mouth).all() and len(mouth) == n else None
        width = ds.truth_curve(clip["clip_id"], "mouth_width", n)
        truth_width = width.astype(np.float64) if np.isfinite(width).all() else None
        t0 = time.perf_counter()
        gen_lm = video_landmarks(generated)
        timings["landmarks_generated"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gt_lm = video_landmarks(frames)
        timings["landmarks_ground_truth"] = time.perf_counter() - t0
        inputs = dict(generated=generated, ground_truth=frames, reference=reference, audio=audio, sample_rate=rate,
                      fps=fps, gen_landmarks=gen_lm, gt_landmarks=gt_lm, truth_mouth=truth_mouth,
                      truth_width=truth_width,
                      cpbd_every=ec.cpbd_every, identity_max_frames=ec.identity_max_frames)
        results: dict[str, MetricResult] = {}
        for name in self.names:
            t0 = time.perf_counter()
            if name == "identity":
                results[name] = identity_similarity(generated, reference, 1, ec.identity_max_frames,
                                                    embedder=self.identity_embedder)
            elif name in METRICS:
                results[name] = METRICS[name](**inputs)
            elif name == "lse":
                if self.syncnet is None:
                    for k in LSE_NAMES:
                        results[k] = MetricResult.unavailable(self.syncnet_reason or "no SyncNet weights")
                else:
                    from singer.evaluate.metrics.lse import lse

                    results.update(lse(generated, audio, rate, fps, model=self.syncnet))
            else:
                continue  # set-level (fvd): after the fan-out
            timings[name] = time.perf_counter() - t0

        i3d_real = i3d_fake = None
        if self.i3d is not None:
            from singer.evaluate.metrics.fvd import i3d_features, video_clips

            t0 = time.perf_counter()
            clips = self.cfg.evaluate.fvd_clips_per_video
            i3d_real = i3d_features(self.i3d, video_clips(frames, max_clips=clips))
            i3d_fake = i3d_features(self.i3d, video_clips(generated, max_clips=clips))
            timings["fvd_features"] = time.perf_counter() - t0
        truth_curve = truth_mouth if truth_mouth is not None else opening_curve(gt_lm)
        row = {
            "index": int(clip["index"]),
            "clip_id": clip["clip_id"],
            "subject": clip.get("subject", ""),
            "n_frames": int(n),
            "fps": float(fps),
            "truth_source": "truth.json" if truth_mouth is not None else "landmarks",
            "width_truth_source": "truth.json" if truth_width is not None else "landmarks",
            "results": {k: v.to_dict() for k, v in results.items()},
            "curves": {"generated": opening_curve(gen_lm).tolist(), "truth": np.asarray(truth_curve).tolist()},
            "timings": timings,
            "i3d_real": i3d_real,
            "i3d_fake": i3d_fake,
            "fvd_reason": self.i3d_reason,
            "fvd_bn_eps": getattr(self.i3d, "bn_eps", None),
            # not an output: where the time went (the benchmark); cpu < wall means the process waited for a core
            "worker": {"pid": os.getpid(), "node": _node_id(), "start": began, "end": time.time(),
                       "cpu_seconds": time.process_time() - cpu_began},
        }
        if keep_frames:
            row["frames"] = (frames, generated)
            row["audio"] = (audio, rate)
            row["reference"] = reference
        return row


# ----------------------------------------------------------------------------------------- fan-out


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="clip", disable=not enabled)


def run_clips(cfg: Config, clips: list[dict], keep: set[int] | None = None, progress: bool = True,
              threads: int | None = 1, stats: dict | None = None) -> list[dict]:
    """Evaluate the clips serially (`num_workers` 0, or a single clip without `RAY_ADDRESS`) or with Ray;
    rows in clip order.

    With Ray, `num_workers` processes evaluate at once, each loading the networks once and taking the next
    clip when it is free. When this call starts a local Ray itself (no `RAY_ADDRESS`, no session of the
    caller's), the driver is one of them: it would otherwise sit idle in `ray.wait`, and it starts as soon
    as ray.init returns where an actor first waits for its process and its imports (measured on 2 shared
    cores: 6-25 s); `num_workers - 1` actors do the rest. On a cluster, or in the caller's session, all
    `num_workers` are actors. Every process runs torch on `threads` threads and seeds each clip by its index,
    so the per-clip values do not depend on which process scored a clip.

    `stats`, when given, receives where the time went: `mode`, `seconds`, and `load_seconds` (in-process) or
    `ray_init_seconds`, `actors_ready_seconds`, `startup` (each actor's imports and network load),
    `driver_startup` and `driver_clips` (the driver's share), `warm_up_seconds`, `ray_shutdown_seconds`."""
    keep = keep or set()
    stats = {} if stats is None else stats
    workers = int(cfg.evaluate.num_workers)
    rows: list[dict] = []
    bar = _progress(len(clips), progress)
    # one clip on a local machine: starting Ray and an actor costs more than it could save (the demo's
    # ablation scores one clip per variant); on a cluster (RAY_ADDRESS) the work still goes to the workers
    in_process = workers <= 0 or not clips or (len(clips) == 1 and not os.environ.get("RAY_ADDRESS"))
    t_call = time.perf_counter()
    try:
        if in_process:
            stats["mode"] = "in-process"
            evaluator = ClipEvaluator(cfg, threads=threads)
            stats["load_seconds"] = time.perf_counter() - t_call
            for clip in clips:
                rows.append(evaluator.evaluate(clip, keep_frames=clip["index"] in keep))
                bar.update(1)
        else:
            rows = run_ray(ClipEvaluator, cfg, clips, keep, threads, workers, stats, bar)
    finally:
        bar.close()
    stats["seconds"] = time.perf_counter() - t_call
    return sorted(rows, key=lambda r: r["index"])


def set_metrics(cfg: Config, rows: list[dict]) -> dict[str, Any]:
    """FVD over all clips from the per-clip I3D features (unavailable with the reason without weights)."""
    from singer.evaluate.metrics.base import MetricResult
    from singer.evaluate.metrics.fvd import fvd_from_features

    out: dict[str, Any] = {}
    if "fvd" not in cfg.evaluate.metrics:
        return out
    if not rows:
        out["fvd"] = MetricResult.unavailable("no clips evaluated")
    elif any(r["i3d_real"] is None for r in rows):
        reason = next((r["fvd_reason"] for r in rows if r["fvd_reason"]), None) or "no I3D features"
        out["fvd"] = MetricResult.unavailable(reason)
    else:
        real = np.concatenate([r["i3d_real"] for r in rows])
        fake = np.concatenate([r["i3d_fake"] for r in rows])
        out["fvd"] = fvd_from_features(real, fake, bn_eps=rows[0].get("fvd_bn_eps"),
                                        clips_per_video=cfg.evaluate.fvd_clips_per_video, n_videos=len(rows))
    return out


def _node_id() -> str:
    """The Ray node this process runs on (its hex id), or "local" outside Ray."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    return "local"


def eval_json_path(cfg: Config) -> Path:
    """`metrics/eval.json` (`metrics/<variant>-eval.json` for an ablation variant, as train names its json)."""
    from singer.release.lineage import stage_json

    return stage_json(cfg, "eval")


def run_evaluate(cfg: Config, progress: bool = True) -> dict:
    """Generate and score every test clip; write `evaluate.out_dir` and `metrics/eval.json`; log to MLflow.

    Returns the summary written to eval.json plus `paths` (what was written) and `mlflow_run_id`.
    """
    from singer.evaluate import report
    from singer.release import tracking
    from singer.release.lineage import training_record

    ec = cfg.evaluate
    _check_metric_names(list(ec.metrics))
    clips = test_clips(cfg)
    if not clips:
        raise ValueError(f"the test split {cfg.paths.split}/test.txt has no clips")
    keep = {c["index"] for c in clips[: max(0, int(ec.sample_videos))]}
    # the model under test, when this project trained it: its training run, and the logged model the metrics
    # are attached to (MLflow 3 lineage: the logged model's page lists them, with this run as their source)
    trained = training_record(cfg, ec.model_dir) or {}
    tags = {"variant": cfg.train.variant}
    if trained.get("mlflow_run_id"):
        tags["train_run_id"] = trained["mlflow_run_id"]
    if trained.get("mlflow_model_id"):
        tags["model_id"] = trained["mlflow_model_id"]
    started = time.perf_counter()
    with tracking.start_run(cfg, "evaluate", tags=tags, data_paths=[cfg.paths.split, ec.model_dir],
                            run_name=f"evaluate-{cfg.train.variant}") as run:
        stats: dict[str, Any] = {}
        rows = run_clips(cfg, clips, keep=keep, progress=progress, stats=stats)
        set_level = set_metrics(cfg, rows)
        summary, paths = report.write_outputs(cfg, rows, set_level, seconds=time.perf_counter() - started,
                                              eval_json=eval_json_path(cfg), fanout=stats)
        report.log_to_mlflow(summary, paths, model_id=trained.get("mlflow_model_id"))
        if run is not None:
            summary["mlflow_run_id"] = run.info.run_id
    summary["paths"] = {k: str(v) if not isinstance(v, list) else [str(p) for p in v] for k, v in paths.items()}
    return summary


__all__ = ["WORKER_ENV", "ClipEvaluator", "metric_columns", "run_clips", "run_evaluate", "set_metrics", "test_clips"]
