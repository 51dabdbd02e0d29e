"""Training step of the tiny preset on this machine: time, samples/s, achieved FLOP/s against the machine's
measured matmul peak, and the cost of the spectral modules (step time full / no_both), all in one run.

    python benchmarks/train_step.py [--batch 2 --steps 6]

FLOPs are counted with torch.utils.flop_counter on one step (matmuls and convolutions, forward and backward).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import matmul_peak_gflops, report  # noqa: E402


def batch_for(cfg, b: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r, f, m = cfg.crop.resolution, cfg.model.num_frames, cfg.model.motion_frames
    region = torch.zeros(b, 1, r, r)
    region[:, :, r // 8: -r // 8, r // 8: -r // 8] = 1
    masks = torch.cat([1 - region, region, torch.zeros_like(region)], dim=1)  # full, face, lip
    clip_frames = 50  # the dataset gives the whole 2-s clip's audio and where the window starts in it
    return {"frames": torch.rand(b, 3, f, r, r, generator=g) * 2 - 1,
            "motion": torch.rand(b, 3, m, r, r, generator=g) * 2 - 1,
            "reference": torch.rand(b, 3, r, r, generator=g) * 2 - 1,
            "audio": torch.randn(b, 16000 * max(clip_frames, f + m) // 25, generator=g) * 0.1,
            "audio_start_frame": torch.full((b,), m, dtype=torch.long),
            "masks": masks, "face_region": region,
            "face_embedding": torch.randn(b, cfg.model.face_embed_dim, generator=g) * 0.1}


def time_steps(model, batch, steps: int) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss, _ = model.training_loss(batch, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from singer.config import load_config
    from singer.models.singer import SingerModel

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", preset=args.preset)
    batch = batch_for(cfg, args.batch)
    peak = matmul_peak_gflops()
    results = {}
    for variant, (msm, sfm) in {"full": (True, True), "no_both": (False, False)}.items():
        torch.manual_seed(0)
        model = SingerModel.build(cfg.model.model_copy(update={"msm": msm, "sfm": sfm}), cfg.crop.resolution)
        model.set_trainable(list(cfg.train.trainable))
        step = time_steps(model, batch, args.steps)
        with FlopCounterMode(display=False) as counter:
            loss, _ = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
            loss.backward()
        flops = counter.get_total_flops()
        results[variant] = {"step_seconds": step, "samples_per_second": args.batch / step,
                            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / 1e9 / step}
    full, plain = results["full"], results["no_both"]
    result = {
        "preset": args.preset, "batch": args.batch, "frames": cfg.model.num_frames,
        "resolution": cfg.crop.resolution, "matmul_peak_gflops": peak, "variants": results,
        "fraction_of_peak": full["achieved_gflops"] / peak,
        "msm_sfm_overhead_ratio": full["step_seconds"] / plain["step_seconds"],
    }
    rows = [
        ("matmul peak (1024^3 fp32)", f"{peak:.0f} GFLOP/s"),
        ("step, full", f"{full['step_seconds'] * 1000:.0f} ms ({full['samples_per_second']:.2f} samples/s)"),
        ("step, no_both", f"{plain['step_seconds'] * 1000:.0f} ms"),
        ("work per step, full", f"{full['gflop_per_step']:.1f} GFLOP"),
        ("achieved, full", f"{full['achieved_gflops']:.1f} GFLOP/s = {result['fraction_of_peak']:.1%} of peak"),
        ("MSM+SFM overhead", f"x{result['msm_sfm_overhead_ratio']:.3f} (full / no_both step time)"),
    ]
    report("train_step", rows, result)
    return result


if __name__ == "__main__":
    main()
