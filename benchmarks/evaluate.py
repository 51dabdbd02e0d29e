"""Evaluation cost at the tiny preset: seconds per clip of each metric, and serial vs Ray speed-up.

    python benchmarks/evaluate.py [--clips 4 --steps 5 --workers 2]

Builds a throwaway project (synthetic corpus -> ingest, clip, crop, split; a fresh model: speed does not
depend on what the weights learned), times every step of one clip's evaluation (generation, landmarks,
each metric, at the params.yaml settings: cpbd on every frame, identity on 8 frames), then evaluates
`--clips` clips serially in-process (torch on 1 thread, as the Ray actors are, and on all cores) and
with `--workers` Ray actors on as many cores, and checks that the per-clip values agree.
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


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps per window (params.yaml: 25)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd
    import ray

    from singer.config import load_config
    from singer.evaluate.report import per_clip_frame
    from singer.evaluate.runner import WORKER_ENV, ClipEvaluator, run_clips

    tmp = Path(tempfile.mkdtemp(prefix="evb"))
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

        # per-clip cost of each step and metric (the networks already loaded)
        t0 = time.perf_counter()
        evaluator = ClipEvaluator(cfg, threads=1)
        load_s = time.perf_counter() - t0
        evaluator.evaluate(clips[0])  # warm-up (lazy dlib models, allocator)
        one = evaluator.evaluate(clips[0])
        costs = one["timings"]

        # serial vs Ray
        serial_cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"num_workers": 0})})
        t0 = time.perf_counter()
        serial_rows = run_clips(serial_cfg, clips, progress=False, threads=1)
        serial_1t = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_clips(serial_cfg, clips, progress=False, threads=None)
        serial_all = time.perf_counter() - t0

        ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
        os.environ["HOME"] = ray_tmp  # Ray 2.60's token auth writes ~/.ray/auth_token
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False,
                 runtime_env={"env_vars": {**WORKER_ENV, "HOME": ray_tmp}})
        ray_init = time.perf_counter() - t0
        ray_cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"num_workers": args.workers})})
        try:
            t0 = time.perf_counter()
            ray_rows = run_clips(ray_cfg, clips, progress=False, threads=1)
            parallel = time.perf_counter() - t0
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
        names = list(serial_rows[0]["results"])
        same = per_clip_frame(serial_rows, names).equals(per_clip_frame(ray_rows, names))
    finally:
        os.chdir(REPO)
        shutil.rmtree(tmp, ignore_errors=True)

    metric_keys = [k for k in costs if k not in ("load", "generate", "landmarks_generated", "landmarks_ground_truth")]
    result = {
        "preset": "tiny", "clips": len(clips), "frames_per_clip": int(one["n_frames"]), "steps": args.steps,
        "workers": args.workers, "cores": os.cpu_count(), "project_setup_seconds": setup,
        "networks_load_seconds": load_s, "per_clip_seconds": costs,
        "per_clip_total_seconds": float(sum(costs.values())),
        "serial_seconds_1_thread": serial_1t, "serial_seconds_all_threads": serial_all,
        "ray_init_seconds": ray_init, "ray_seconds": parallel,
        "speedup_vs_serial_1_thread": serial_1t / parallel, "speedup_vs_serial_all_threads": serial_all / parallel,
        "serial_equals_ray": bool(same),
    }
    rows = [("clip", f"{one['n_frames']} frames at {cfg.crop.resolution}², {args.steps} DDIM steps")]
    rows += [(f"  {k}", f"{costs[k]:.3f} s") for k in ("load", "generate", "landmarks_generated",
                                                        "landmarks_ground_truth") if k in costs]
    rows += [(f"  metric {k}", f"{costs[k]:.3f} s") for k in metric_keys]
    rows += [("per clip total", f"{result['per_clip_total_seconds']:.2f} s"),
             ("networks load (once per worker)", f"{load_s:.2f} s"),
             (f"serial, {len(clips)} clips, torch 1 thread", f"{serial_1t:.1f} s"),
             (f"serial, {len(clips)} clips, torch all threads", f"{serial_all:.1f} s"),
             (f"Ray, {args.workers} workers on {args.workers} cores", f"{parallel:.1f} s (+ ray.init {ray_init:.1f} s)"),
             ("speed-up vs serial 1 thread / all threads",
              f"x{result['speedup_vs_serial_1_thread']:.2f} / x{result['speedup_vs_serial_all_threads']:.2f}"),
             ("serial == Ray per-clip values", str(same))]
    report("evaluate", rows, result)
    return result


if __name__ == "__main__":
    main()
