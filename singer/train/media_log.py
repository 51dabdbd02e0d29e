"""Media for the training log: the loss plot (sample videos come from `singer.media.sample_video`).

    loss_plot([(1, 0.9), (2, 0.7), ...], "plots/loss.png")

Plots are drawn on a bare `matplotlib.figure.Figure` (Agg canvas, no pyplot, no display needed) and written
atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def loss_plot(
    history: Sequence[tuple[int, float]],
    path: str | os.PathLike,
    title: str = "training loss",
    smooth: float = 0.9,
) -> Path:
    """Plot (step, loss) pairs (raw, plus an exponential moving average with factor `smooth`) to an image."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global backend switch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(int(s), float(v)) for s, v in history]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if pairs:
        steps, losses = np.array(pairs, dtype=np.float64).T
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
        if len(losses) > 2 and 0 < smooth < 1:
            ema, acc = np.empty_like(losses), losses[0]
            for i, v in enumerate(losses):
                acc = smooth * acc + (1 - smooth) * v if np.isfinite(v) else acc
                ema[i] = acc
            ax.plot(steps, ema, color="tab:blue", linewidth=2, label=f"EMA {smooth}")
        if np.all(losses[np.isfinite(losses)] > 0) and np.isfinite(losses).any():
            span = np.nanmax(losses) / max(np.nanmin(losses[losses > 0]), 1e-12)
            if span > 50:
                ax.set_yscale("log")
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
