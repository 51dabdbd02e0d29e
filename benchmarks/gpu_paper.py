"""The `paper` preset on a GPU: training step in bf16 (time, peak memory) and generation seconds per frame
at 512^2. Weights are random (speed and memory do not depend on them); nothing is downloaded.

    python benchmarks/gpu_paper.py [--steps 5 --batch 1 --inference-steps 40]

On a machine without CUDA it says so and exits 0 without measuring anything.
Setup as the paper: 16 frames (R = 1 reference + 2 motion frames), 512^2, frozen VAE / reference UNet /
denoising UNet / face encoder, trainable audio encoder + projection + MSM + SFM (params.yaml presets.paper),
frozen weights in bf16, trainable ones in fp32 under bf16 autocast, gradient checkpointing on the UNets.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import matmul_peak_gflops, report, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_sd_vae(folder: Path) -> Path:
    """An AutoencoderKL with the SD-1.5 VAE config and random weights, saved where the config can load it."""
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, sample_size=512).save_pretrained(folder)
    return folder


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--inference-steps", type=int, default=4, help="steps timed (the per-frame figure is "
                        "scaled to the preset's inference_steps)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda", help="cuda; `--device cpu --preset tiny` smoke-tests this script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured (run this on a CUDA machine)")
        return 0
    cuda = device.startswith("cuda")

    from singer.config import load_config
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    torch.backends.cuda.matmul.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp(prefix="singer-gpu-"))
    overrides = ["model.audio_encoder_path=null"]
    if load_config(ROOT / "params.yaml", preset=args.preset).model.autoencoder == "kl":
        overrides.append(f"model.autoencoder_path={random_sd_vae(tmp / 'vae')}")
    cfg = load_config(ROOT / "params.yaml", preset=args.preset, overrides=overrides)
    res, f, m = cfg.crop.resolution, cfg.model.num_frames, cfg.model.motion_frames
    torch.manual_seed(0)
    model = SingerModel.build(cfg.model, res, seed=0)
    names = set(model.set_trainable(list(cfg.train.trainable)))
    for name, p in model.named_parameters():
        p.data = p.data.to(device, torch.float32 if name in names else torch.bfloat16)
    for b in model.buffers():
        b.data = b.data.to(device)
    if not args.no_checkpointing:
        model.denoising_unet.enable_gradient_checkpointing()
        model.reference_unet.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    b = args.batch
    masks = torch.zeros(b, 3, res, res, device=device)
    masks[:, :, res // 8: -res // 8, res // 8: -res // 8] = 1
    batch = {"frames": torch.rand(b, 3, f, res, res, device=device) * 2 - 1,
             "motion": torch.rand(b, 3, m, res, res, device=device) * 2 - 1,
             "reference": torch.rand(b, 3, res, res, device=device) * 2 - 1,
             "audio": torch.randn(b, 16000 * f // 25, device=device) * 0.1, "masks": masks,
             "face_embedding": torch.randn(b, cfg.model.face_embed_dim, device=device)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    reset_peak(cuda)
    times = []
    for i in range(args.steps + 1):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss, _ = model.training_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    step = float(np.median(times))
    train_peak = peak_gib(cuda)

    del opt
    model.zero_grad(set_to_none=True)
    reset_peak(cuda)
    pipe = SingerPipeline.from_model(model, res)
    reference = {"image": np.full((res, res, 3), 128, np.uint8),
                 "masks": {k: masks[0, i].cpu().numpy() for i, k in enumerate(("face", "lip", "pose"))}}
    audio = np.random.default_rng(0).standard_normal(16000 * f // 25).astype(np.float32) * 0.1
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        pipe(reference, audio, np.zeros(cfg.model.face_embed_dim, np.float32), num_inference_steps=1, progress=False)
        sync(device)
        start = time.perf_counter()
        pipe(reference, audio, np.zeros(cfg.model.face_embed_dim, np.float32),
             num_inference_steps=args.inference_steps, progress=False)
        sync(device)
    gen = time.perf_counter() - start
    gen_peak = peak_gib(cuda)
    per_step_window = gen / args.inference_steps
    per_frame = per_step_window * cfg.model.inference_steps / f
    result = {
        "preset": args.preset, "device": device, "resolution": res, "frames": f, "batch": b,
        "gradient_checkpointing": not args.no_checkpointing,
        "parameters": n_params, "trainable_parameters": n_train, "train_step_seconds": step,
        "train_peak_memory_gib": train_peak, "generation_seconds_per_step_per_window": per_step_window,
        "generation_seconds_per_frame": per_frame, "inference_steps": cfg.model.inference_steps,
        "generation_peak_memory_gib": gen_peak, "bf16_matmul_tflops": matmul_peak_gflops(8192 if cuda else 512, 20, device, torch.bfloat16) / 1e3,
    }
    rows = [("device", torch.cuda.get_device_name(0) if cuda else "cpu"),
            ("parameters", f"{n_params / 1e9:.2f} B ({n_train / 1e6:.0f} M trainable)"),
            ("train step, bf16", f"{step:.2f} s (batch {b}, {f} frames, {res}^2)"),
            ("train peak memory", f"{train_peak:.1f} GiB" if cuda else "n/a on CPU"),
            ("generation", f"{per_frame:.2f} s per frame at {cfg.model.inference_steps} steps "
                           f"({per_step_window:.2f} s per step per {f}-frame window, CFG batched)"),
            ("generation peak memory", f"{gen_peak:.1f} GiB" if cuda else "n/a on CPU"),
            ("bf16 matmul", f"{result['bf16_matmul_tflops']:.1f} TFLOP/s")]
    report("gpu_paper" if cuda else f"gpu_paper-smoke-{device}", rows, result, out=args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
