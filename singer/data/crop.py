"""Stage `crop`: square face crops, 68-point landmarks, Hallo's full / face / lip masks and face box, a reference.

    singer crop              # paths.clips -> paths.crops, params crop.*

How a clip is processed
-----------------------
The face work (detection, landmarks, tracking, crop geometry, masks) lives in `singer.faces`, shared with
generation and the metrics; this module is the stage on top of it: reading clips, rejecting, choosing the
reference frame, writing the outputs, the worker pool.

1. **Track** (`singer.faces.track.track_faces`). dlib's HOG detector (`singer.faces.detect`) on every frame,
   cheaply:
   - until a face is first found, the whole frame is searched, downscaled so that its long side is
     `crop.detect_max_side`, with dlib upsampling x1 then x2 only when nothing is found (HOG's window is
     80 px: smaller faces need upsampling);
   - every `crop.redetect_every`-th frame (a *keyframe*) the whole frame is searched again, rescaled so
     that a face `crop.second_face_ratio` times the tracked one still measures 85 px (the tracked face
     then measures 170 px with the default ratio 0.5); all faces are counted there (a keyframe that
     finds nothing falls back to the search above, so a face that changed size is found again);
   - the other frames are searched only in a window 1.6 times the size of the previous face box, rescaled
     to put the face at `crop.detect_face_px` (a ~160 px image: a few ms whatever the source size);
     when the window finds nothing, the whole frame at the keyframe scale.
   Candidates scoring below `crop.min_face_score` are ignored; the track follows the candidate that
   overlaps the previous box most. The 68 landmarks are then fitted on the full-resolution frame.
   Frames without a face get landmarks interpolated in time from their neighbours (`meta.json` says
   which: `landmarks_source`), and count toward the missing fraction; tracking stops early once more
   than `max_missing_fraction` of the frames are missing (the clip is rejected anyway).
   Faces smaller than about 20 px after the `detect_max_side` downscale (80 px in a 1280-wide source
   with the default 320) are not found: raise `detect_max_side` for wide shots.
   Speed (2 cores shared, 256^2 synthetic singers -> 64^2, 50-frame clips, whole stage including
   decoding and writing): about 55-60 frames/s in one process, 85 with `crop.workers=2` (before 2026-12;
   `benchmarks/preprocess.py` prints the current figure and where the time goes: `profile_seconds` in
   metrics/crop.json).
2. **Reject** (reasons in `rejected.jsonl`, the part before the parenthesis is the histogram key):
   `unreadable clip`, `no face`, `several faces` (a second face scoring >= `min_face_score` whose box is
   >= `second_face_ratio` of the tracked one, in more than `max_multi_face_fraction` of the keyframes:
   judged by score and size, not by count, because HOG with upsampling reports weak false faces),
   `too many frames without a face` (> `max_missing_fraction`), `jittery track` (see below),
   `error` (anything unexpected; the batch goes on).
3. **Box** (`singer.faces.crop.crop_geometry`). How "face crop with scale ratio 0.8" is read: the face,
   measured by its landmarks (the larger of the width and the height of the 68 points' bounding box,
   i.e. ear to ear or brow to chin), spans `crop.scale` (0.8) of the crop side: crop side = face size /
   0.8. Because the jaw drops when the mouth opens, neither the size nor the centre follow the raw
   landmark box frame by frame:
   - the size is one number per clip (the median face size), so the crop never zooms with the jaw;
   - the centre follows the *rigid* landmarks (nose, eyes, the upper jaw near the ears) plus a constant
     per-clip offset (median of landmark-box centre minus rigid centre), so mouth motion does not move
     the crop, then is smoothed in time (Gaussian, sigma `crop.smooth_sigma` frames).
   Where the crop leaves the frame, edge pixels are replicated.
4. **Jitter** = the frame-to-frame jump of the raw (unsmoothed) rigid centre, as a fraction of the face
   size, over frames where the face was detected (divided by the gap when frames are missing in
   between). The clip is rejected when its maximum exceeds `crop.max_jitter`: a head moving on the beat
   at 25 fps moves a few percent of the face per frame; a jump of more is a tracking error or a cut.
5. **Crop** (`singer.faces.crop.crop_frame`): an affine warp (bilinear) to an integer multiple of
   `crop.resolution`, then an exact box filter (`INTER_AREA`) down to the resolution, so downscaling
   does not alias.
6. **Masks** (`singer.faces.masks.make_masks`, Hallo's rule, file:line there), from the clip's crop landmarks:
   the face box (jaw, brows, forehead) and the outer-lip box of every frame, united into their bounding box
   (ratio 1, as Hallo's training data), blurred on a 64x64 canvas (kernels 51 and 31), min-max normalised;
   `full` = 1 - blurred face (the background), `face` = blurred face - blurred lip, `lip` = blurred lip, soft
   in [0, 1] at crop resolution; `face_region` = the hard face box, the face locator's input.
7. **Reference frame**: the frame with the most closed mouth (the smallest `singer.faces.mouth_opening`
   among detected frames; the earliest frame within 0.02 of that minimum, to prefer the start of the clip).
   Why not the first frame: the reference conditions identity and appearance; a closed mouth carries no
   particular articulation, so the model has to take mouth motion from the audio, and it matches what a
   user supplies at inference (a portrait). The paper's training uses the first frame of each 16-frame
   sample as the reference; a data loader can still do that from `frames.mp4`.

Coordinates: pixel centres are integers (a W-wide image spans [-0.5, W - 0.5]). Boxes are
(x0, y0, x1, y1) in that continuous frame. A source point x maps into the crop as
u = (x - x0) * resolution / side - 0.5.

Clips run in `crop.workers` processes (spawned: dlib is not thread-safe; 0 = one per core, but at most
one per 8 clips, as a process takes ~2 s to start). A clip that fails in any way is rejected with its
reason and the batch goes on. When no clip survives, `CropError` (a `StageError`) is raised, the
previous output is left as it was, and `metrics/crop.json` still tells why.

Output (`paths.crops`, swapped in atomically; a failed run leaves the previous output intact):
    <clip_id>/frames.mp4      resolution^2, clip fps, H.264 at crop.crf, no audio
    <clip_id>/audio.wav       the clip's 16 kHz mono audio, copied
    <clip_id>/vocals.wav      its separated vocals, copied when the clips manifest names them (`vocals`)
    <clip_id>/landmarks.npy   (T, 68, 2) float32 in crop pixels
    <clip_id>/masks.npz       full, face, lip: (H, W) float16 in [0, 1]; face_region: (H, W) uint8 {0, 1}
    <clip_id>/reference.png   the reference frame (crop)
    <clip_id>/meta.json       crop_boxes (the crop per frame, source pixels), face_boxes and scores (dlib,
                              null where missing), landmarks_source, jitter, missing_fraction, keyframes,
                              per-frame mouth_opening (source landmarks), reference_frame, ...
    <clip_id>/truth.json      copied when the clip has ground truth
    manifest.parquet          one row per kept clip (MANIFEST_COLUMNS)
    rejected.jsonl            one row per dropped clip: clip_id, stage, reason
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import shutil
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from singer.config import Config, CropConfig
from singer.data.common import Rejections, StageError, StepTimer, write_stats
from singer.faces import (
    Track,
    crop_frame,
    crop_geometry,
    fill_missing,
    make_masks,
    mouth_opening,
    to_crop,
    track_faces,
)
from singer.io import atomic_dir, write_json_atomic, write_parquet_atomic
from singer.media import MediaError, read_frames, write_video

MANIFEST_COLUMNS = [
    "clip_id", "video_id", "subject", "n_frames", "fps", "resolution", "dir",
    "face_score_min", "face_score_mean", "jitter", "missing_fraction",
    "mouth_opening_mean", "mouth_opening_std", "has_truth",
    "reference_frame", "face_px",
]

REFERENCE_TOLERANCE = 0.02

LANDMARKS_MODEL = "dlib HOG frontal detector + shape_predictor_68_face_landmarks (face_recognition_models)"


class CropError(StageError):
    """The crop stage produced nothing usable (no clip survived, or no input)."""


class ClipRejected(Exception):
    """A clip is dropped; str() is the reason (its leading words are the histogram key)."""

    def __init__(self, reason: str, frames: int = 0):
        super().__init__(reason)
        self.frames = frames  # frames decoded before the decision (for the stage's frames/s)


def choose_reference(mouth: np.ndarray, detected: np.ndarray) -> int:
    """The earliest detected frame whose mouth opening is within REFERENCE_TOLERANCE of the smallest."""
    valid = detected & np.isfinite(mouth)
    if not valid.any():
        return 0
    best = float(np.min(mouth[valid]))
    return int(np.flatnonzero(valid & (mouth <= best + REFERENCE_TOLERANCE))[0])


# --------------------------------------------------------------------------------------------- one clip
def _reject_reason(track: Track, n: int, cc: CropConfig) -> str | None:
    detected = track.detected
    n_det = int(detected.sum())
    if n_det == 0:
        return f"no face (none of {n if track.stopped_at is None else track.stopped_at + 1} frames searched)"
    if track.keyframes:
        frac = len(track.multi_face) / len(track.keyframes)
        if frac > cc.max_multi_face_fraction:
            return (f"several faces (a second face in {len(track.multi_face)} of {len(track.keyframes)} "
                    f"keyframes, best second score {max(track.second_scores):.2f})")
    if track.stopped_at is not None:
        return f"too many frames without a face (more than {int(cc.max_missing_fraction * n)} of {n})"
    missing = 1 - n_det / n
    if missing > cc.max_missing_fraction:
        return f"too many frames without a face ({n - n_det} of {n})"
    return None


def _text(row: dict, key: str) -> str:
    """A manifest string field; None / NaN / missing -> ""."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


