"""Training: the loop (accelerate), atomic resumable checkpoints, sample videos.

Two helpers every training script needs before and after building its `Accelerator`:

    accelerator = Accelerator(cpu=want_cpu(), ...)
    check_world_size(accelerator)

`accelerate launch` with a multi-process profile on a machine without GPUs starts N processes through
torchrun, but each one comes up as a lone `DistributedType.NO` process (N independent trainings, each
writing the same checkpoints) unless the script asks for `cpu=True`; `want_cpu()` says when to, and
`check_world_size` turns the silent failure into an error.
"""

from __future__ import annotations

import os


def want_cpu() -> bool:
    """True when there is no CUDA device, or `ACCELERATE_USE_CPU` asks for the CPU: pass as `Accelerator(cpu=...)`."""
    if os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes"):
        return True
    import torch

    return not torch.cuda.is_available()


def check_world_size(accelerator) -> None:
    """Fail when the launcher started more processes than the accelerator joined (see the module doc)."""
    expected = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"launched as {expected} processes (WORLD_SIZE) but the Accelerator joined {accelerator.num_processes}; "
            "on a machine without GPUs build it with Accelerator(cpu=singer.train.want_cpu())"
        )
