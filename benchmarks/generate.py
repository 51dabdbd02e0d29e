"""Generation speed at the tiny preset: seconds of compute per second of generated video, per compute setting.

    python benchmarks/generate.py [--seconds 2 --steps 25 --fast-steps 5] [--compile]

In one run, on one fresh model (speed does not depend on what the weights learned) and one song:
- fp32, DDIM at `--steps` (the exact path, the baseline);
- bf16 autocast (`compute.dtype: bf16`, where the CPU has bf16 matrix units), DDIM at `--steps`;
- bf16, DPM-Solver++ at `--fast-steps` (the tiny preset's default sampling, params.yaml `model.sampler`);
- with `--compile`: the bf16 DDIM row again with the denoising UNet compiled (the first call, which compiles,
  is reported apart; inductor caches the compiled kernels for later processes).
Each row gives compute / video seconds and its speed-up over the fp32 row, and the pixel difference of its
video from the fp32 DDIM video (mean absolute, of 255). Writes `benchmarks/results/generate.json`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import report  # noqa: E402


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--fast-steps", type=int, default=5)
    parser.add_argument("--fast-sampler", default="dpm_solver")
    parser.add_argument("--compile", action="store_true", help="also time the compiled UNet (minutes to compile)")
    args = parser.parse_args()

    from skimage import data

    from singer.compute import cpu_bf16_flags
    from singer.config import ComputeConfig, load_config
    from singer.faces import DlibFaceEmbedder, prepare_reference
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    model = SingerModel.build(cfg.model, cfg.crop.resolution).eval()
    pipe = SingerPipeline.from_model(model, cfg.crop.resolution)
    start = time.perf_counter()
    reference = prepare_reference(data.astronaut(), cfg.crop.resolution)
    embedding = DlibFaceEmbedder().embed(reference["image"], reference["landmarks"])
    prepare = time.perf_counter() - start
    t = np.arange(int(16000 * args.seconds)) / 16000
    song = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)

    def generate(steps: int, sampler: str) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        out = pipe(reference, song, embedding, num_inference_steps=steps, sampler=sampler,
                   generator=torch.Generator().manual_seed(0), progress=False)
        return out.frames, time.perf_counter() - start

    settings = [("fp32", "ddim", args.steps), ("bf16", "ddim", args.steps),
                ("bf16", args.fast_sampler, args.fast_steps)]
    runs, base = {}, None
    for dtype, sampler, steps in settings:
        pipe.set_compute(ComputeConfig(dtype=dtype))
        frames, seconds = generate(steps, sampler)
        base = frames if base is None else base
        runs[f"{dtype} {sampler} {steps}"] = {"dtype": dtype, "sampler": sampler, "steps": steps, "seconds": seconds,
                                              "frames": frames}
    if args.compile:
        pipe.set_compute(ComputeConfig(dtype="bf16", compile=True))
        start = time.perf_counter()
        generate(1, "ddim")  # the first call compiles (every window has the same shapes)
        compile_seconds = time.perf_counter() - start
        frames, seconds = generate(args.steps, "ddim")
        runs[f"bf16 ddim {args.steps} compiled"] = {"dtype": "bf16", "sampler": "ddim", "steps": args.steps,
                                                    "seconds": seconds, "frames": frames,
                                                    "compile_seconds": compile_seconds, "compiled": True}

    n = len(base)
    video_seconds = n / pipe.fps
    windows = int(np.ceil(n / cfg.model.num_frames))
    fp32 = runs[f"fp32 ddim {args.steps}"]["seconds"]
    rows, table = [], {}
    for name, run in runs.items():
        frames = run.pop("frames")
        run.update(compute_per_video_second=run["seconds"] / video_seconds, speedup_over_fp32=fp32 / run["seconds"],
                   seconds_per_denoising_step=run["seconds"] / (windows * run["steps"]),
                   pixel_difference_vs_fp32=float(np.abs(frames.astype(np.float64) - base).mean()))
        table[name] = run
        extra = f", compile {run['compile_seconds']:.0f} s apart" if "compile_seconds" in run else ""
        rows.append((name, f"{run['compute_per_video_second']:.2f} s per video second (x{run['speedup_over_fp32']:.2f}, "
                           f"{run['seconds_per_denoising_step'] * 1000:.0f} ms/step, pixel diff "
                           f"{run['pixel_difference_vs_fp32']:.2f}/255{extra})"))
    result = {"preset": "tiny", "frames": n, "windows": windows, "video_seconds": video_seconds, "runs": table,
              "cpu_bf16_flags": list(cpu_bf16_flags()), "prepare_reference_seconds": prepare}
    rows = [("video", f"{video_seconds:.1f} s, {n} frames, {windows} windows of {cfg.model.num_frames}, CFG batched"),
            *rows, ("reference crop + embedding", f"{prepare:.2f} s"),
            ("bf16 matrix units", ", ".join(cpu_bf16_flags()) or "none (bf16 is emulated: slower)")]
    report("generate", rows, result)
    return result


if __name__ == "__main__":
    main()