PROFILE_STEPS = ("decode", "detect", "landmarks", "crop+masks", "encode", "write")


def process_clip(row: dict, clips_dir: Path, out_dir: Path, cfg: Config, profile: dict | None = None) -> dict:
    """Crop one clip into `out_dir/<clip_id>/`; returns its manifest row. Raises ClipRejected.

    `profile`, when given, accumulates the seconds spent per step (PROFILE_STEPS)."""
    cc = cfg.crop
    clip_id = str(row["clip_id"])
    profile = {} if profile is None else profile
    lap = StepTimer(profile)

    try:
        frames, _ = read_frames(clips_dir / str(row["video"]))
    except (MediaError, OSError) as exc:
        raise ClipRejected(f"unreadable clip ({exc})") from exc
    if len(frames) == 0:
        raise ClipRejected("unreadable clip (no decodable frames)")
    n = len(frames)
    lap("decode")
    track = track_faces(frames, cc, max_missing=int(np.floor(cc.max_missing_fraction * n)))
    for step, seconds in track.seconds.items():
        profile[step] = profile.get(step, 0.0) + seconds
    lap.last = time.perf_counter()  # tracking's time is booked by its own steps (detect, landmarks) above
    if reason := _reject_reason(track, n, cc):
        raise ClipRejected(reason, n)
    detected = track.detected
    geo = crop_geometry(track.landmarks, detected, cc)
    jitter = float(np.nanmax(geo.jumps)) if np.isfinite(geo.jumps).any() else 0.0
    if jitter > cc.max_jitter:
        raise ClipRejected(f"jittery track (max centre jump {jitter:.3f} of the face size > {cc.max_jitter})", n)

    res = cc.resolution
    landmarks_src = fill_missing(track.landmarks, detected)
    crops = np.stack([crop_frame(f, c, geo.side, res) for f, c in zip(frames, geo.centres)])
    landmarks = to_crop(landmarks_src, geo.centres, geo.side, res).astype(np.float32)
    masks = make_masks(landmarks, res)
    mouth = np.asarray(mouth_opening(landmarks_src), np.float64)
    reference = choose_reference(mouth, detected)
    fps = float(row.get("fps") or 0)
    fps = fps if np.isfinite(fps) and fps > 0 else float(cfg.clip.fps)

    folder = out_dir / clip_id
    folder.mkdir(parents=True, exist_ok=False)
    lap("crop+masks")
    try:
        write_video(folder / "frames.mp4", crops, fps=fps, crf=cc.crf)
        lap("encode")
        audio = _text(row, "audio")
        if audio:
            shutil.copyfile(clips_dir / audio, folder / "audio.wav")
        vocals = _text(row, "vocals")
        if vocals:
            shutil.copyfile(clips_dir / vocals, folder / "vocals.wav")
        np.save(folder / "landmarks.npy", landmarks)
        np.savez_compressed(folder / "masks.npz", **{k: v if v.dtype == np.uint8 else v.astype(np.float16)
                                                    for k, v in masks.items()})
        cv2.imwrite(str(folder / "reference.png"), cv2.cvtColor(crops[reference], cv2.COLOR_RGB2BGR))
        truth = _text(row, "truth")
        if truth:
            shutil.copyfile(clips_dir / truth, folder / "truth.json")
        scores = track.scores[detected]
        finite = np.where(detected, track.scores, np.nan)
        meta = {
            "clip_id": clip_id,
            "source_video": str(row["video"]),
            "source_size": [int(frames.shape[2]), int(frames.shape[1])],
            "fps": fps,
            "n_frames": n,
            "resolution": res,
            "scale": cc.scale,
            "crop_side_px": geo.side,
            "face_px": geo.face_px,
            "crop_boxes": np.round(geo.boxes(), 3),
            "face_boxes": [None if np.isnan(b[0]) else [round(float(v), 2) for v in b] for b in track.boxes],
            "scores": [None if np.isnan(s) else round(float(s), 4) for s in finite],
            "detected": detected.tolist(),
            "landmarks_source": ["dlib" if d else "interpolated" for d in detected],
            "landmarks_model": LANDMARKS_MODEL,
            "keyframes": track.keyframes,
            "multi_face_keyframes": track.multi_face,
            "jitter": jitter,
            "jitter_p95": float(np.nanpercentile(geo.jumps, 95)) if np.isfinite(geo.jumps).any() else 0.0,
            "jumps": [None if np.isnan(j) else round(float(j), 5) for j in geo.jumps],
            "missing_fraction": float(1 - detected.mean()),
            "mouth_opening": np.round(mouth, 5),
            "reference_frame": reference,
            "mask_pixels": {k: round(float(v.sum()), 2) for k, v in masks.items()},
        }
        write_json_atomic(folder / "meta.json", meta)
        lap("write")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {
        "clip_id": clip_id,
        "video_id": str(row.get("video_id", "")),
        "subject": str(row.get("subject", "")),
        "n_frames": n,
        "fps": fps,
        "resolution": res,
        "dir": clip_id,
        "face_score_min": float(scores.min()),
        "face_score_mean": float(scores.mean()),
        "jitter": jitter,
        "missing_fraction": float(1 - detected.mean()),
        "mouth_opening_mean": float(mouth[detected].mean()),
        "mouth_opening_std": float(mouth[detected].std()),
        "has_truth": bool(_text(row, "truth")),
        "reference_frame": reference,
        "face_px": geo.face_px,
    }


