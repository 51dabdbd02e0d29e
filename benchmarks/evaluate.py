"""Evaluation cost at the tiny preset: seconds per clip of each metric, and serial vs Ray speed-up.

    python benchmarks/evaluate.py [--clips 8 --steps 5 --workers 2]

Builds a throwaway project (synthetic corpus -> ingest, clip, crop, split; a fresh model: speed does not
depend on what the weights learned), then evaluates `--clips` clips three ways, every metric at the
params.yaml settings (cpbd on every frame, identity on 8 frames):

- serial, as `singer evaluate` runs without Ray (`evaluate.num_workers=0`): one process, in-process,
  torch on 1 thread (the setting that gives the same numbers in every layout);
- serial with torch on all threads (the other thing a user without Ray could do with the whole machine);
- Ray as `singer evaluate` runs it with `evaluate.num_workers=--workers`: `ray.init` started by the
  runner (counted), `--workers` workers that each load the networks once and take the next clip when free:
  the driver (from ray.init on) and `--workers - 1` Ray actors (once ray.init and their start are done).

Both serial runs are in this already-warm process (imports and dlib models loaded: that favours serial); the
Ray time includes ray.init, the actors' start (imports, network load) and ray.shutdown. The speed-up target
is taken against the faster serial run. Also: where the time goes (per-clip steps, ray.init, actor start,
per-actor busy time, the tail) and whether the per-clip values of serial and Ray agree exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from common import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_project(root: Path, subjects: int) -> None:
    from singer.config import load_config
    from singer.data.clip import run_clip
    from singer.data.crop import run_crop
    from singer.data.ingest import run_ingest
    from singer.data.split import run_split
    from singer.data.synth import synthesize_corpus
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    os.chdir(root)
    cfg = load_config()
    synthesize_corpus(cfg.paths.raw, subjects=subjects, seconds=4.2, seed=0, size=192, fps=[25.0], progress=False)
    for stage in (run_ingest, run_clip, run_crop, run_split):
        stage(cfg, progress=False)
    SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution).save_pretrained(
        root / "models" / "full")


def _median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values)) if values else float("nan")


def _worker_breakdown(rows: list[dict], stats: dict, t_first: float) -> list[dict]:
    """Per process of the Ray run (the driver's share first, then each actor): start-up (imports, networks),
    clips, busy and cpu seconds, and when its last clip ended (seconds after `t_first`)."""
    out = []
    procs = ([("driver", stats["driver_startup"])] if stats.get("driver_startup") else []) + \
        [("actor", info) for info in stats.get("startup", [])]
    for kind, info in procs:
        mine = [r["worker"] for r in rows if r["worker"]["pid"] == info["pid"]]
        out.append({"kind": kind, "pid": info["pid"], "imports_seconds": info["imports_seconds"],
                    "load_seconds": info["load_seconds"], "ready_after_seconds": info["ready_at"] - t_first,
                    "clips": len(mine), "busy_seconds": float(sum(w["end"] - w["start"] for w in mine)),
                    "cpu_seconds": float(sum(w["cpu_seconds"] for w in mine)),
                    "last_clip_end_seconds": float(max((w["end"] for w in mine), default=t_first) - t_first)})
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps per window (params.yaml: 25)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd

    from singer.config import load_config
    from singer.evaluate.report import per_clip_frame
    from singer.evaluate.runner import run_clips

    tmp = Path(tempfile.mkdtemp(prefix="evb"))
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    try:
        start = time.perf_counter()
        build_project(tmp, subjects=max(3, (args.clips + 1) // 2))
        setup = time.perf_counter() - start
        cfg = load_config(overrides=[f"evaluate.inference_steps={args.steps}", "evaluate.metrics=[ssim,psnr,cpbd,"
                                     "lmd,diversity,bas,identity,mouth_correlation,fvd,lse]"])
        manifest = pd.read_parquet(Path(cfg.paths.crops) / "manifest.parquet")
        ids = manifest["clip_id"].tolist()[: args.clips]  # every cropped clip may serve: only speed matters
        clips = [{"index": i, "clip_id": c, "subject": str(s)} for i, (c, s) in
                 enumerate(zip(ids, manifest["subject"].tolist()[: args.clips]))]

        def with_workers(n: int):
            return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"num_workers": n})})

        # serial: `singer evaluate` with num_workers=0 (torch on 1 thread), then torch on all threads
        serial_stats: dict = {}
        serial_rows = run_clips(with_workers(0), clips, progress=False, stats=serial_stats)
        serial_1t = serial_stats["seconds"]
        all_stats: dict = {}
        all_rows = run_clips(with_workers(0), clips, progress=False, threads=None, stats=all_stats)
        serial_all = all_stats["seconds"]

        # Ray, started by the runner as `singer evaluate` starts it (its token auth writes ~/.ray/auth_token)
        os.environ.update(HOME=ray_tmp, RAY_TMPDIR=ray_tmp)
        os.environ.pop("RAY_ADDRESS", None)
        ray_stats: dict = {}
        t_wall = time.time()
        ray_rows = run_clips(with_workers(args.workers), clips, progress=False, stats=ray_stats)
        parallel = ray_stats["seconds"]
        names = list(serial_rows[0]["results"])
        same = per_clip_frame(serial_rows, names).equals(per_clip_frame(ray_rows, names))
        same_all = per_clip_frame(serial_rows, names).equals(per_clip_frame(all_rows, names))
    finally:
        os.chdir(REPO)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # where the time goes
    keys = list(serial_rows[0]["timings"])
    per_clip = {k: _median([r["timings"][k] for r in serial_rows]) for k in keys}
    per_clip_ray = {k: _median([r["timings"][k] for r in ray_rows]) for k in keys}
    clip_wall = lambda rows: [r["worker"]["end"] - r["worker"]["start"] for r in rows]  # noqa: E731
    clip_cpu = lambda rows: [r["worker"]["cpu_seconds"] for r in rows]  # noqa: E731
    procs = _worker_breakdown(ray_rows, ray_stats, t_wall)
    best_serial = min(serial_1t, serial_all)
    result = {
        "preset": "tiny", "clips": len(clips), "frames_per_clip": int(serial_rows[0]["n_frames"]),
        "steps": args.steps, "workers": args.workers, "cores": os.cpu_count(), "project_setup_seconds": setup,
        "per_clip_seconds": per_clip, "per_clip_total_seconds": _median(clip_wall(serial_rows)),
        "per_clip_seconds_in_ray_actor": per_clip_ray, "per_clip_total_seconds_in_ray_actor":
            _median(clip_wall(ray_rows)),
        "per_clip_cpu_seconds": _median(clip_cpu(serial_rows)),
        "per_clip_cpu_seconds_in_ray_actor": _median(clip_cpu(ray_rows)),
        "serial_networks_load_seconds": serial_stats["load_seconds"],
        "serial_seconds_1_thread": serial_1t, "serial_seconds_all_threads": serial_all,
        "ray_seconds": parallel, "ray_breakdown": {
            "warm_up_seconds": ray_stats.get("warm_up_seconds"), "ray_init_seconds": ray_stats["ray_init_seconds"],
            "actors_ready_seconds": ray_stats.get("actors_ready_seconds"),
            "ray_shutdown_seconds": ray_stats.get("ray_shutdown_seconds"), "processes": procs},
        "speedup_vs_serial_1_thread": serial_1t / parallel, "speedup_vs_serial_all_threads": serial_all / parallel,
        "speedup_vs_best_serial": best_serial / parallel, "target_speedup": 0.8 * args.workers,
        "serial_equals_ray": bool(same), "serial_1_thread_equals_all_threads": bool(same_all),
        "load_average_after": os.getloadavg(),
    }
    rows = [("clip", f"{result['frames_per_clip']} frames at {cfg.crop.resolution}², {args.steps} DDIM steps;"
                     " median s, serial | in the Ray run")]
    rows += [(f"  {k}", f"{per_clip[k]:.3f} s | {per_clip_ray[k]:.3f} s") for k in keys]
    rows += [("per clip total", f"{result['per_clip_total_seconds']:.2f} s | "
                                f"{result['per_clip_total_seconds_in_ray_actor']:.2f} s"),
             ("per clip cpu (process time; < wall: waited for a core)",
              f"{result['per_clip_cpu_seconds']:.2f} s | {result['per_clip_cpu_seconds_in_ray_actor']:.2f} s"),
             ("networks load, serial (imports already done)", f"{serial_stats['load_seconds']:.2f} s"),
             (f"serial (singer evaluate, num_workers=0), {len(clips)} clips, torch 1 thread", f"{serial_1t:.1f} s"),
             (f"serial, {len(clips)} clips, torch all threads", f"{serial_all:.1f} s"),
             (f"Ray, {args.workers} workers (driver + {args.workers - 1} actors) on {args.workers} cores, all in",
              f"{parallel:.1f} s"),
             ("  ray.init", f"{ray_stats['ray_init_seconds']:.1f} s"),
             ("  actors ready after ray.init (spawn, imports, networks)",
              f"{ray_stats.get('actors_ready_seconds', float('nan')):.1f} s"),
             ("  numba warm-up in the driver (when it scores no clips)", f"{ray_stats.get('warm_up_seconds', 0):.1f} s")]
    rows += [(f"    {p['kind']} {p['pid']}", f"ready at +{p['ready_after_seconds']:.1f} s (imports "
                                           f"{p['imports_seconds']:.1f} s, networks {p['load_seconds']:.1f} s), "
                                           f"{p['clips']} clips busy {p['busy_seconds']:.1f} s "
                                           f"(cpu {p['cpu_seconds']:.1f} s), done at +{p['last_clip_end_seconds']:.1f} s")
             for p in procs]
    rows += [("  ray.shutdown", f"{ray_stats.get('ray_shutdown_seconds', 0):.1f} s"),
             ("speed-up vs serial 1 thread / all threads",
              f"x{result['speedup_vs_serial_1_thread']:.2f} / x{result['speedup_vs_serial_all_threads']:.2f}"
              f" (target x{result['target_speedup']:.1f} vs the faster)"),
             ("serial == Ray per-clip values", str(same)),
             ("serial 1 thread == all threads values", str(same_all)),
             ("load average after", " ".join(f"{x:.2f}" for x in result["load_average_after"]))]
    report("evaluate", rows, result)
    return result


if __name__ == "__main__":
    main()
