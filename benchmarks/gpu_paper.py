"""The `paper` preset on a GPU through the released-weights path: a fabricated Hallo ``pretrained_models/`` (the
released key names and full shapes, random values; ``benchmarks/fabricate.py``) -> ``convert_files`` ->
``model.pretrained`` -> one bf16 training step at 512^2, 16+2 frames (time, peak memory, FLOP utilisation against
a measured bf16 matmul peak) and one generated window at 40 steps with classifier-free guidance (seconds per frame).

    python benchmarks/gpu_paper.py                      # the GPU run (about 4 min on one H100-class GPU)
    python benchmarks/gpu_paper.py --dry-run            # the same code on the CPU at shrunk widths, 64^2, 4 frames

On a bare GPU machine (Linux, CUDA driver, Python 3.11), from the repository root, offline once the wheels are
there: ``make install`` (pip installs torch 2.13.0 first: where pip finds PyPI's CUDA build the CUDA runtime wheels
come with it; then the lock with uv, about 2 min from a warm cache) and
``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/gpu_paper.py``. Without a venv build: ``pip install
torch==2.13.0 && pip install -e .`` (unpinned). The run needs about 20 GB of disk (the fabricated release, then
its conversion, in the work folder), 40 GB of host memory and 40 GB of GPU memory; everything is random and local,
nothing is downloaded. Without CUDA (and without --dry-run) it says so and exits 0.

Setup as the paper: frozen VAE / reference UNet / denoising UNet / face locator / face encoder in bf16, trainable
audio encoder + projection + MSM + SFM in fp32 under bf16 autocast (params.yaml presets.paper), gradient
checkpointing on the denoising UNet (train.gradient_checkpointing). FLOPs are counted by
torch.utils.flop_counter over one step, recomputation included (hardware FLOPs).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import matmul_peak_gflops, report, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prepare_release(work: Path, shrink: list[str] | None) -> tuple[Path, dict]:
    """Fabricate pretrained_models/ under `work` and convert it (fp16 kept); -> (converted folder, seconds)."""
    import fabricate
    from paper_rehearsal import seed_model_for_shrunk

    from singer.models.convert import convert_files

    release = work / "pretrained_models"
    times = {}
    start = time.perf_counter()
    if shrink is not None:
        shutil.copy(ROOT / "params.yaml", work / "params.yaml")
        fabricate.fabricate_from_model(release, seed_model_for_shrunk(work, shrink))
    else:
        fabricate.fabricate_released(release)
    times["fabricate_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    convert_files(release, release / "converted", dtype=None)
    times["convert_seconds"] = time.perf_counter() - start
    for name in ("hallo/net.pth", "motion_module/mm_sd_v15_v2.ckpt"):  # one copy of the UNets on disk
        (release / name).unlink()
    return release / "converted", times


def inputs(cfg, device: str) -> tuple[dict, dict, np.ndarray]:
    """A training batch (B=1), a reference for the pipeline and one window of audio, all random."""
    res, f, m = cfg.crop.resolution, cfg.model.num_frames, cfg.model.motion_frames
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, 3, res, res)
    masks[:, 0] = 1
    masks[:, 0, res // 8: -res // 8, res // 8: -res // 8] = 0                 # full: the background
    masks[:, 1, res // 8: -res // 8, res // 8: -res // 8] = 1                 # face
    masks[:, 2, res // 2: res * 3 // 4, res // 3: res * 2 // 3] = 1           # lip
    region = 1 - masks[:, :1]
    batch = {"frames": torch.rand(1, 3, f, res, res, generator=g) * 2 - 1,
             "motion": torch.rand(1, 3, m, res, res, generator=g) * 2 - 1,
             "reference": torch.rand(1, 3, res, res, generator=g) * 2 - 1,
             "audio": torch.randn(1, 16000 * f // 25, generator=g) * 0.1, "masks": masks, "face_region": region,
             "face_embedding": torch.randn(1, cfg.model.face_embed_dim, generator=g)}
    reference = {"image": np.full((res, res, 3), 128, np.uint8),
                 "masks": {"full": masks[0, 0].numpy(), "face": masks[0, 1].numpy(), "lip": masks[0, 2].numpy(),
                           "face_region": region[0, 0].numpy()}}
    audio = np.random.default_rng(0).standard_normal(16000 * f // 25).astype(np.float32) * 0.1
    return {k: v.to(device) for k, v in batch.items()}, reference, audio


def peak_memory_gib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # host RSS (KiB on Linux)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="CPU, shrunk widths, 64^2, 4+2 frames, 2 steps")
    parser.add_argument("--resolution", type=int, default=None, help="default: the preset's (512)")
    parser.add_argument("--frames", type=int, default=None, help="default: the preset's (16)")
    parser.add_argument("--inference-steps", type=int, default=None, help="default: the preset's (40)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.resolution, args.frames = args.resolution or 64, args.frames or 4
        args.inference_steps = args.inference_steps or 2
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured (run this on a CUDA machine, or "
              "--dry-run for the CPU code path)")
        return 0

    from singer.config import load_config
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline
    from singer.train.loop import enable_gradient_checkpointing

    torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(args.workdir or tempfile.mkdtemp(prefix="singer-gpu-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        import fabricate

        size = [f"crop.resolution={args.resolution}"] if args.resolution else []
        size += [f"model.num_frames={args.frames}"] if args.frames else []
        shrink = fabricate.shrunk_paper_overrides(work / "pretrained_models", args.resolution,
                                                  args.frames) if args.dry_run else None
        converted, times = prepare_release(work, None if shrink is None else shrink + size)
        release = work / "pretrained_models"
        paths = [f"model.autoencoder_path={release / 'sd-vae-ft-mse'}",
                 f"model.audio_encoder_path={release / 'wav2vec/wav2vec2-base-960h'}"]
        cfg = load_config(ROOT / "params.yaml", preset="paper",
                          overrides=(shrink or []) + size + paths + [f"model.pretrained={converted}"])
        res, f, m = cfg.crop.resolution, cfg.model.num_frames, cfg.model.motion_frames
        start = time.perf_counter()
        model = SingerModel.build(cfg.model, res, seed=0)
        times["build_and_load_seconds"] = time.perf_counter() - start
        counts = model.pretrained_report.summary()
        names = set(model.set_trainable(list(cfg.train.trainable)))
        for name, p in model.named_parameters():
            p.data = p.data.to(device, torch.float32 if name in names else torch.bfloat16)
        for b in model.buffers():
            b.data = b.data.to(device)
        checkpointing = [] if args.no_checkpointing else enable_gradient_checkpointing(model)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        batch, reference, audio = inputs(cfg, device)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

        def train_step() -> float:
            sync(device)
            begin = time.perf_counter()
            with autocast:
                loss, _ = model.training_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()}")
            return time.perf_counter() - begin

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train_step()  # warm-up: allocator, kernels
        step = train_step()
        train_peak = peak_memory_gib(cuda)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            train_step()
        flops = counter.get_total_flops()
        peak = matmul_peak_gflops(8192 if cuda else 1024, 20, device, torch.bfloat16) * 1e9

        opt = None  # its moments go before generation
        model.zero_grad(set_to_none=True)
        model.eval()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        pipe = SingerPipeline.from_model(model, res)
        steps = args.inference_steps or cfg.model.inference_steps
        embedding = np.random.default_rng(1).standard_normal(cfg.model.face_embed_dim).astype(np.float32)
        guidance = cfg.model.guidance_scale
        with autocast:
            pipe(reference, audio, embedding, num_inference_steps=1, guidance_scale=guidance, progress=False)
            sync(device)
            begin = time.perf_counter()
            out = pipe(reference, audio, embedding, num_inference_steps=steps, guidance_scale=guidance,
                       progress=False)
            sync(device)
        gen = time.perf_counter() - begin
        if out.frames.shape[0] != f or not np.isfinite(out.frames).all():
            raise RuntimeError(f"generated {out.frames.shape} frames, expected {f}")
        gen_peak = peak_memory_gib(cuda)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "preset": "paper", "dry_run": args.dry_run, "device": device, "resolution": res, "frames": f,
        "motion_frames": m, "batch": 1, "gradient_checkpointing": checkpointing, "pretrained": counts,
        "parameters": n_params, "trainable_parameters": n_train, **{k: round(v, 2) for k, v in times.items()},
        "train_step_seconds": step, "train_peak_memory_gib": train_peak, "train_step_flops": flops,
        "bf16_matmul_peak_tflops": peak / 1e12, "flop_utilisation": flops / step / peak,
        "inference_steps": steps, "guidance_scale": guidance, "generation_seconds": gen,
        "generation_seconds_per_frame": gen / f, "generation_peak_memory_gib": gen_peak,
    }
    memory = "GPU" if cuda else "host RSS"
    rows = [("device", torch.cuda.get_device_name(0) if cuda else "cpu (dry run)" if args.dry_run else "cpu"),
            ("weights", f"fabricated release -> convert -> model.pretrained: {counts}"),
            ("parameters", f"{n_params / 1e9:.2f} B ({n_train / 1e6:.0f} M trainable)"),
            ("preparation", f"fabricate {times['fabricate_seconds']:.0f} s, convert {times['convert_seconds']:.0f} s, "
                            f"build + load {times['build_and_load_seconds']:.0f} s"),
            ("train step, bf16", f"{step:.2f} s (batch 1, {f}+{m} frames, {res}^2, checkpointing "
                                 f"{', '.join(checkpointing) or 'off'})"),
            ("train peak memory", f"{train_peak:.1f} GiB ({memory})"),
            ("FLOP utilisation", f"{flops / 1e12:.1f} TFLOP per step = {flops / step / 1e12:.1f} TFLOP/s, "
                                 f"{result['flop_utilisation']:.1%} of the measured bf16 matmul peak "
                                 f"{peak / 1e12:.0f} TFLOP/s"),
            ("generation", f"{gen / f:.2f} s per frame at {steps} steps, guidance {guidance} "
                           f"({gen:.1f} s for one {f}-frame window, CFG batched)"),
            ("generation peak memory", f"{gen_peak:.1f} GiB ({memory})")]
    report("gpu_paper" if cuda else "gpu_paper-dry-run", rows, result, out=args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