def _safe_process(row: dict, clips_dir: Path, out_dir: Path, cfg: Config
                  ) -> tuple[dict | None, str | None, int, dict[str, float]]:
    """process_clip that never raises: (manifest row or None, rejection reason or None, frames seen,
    seconds per step)."""
    clip_id = str(row.get("clip_id", ""))
    profile: dict[str, float] = {}
    result, reason, n = _safe_process_inner(row, clip_id, clips_dir, out_dir, cfg, profile)
    return result, reason, n, profile


def _safe_process_inner(row: dict, clip_id: str, clips_dir: Path, out_dir: Path, cfg: Config,
                        profile: dict) -> tuple[dict | None, str | None, int]:
    try:
        if not clip_id or clip_id.startswith(".") or "/" in clip_id or "\\" in clip_id:
            raise ClipRejected(f"bad clip id ({clip_id!r})")
        if row.get("_duplicate"):
            raise ClipRejected(f"duplicate clip id ({clip_id!r} appears more than once in the clips manifest)")
        result = process_clip(row, clips_dir, out_dir, cfg, profile=profile)
        return result, None, result["n_frames"]
    except ClipRejected as exc:
        return None, str(exc), exc.frames
    except Exception as exc:  # noqa: BLE001 - one clip never stops the batch
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(tb.filename).name}:{tb.lineno}"
        return None, f"error ({type(exc).__name__} at {where}: {exc})", 0


