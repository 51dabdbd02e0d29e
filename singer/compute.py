"""How the networks compute: the number format (`compute.dtype`) and graph compilation (`compute.compile`).

    dtype = resolve_dtype(cfg.compute.dtype, "cpu")   # torch.bfloat16 on a CPU with bf16 matrix units, else float32
    with autocast(dtype, "cpu"):                       # a no-op for float32
        v = model.denoise(z, t, cond)
    compile_module(model.denoising_unet)               # torch.compile in place: parameter names are unchanged

Mixed precision, not low precision: the weights, the optimizer state and the sampler's arithmetic stay float32;
``torch.autocast`` runs matmuls and convolutions in bf16 (where the hardware does them fast) and keeps
reductions (softmax, norms, the loss) in float32. ``auto`` picks bf16 only where it was measured to pay: a CUDA
device that supports bf16 (training and generation), and generation on a CPU that reports bf16 matrix
instructions (AMX or AVX512-BF16: matmuls at 1.8-2.7 TFLOP/s against 0.3-0.4 fp32 on this project's 2-core
machines). Training on a CPU stays fp32 under ``auto``: the tiny model's step is bound by per-op overhead, and
autocast's casts made it slower (x0.95, benchmarks/train_step.py); ``bf16`` asks for it anyway. ``fp32`` is the
exact path: the outputs are those of a run without this module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16", "fp16")
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 matrix-instruction flags this CPU reports (Linux ``/proc/cpuinfo``); () where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in _CPU_BF16_FLAGS if f in flags)
    return ()


def resolve_dtype(setting: str, device: str | torch.device = "cpu", training: bool = False) -> torch.dtype:
    """`compute.dtype` -> the autocast dtype on `device` (torch.float32: no autocast); `training`: for a training
    step (``auto`` keeps a CPU's training in fp32, module docstring).

    ``SINGER_COMPUTE_DTYPE`` in the environment wins over `setting` (a worker can be pinned without a new
    params.yaml). An explicit bf16/fp16 that the device cannot run falls back to float32 with a warning."""
    setting = os.environ.get("SINGER_COMPUTE_DTYPE", setting) or "auto"
    if setting not in DTYPES:
        raise ValueError(f"compute.dtype must be one of {', '.join(DTYPES)}, got {setting!r}")
    kind = torch.device(device).type
    if setting == "fp32":
        return torch.float32
    if kind == "cuda":
        if setting in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if setting == "auto":
            return torch.float32
        if setting == "bf16":
            log.warning("compute.dtype bf16: this GPU does not support it; computing in fp32")
            return torch.float32
        return torch.float16
    if setting == "fp16":
        log.warning("compute.dtype fp16 is for GPUs; computing in fp32 on the %s", kind)
        return torch.float32
    if setting == "auto" and training:  # measured slower on the CPU (module docstring)
        return torch.float32
    if cpu_bf16_flags():
        return torch.bfloat16
    if setting == "bf16":  # asked for explicitly: honoured (correct, only slower than it could be)
        log.warning("compute.dtype bf16: this CPU has no bf16 matrix units (%s); bf16 will be emulated",
                    "/".join(_CPU_BF16_FLAGS))
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def accelerate_mixed_precision(dtype: torch.dtype) -> str:
    """The `Accelerator(mixed_precision=...)` value for an autocast dtype."""
    return {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(dtype: torch.dtype, device: str | torch.device = "cpu"):
    """``torch.autocast`` for `dtype` on `device`; a null context for float32 (the exact path)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def compile_module(module: torch.nn.Module, enabled: bool = True, dynamic: bool = False) -> torch.nn.Module:
    """``module.compile()`` (inductor) in place, so state_dict keys, hooks and ``save_pretrained`` are
    unchanged. The first call of each new input shape pays the compile (minutes on 2 cores; inductor's FX graph
    cache, on by default, keeps it for later processes); later calls run the fused kernels."""
    if enabled and not getattr(module, "_singer_compiled", False):
        module.compile(dynamic=dynamic)
        module._singer_compiled = True
    return module
