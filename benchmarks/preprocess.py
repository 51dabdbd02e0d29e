"""Preprocessing speed: frames per second of clip+crop against pure decoding of the same files.

    python benchmarks/preprocess.py [--subjects 4 --seconds 6 --size 256 --resolution 64]

Synthesizes a corpus in a temporary project, then in one run times (1) decoding every source video with
PyAV, (2) `singer clip`, (3) `singer crop`, each over the same source frames. Prints a table and writes
`benchmarks/results/preprocess.json`. The ratio decode / (clip+crop) says how many times slower the
preprocessing is than just reading the videos (target: clip+crop at >= 50 % of decode speed, ratio <= 2).

Before timing, the modules the stages import lazily (scipy.signal for audio resampling, scipy.ndimage for
the crop geometry) are imported: with PYTHONDONTWRITEBYTECODE=1 (this project's shells) every process
compiles them from source, ~1-2 s that is a once-per-process cost, not a per-frame one. Loading dlib's
models stays inside the crop timing (the stage pays it once per process). The stages' own per-step
seconds (`profile_seconds` in metrics/clip.json and metrics/crop.json) are printed as the breakdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", type=int, default=256, help="synthetic source frame size")
    parser.add_argument("--resolution", type=int, default=64, help="crop resolution")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/preprocess.json")
    args = parser.parse_args()

    from singer.config import load_config
    from singer.data.clip import run_clip
    from singer.data.crop import run_crop
    from singer.data.ingest import run_ingest
    from singer.data.synth import synthesize_corpus
    from singer.media import read_frames

    work = Path(tempfile.mkdtemp(prefix="singer-bench-"))
    cwd = os.getcwd()
    try:
        shutil.copy(ROOT / "params.yaml", work / "params.yaml")
        os.chdir(work)
        cfg = load_config(overrides=[f"crop.resolution={args.resolution}"])
        synthesize_corpus(cfg.paths.raw, subjects=args.subjects, seconds=args.seconds, seed=0, size=args.size,
                          fps=list(cfg.synth.fps), progress=False)
        run_ingest(cfg, progress=False)
        videos = pd.read_parquet(cfg.paths.ingested / "manifest.parquet")
        files = [cfg.paths.ingested / f for f in videos["file"]]

        t0 = time.perf_counter()
        import scipy.ndimage  # noqa: F401  (see the module docstring: once-per-process import cost)
        import scipy.signal  # noqa: F401
        t_imports = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_source = sum(len(read_frames(f)[0]) for f in files)
        t_decode = time.perf_counter() - t0

        t0 = time.perf_counter()
        clip_stats = run_clip(cfg, progress=False)
        t_clip = time.perf_counter() - t0
        t0 = time.perf_counter()
        crop_stats = run_crop(cfg, progress=False)
        t_crop = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)

    n_clip_frames = clip_stats["n_clips"] * cfg.clip.frames_per_clip
    rows = [
        ("decode only", t_decode, n_source / t_decode),
        ("clip", t_clip, n_source / t_clip),
        ("crop", t_crop, n_source / t_crop),
        ("clip+crop", t_clip + t_crop, n_source / (t_clip + t_crop)),
    ]
    result = {
        "source_videos": len(files),
        "source_frames": n_source,
        "clip_frames": n_clip_frames,
        "crops_accepted": crop_stats.get("n_accepted"),
        "source_size": args.size,
        "crop_resolution": args.resolution,
        "seconds": {name: round(t, 3) for name, t, _ in rows},
        "source_frames_per_second": {name: round(fps, 1) for name, _, fps in rows},
        "ratio_decode_over_clip_crop": round((n_source / t_decode) / (n_source / (t_clip + t_crop)), 2),
        "clip_crop_fraction_of_decode_speed": round(t_decode / (t_clip + t_crop), 3),
        "target_fraction": 0.5,
        "warmup_import_seconds": round(t_imports, 3),
        "profile_seconds": {"clip": clip_stats.get("profile_seconds", {}),
                            "crop": crop_stats.get("profile_seconds", {})},
        "crop_workers": crop_stats.get("workers"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1min": round(os.getloadavg()[0], 2)},
    }
    print(f"{'step':<12} {'seconds':>8} {'source frames/s':>16}")
    for name, t, fps in rows:
        print(f"{name:<12} {t:>8.2f} {fps:>16.1f}")
    frac = result["clip_crop_fraction_of_decode_speed"]
    print(f"decode is {result['ratio_decode_over_clip_crop']}x faster than clip+crop: clip+crop runs at "
          f"{frac:.0%} of decode speed (target >= 50%: {'met' if frac >= 0.5 else 'MISSED'}) "
          f"({n_source} source frames, {len(files)} videos, {args.size}² -> {args.resolution}²)")
    for stage, t_stage in (("clip", t_clip), ("crop", t_crop)):
        prof = result["profile_seconds"][stage]
        other = t_stage - sum(prof.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in prof.items())
        print(f"  {stage} breakdown (s): {parts}, other {other:.2f} (total {t_stage:.2f})")
    print(f"  (once-per-process imports before timing: {t_imports:.2f} s; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cpus)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