# --------------------------------------------------------------------------------------------- the stage
CLIPS_PER_WORKER = 8  # with workers=0 (auto), a process is started per this many clips (startup ~2 s)


def _workers(cc: CropConfig, n_clips: int) -> int:
    """Processes to use: crop.workers, or with 0 one per CPU core but no more than n_clips / 8."""
    if cc.workers > 0:
        return max(1, min(cc.workers, n_clips))
    return max(1, min(os.cpu_count() or 1, n_clips // CLIPS_PER_WORKER))


def _run_pool(rows: list[dict], clips_dir: Path, out: Path, cfg: Config, workers: int,
              results: dict, bar) -> None:
    """Process clips in `workers` spawned processes (dlib is not thread-safe); fills `results` by index
    until done or until the pool breaks."""
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_safe_process, row, clips_dir, out, cfg): i for i, row in enumerate(rows)}
        try:
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
        except cf.process.BrokenProcessPool as exc:
            tqdm.write(f"crop: worker pool failed ({exc}); finishing the remaining clips in this process")


def run_crop(cfg: Config, progress: bool = True) -> dict:
    """Run the stage: `paths.clips` -> `paths.crops`. Returns stats; raises CropError if nothing survives."""
    clips_dir = Path(cfg.paths.clips)
    manifest_path = clips_dir / "manifest.parquet"
    if not manifest_path.exists():
        raise CropError(f"crop: {manifest_path} not found; run `singer clip` first")
    clips = pd.read_parquet(manifest_path)
    rows_in = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
               for r in clips.to_dict(orient="records")]
    seen: set[str] = set()
    for row in rows_in:
        row["_duplicate"] = str(row.get("clip_id")) in seen
        seen.add(str(row.get("clip_id")))
    rejections = Rejections("crop")
    results: dict[int, tuple[dict | None, str | None, int, dict[str, float]]] = {}
    workers = _workers(cfg.crop, len(rows_in))
    start = time.perf_counter()
    with atomic_dir(cfg.paths.crops) as out:
        bar = tqdm(total=len(rows_in), desc="crop", unit="clip", disable=not progress)
        if workers <= 1:
            for i, row in enumerate(rows_in):
                results[i] = _safe_process(row, clips_dir, out, cfg)
                bar.update()
        else:
            _run_pool(rows_in, clips_dir, out, cfg, workers, results, bar)
            for i in sorted(set(range(len(rows_in))) - set(results)):
                # the pool broke (a worker died, or the caller's script re-ran itself in the children
                # because it lacks an `if __name__ == "__main__":` guard): finish in this process
                shutil.rmtree(out / str(rows_in[i].get("clip_id")), ignore_errors=True)
                results[i] = _safe_process(rows_in[i], clips_dir, out, cfg)
                bar.update()
        bar.close()
        kept, frames = [], 0
        profile = dict.fromkeys(PROFILE_STEPS, 0.0)
        for i, row in enumerate(rows_in):
            result, reason, n, clip_profile = results[i]
            frames += n
            for step, secs in clip_profile.items():
                profile[step] = profile.get(step, 0.0) + secs
            if result is not None:
                kept.append(result)
            else:
                rejections.add(row.get("clip_id"), reason, clip_id=str(row.get("clip_id")),
                               video_id=str(row.get("video_id", "")))
        manifest = pd.DataFrame(kept, columns=MANIFEST_COLUMNS)
        write_parquet_atomic(out / "manifest.parquet", manifest)
        rejections.write(out / "rejected.jsonl")
        seconds = time.perf_counter() - start
        stats = {
            "n_in": len(rows_in),
            "n_accepted": len(kept),
            "n_rejected": len(rejections),
            "rejected_reasons": rejections.reasons(),
            "seconds": round(seconds, 3),
            "frames": frames,
            "frames_per_second": round(frames / max(seconds, 1e-9), 2),
            "workers": workers,
            "resolution": cfg.crop.resolution,
            # seconds per step summed over clips (over processes with workers > 1: may exceed `seconds`)
            "profile_seconds": {step: round(secs, 3) for step, secs in profile.items()},
        }
        if not kept:
            # raising inside atomic_dir discards the new output and keeps the previous one
            write_stats(cfg.paths.metrics, "crop", stats)
            if rows_in:
                examples = "; ".join(f"{r['item']}: {r['reason']}" for r in rejections.rows[:5])
                detail = f"reasons {stats['rejected_reasons']}; e.g. {examples}"
            else:
                detail = f"{manifest_path} lists no clip"
            raise CropError(f"crop: no clip survived out of {len(rows_in)} ({detail}); "
                            f"previous output in {cfg.paths.crops} left as it was")
    write_stats(cfg.paths.metrics, "crop", stats)
    return stats


__all__ = [
    "MANIFEST_COLUMNS",
    "ClipRejected",
    "CropError",
    "choose_reference",
    "process_clip",
    "run_crop",
]
