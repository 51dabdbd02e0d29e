"""Training step of the tiny preset's UNets alone (denoising 3D UNet + reference 2D UNet + face locator, no
autoencoder, audio encoder or spectral-module bookkeeping around them): time per step on this machine.

    python benchmarks/unet_step.py [--batch 2 --frames 8 --references 3 --steps 4]

DESIGN section 6 measured a diffusers ``UNetMotionModel`` of a similar size at ~450 ms per training step
(8 frames, batch 1); this is the number to hold ours against. Formerly a unit test asserting < 10 s
(tests/test_unet.py), which said nothing on a shared machine.
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
from common import report  # noqa: E402


def inputs(cfg, b: int, f: int, r: int, seed: int = 0) -> dict:
    """Random UNet inputs shaped as the tiny preset makes them (latents = crop resolution / pixel shuffle)."""
    m = cfg.model
    s = cfg.crop.resolution // (m.pixel_shuffle_factor if m.autoencoder == "pixel_shuffle" else 8)
    g = torch.Generator().manual_seed(seed)
    res = cfg.crop.resolution
    return {
        "sample": torch.randn(b, m.latent_channels, f, s, s, generator=g),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "face_tokens": torch.randn(b, m.face_tokens, m.cross_attention_dim, generator=g),
        "audio_tokens": torch.randn(b, f, m.audio_tokens, m.cross_attention_dim, generator=g),
        "references": torch.randn(b * r, m.latent_channels, s, s, generator=g),
        "masks": {name: (torch.rand(b, 1, s, s, generator=g) > 0.5).float() for name in ("full", "face", "lip")},
        "locator_mask": torch.rand(b, 1, f, res, res, generator=g),
        "latent_size": s,
    }


def train_step(den, ref, loc, inp: dict, references: int) -> torch.Tensor:
    states = ref(inp["references"], 0, face_tokens=inp["face_tokens"], references_per_sample=references)
    out = den(inp["sample"], inp["timestep"], face_tokens=inp["face_tokens"], audio_tokens=inp["audio_tokens"],
              reference_states=states, masks=inp["masks"], face_features=loc(inp["locator_mask"]))
    loss = (out - inp["sample"]).pow(2).mean()
    loss.backward()
    return loss


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--references", type=int, default=3, help="reference frame + motion frames per sample")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one more warms up first)")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    from singer.config import load_config
    from singer.models.face_locator import FaceLocator
    from singer.models.unet_denoising import DenoisingUNet3D
    from singer.models.unet_reference import ReferenceUNet2D

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", preset=args.preset)
    torch.manual_seed(0)
    den = DenoisingUNet3D.from_model_config(cfg.model).train()
    ref = ReferenceUNet2D.from_model_config(cfg.model).train()
    loc = FaceLocator.from_model_config(cfg.model).train()
    modules = (den, ref, loc)
    params = [p for module in modules for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inp = inputs(cfg, args.batch, args.frames, args.references)
    times = []
    for i in range(args.steps + 1):  # the first step warms up (oneDNN primitives, allocator)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        train_step(den, ref, loc, inp, args.references)
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    n_params = {name: sum(p.numel() for p in module.parameters())
                for name, module in zip(("denoising_unet", "reference_unet", "face_locator"), modules)}
    result = {
        "preset": args.preset, "batch": args.batch, "frames": args.frames, "references": args.references,
        "latents": [cfg.model.latent_channels, inp["latent_size"], inp["latent_size"]],
        "parameters": n_params, "step_seconds_min": times[0], "step_seconds_median": median,
        "step_seconds_all": times, "design_reference_seconds": 0.45,
    }
    c, s = cfg.model.latent_channels, inp["latent_size"]
    rows = [
        ("preset, inputs", f"{args.preset}: B={args.batch}, F={args.frames}, R={args.references}, "
                           f"latents {c}x{s}x{s}"),
        ("parameters", ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n_params.items())),
        ("step, min", f"{times[0] * 1000:.0f} ms"),
        ("step, median", f"{median * 1000:.0f} ms (of {len(times)})"),
        ("DESIGN 6 reference", "~450 ms (diffusers UNetMotionModel, 2.2 M parameters, batch 1)"),
    ]
    report("unet_step", rows, result)
    return result


if __name__ == "__main__":
    main()
