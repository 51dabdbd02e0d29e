"""Generation speed at the tiny preset: seconds of compute per second of generated video, 25 DDIM steps.

    python benchmarks/generate.py [--seconds 2 --steps 25]

The weights are a fresh model's: speed does not depend on what the weights learned.
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
    args = parser.parse_args()

    from skimage import data

    from singer.config import load_config
    from singer.faces import DlibFaceEmbedder, prepare_reference
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    pipe = SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution)
    start = time.perf_counter()
    reference = prepare_reference(data.astronaut(), cfg.crop.resolution)
    embedding = DlibFaceEmbedder().embed(reference["image"], reference["landmarks"])
    prepare = time.perf_counter() - start
    t = np.arange(int(16000 * args.seconds)) / 16000
    song = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    start = time.perf_counter()
    out = pipe(reference, song, embedding, num_inference_steps=args.steps,
               generator=torch.Generator().manual_seed(0), progress=False)
    seconds = time.perf_counter() - start
    video_seconds = len(out.frames) / out.fps
    windows = int(np.ceil(len(out.frames) / cfg.model.num_frames))
    result = {"preset": "tiny", "steps": args.steps, "frames": len(out.frames), "windows": windows,
              "compute_seconds": seconds, "video_seconds": video_seconds,
              "compute_per_video_second": seconds / video_seconds,
              "seconds_per_denoising_step": seconds / (windows * args.steps), "prepare_reference_seconds": prepare}
    rows = [("video", f"{video_seconds:.1f} s, {len(out.frames)} frames, {windows} windows of {cfg.model.num_frames}"),
            ("compute", f"{seconds:.1f} s ({args.steps} steps, CFG batched)"),
            ("compute per video second", f"{result['compute_per_video_second']:.1f} s"),
            ("per denoising step", f"{result['seconds_per_denoising_step'] * 1000:.0f} ms"),
            ("reference crop + embedding", f"{prepare:.2f} s")]
    report("generate", rows, result)
    return result


if __name__ == "__main__":
    main()
