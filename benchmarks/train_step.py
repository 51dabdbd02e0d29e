"""Training step of the tiny preset on this machine: time, samples/s, achieved FLOP/s against the machine's
measured matmul peaks (fp32 and bf16), in fp32 and under bf16 autocast (`compute.dtype: bf16`), and the cost of
the spectral modules (step time full / no_both), all in one run.

    python benchmarks/train_step.py [--batch 2 --steps 6] [--compile]

FLOPs are counted with torch.utils.flop_counter on one step (matmuls and convolutions, forward and backward).
bf16 is mixed precision as training runs it (accelerate's autocast): fp32 weights and Adam, bf16 matmuls.
`--compile` adds a bf16 row with both UNets compiled (its compile time reported apart).
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


def time_steps(model, batch, steps: int, dtype=torch.float32) -> tuple[float, float]:
    """(median step seconds, first step seconds)."""
    from singer.compute import autocast

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast(dtype):
            loss, _ = model.training_loss(batch, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels (and compiles)
            times.append(time.perf_counter() - start)
        else:
            first = time.perf_counter() - start
    times.sort()
    return times[len(times) // 2], first


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from singer.compute import compile_module
    from singer.config import load_config
    from singer.models.singer import SingerModel

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", preset=args.preset)
    batch = batch_for(cfg, args.batch)
    peak = matmul_peak_gflops(2048, repeats=5)
    peak_bf16 = matmul_peak_gflops(2048, repeats=5, dtype=torch.bfloat16)
    settings = {"full fp32": (True, torch.float32, False), "full bf16": (True, torch.bfloat16, False),
                "no_both fp32": (False, torch.float32, False)}
    if args.compile:
        settings["full bf16 compiled"] = (True, torch.bfloat16, True)
    results = {}
    for name, (spectral, dtype, compiled) in settings.items():
        torch.manual_seed(0)
        model = SingerModel.build(cfg.model.model_copy(update={"msm": spectral, "sfm": spectral}), cfg.crop.resolution)
        model.set_trainable(list(cfg.train.trainable))
        if compiled:
            compile_module(model.denoising_unet)
            compile_module(model.reference_unet)
        step, first = time_steps(model, batch, args.steps, dtype)
        with FlopCounterMode(display=False) as counter:
            loss, _ = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
            loss.backward()
        flops = counter.get_total_flops()
        results[name] = {"step_seconds": step, "first_step_seconds": first, "samples_per_second": args.batch / step,
                         "gflop_per_step": flops / 1e9, "achieved_gflops": flops / 1e9 / step,
                         "fraction_of_fp32_peak": flops / 1e9 / step / peak,
                         "fraction_of_bf16_peak": flops / 1e9 / step / peak_bf16}
    full, fast, plain = results["full fp32"], results["full bf16"], results["no_both fp32"]
    result = {
        "preset": args.preset, "batch": args.batch, "frames": cfg.model.num_frames,
        "resolution": cfg.crop.resolution, "matmul_peak_gflops": peak, "matmul_peak_bf16_gflops": peak_bf16,
        "variants": results, "fraction_of_peak": full["achieved_gflops"] / peak,
        "bf16_speedup": full["step_seconds"] / fast["step_seconds"],
        "msm_sfm_overhead_ratio": full["step_seconds"] / plain["step_seconds"],
    }
    rows = [("matmul peak (2048^3)", f"fp32 {peak:.0f} GFLOP/s, bf16 {peak_bf16:.0f} GFLOP/s"),
            ("work per step, full", f"{full['gflop_per_step']:.1f} GFLOP")]
    for name, r in results.items():
        extra = f", first step {r['first_step_seconds']:.0f} s (compiles)" if "compiled" in name else ""
        rows.append((f"step, {name}", f"{r['step_seconds'] * 1000:.0f} ms = {r['achieved_gflops']:.0f} GFLOP/s = "
                                      f"{r['fraction_of_fp32_peak']:.1%} of fp32 peak, "
                                      f"{r['fraction_of_bf16_peak']:.1%} of bf16 peak{extra}"))
    rows += [("bf16 speed-up", f"x{result['bf16_speedup']:.2f} (full fp32 / full bf16 step time)"),
             ("MSM+SFM overhead", f"x{result['msm_sfm_overhead_ratio']:.3f} (full / no_both step time, fp32)")]
    report("train_step", rows, result)
    return result


if __name__ == "__main__":
    main()
