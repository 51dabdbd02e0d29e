"""Shared bits of the benchmarks: a results table on stdout and a JSON file under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def matmul_peak_gflops(n: int = 1024, repeats: int = 10, device: str = "cpu", dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an n^3 matmul: the machine's practical peak for dense work."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def report(name: str, rows: list[tuple[str, str]], result: dict, out: Path | None = None) -> Path:
    width = max(len(k) for k, _ in rows)
    print(f"\n{name}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2, default=str) + "\n")
    print(f"  -> {path}")
    return path
