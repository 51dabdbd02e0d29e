"""Sample videos a person can judge, for training and evaluation: reference | ground truth | generated, side by
side, each panel scaled up (nearest neighbour, a whole factor) to at least `MIN_PANEL` pixels, with the driving
audio; and the mouth-opening plot that goes next to it.

    frames = side_by_side(gt, gen, reference=ref)                     # (T, k*H, 3*k*W, 3), k = ceil(256 / H)
    write_sample_video("samples/step-000100.mp4", gt, gen, fps=25, audio=wav, sample_rate=16000, reference=ref)
    write_mouth_plot("samples/step-000100.png", truth_curve, generated_curve, title="subject_002/take_00")

Nearest neighbour because a 64^2 model's pixels are what is being judged: a smooth upscale would hide them. A
whole factor keeps every model pixel the same size on screen.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from einops import repeat

from singer.media.video import write_video

MIN_PANEL = 256  # pixels: a 64^2 panel becomes 256^2, so a 3-panel video is 768 wide, about a player's width


def _as_video(name: str, frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{name} must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    return frames


def upscale_factor(height: int, min_panel: int = MIN_PANEL) -> int:
    """The smallest whole factor that makes `height` at least `min_panel` (1 for panels already that tall)."""
    return max(1, math.ceil(min_panel / max(1, int(height))))


def side_by_side(ground_truth: np.ndarray, generated: np.ndarray, reference: np.ndarray | None = None,
                 min_panel: int = MIN_PANEL) -> np.ndarray:
    """(T,H,W,3) uint8 twice (and an optional (H,W,3) reference) -> (T, k*H, P*k*W, 3) uint8, P = 2 or 3 panels:
    reference (the same image on every frame), ground truth, generated; k = upscale_factor(H, min_panel)."""
    gt = _as_video("ground_truth", ground_truth)
    gen = _as_video("generated", generated)
    if gt.shape != gen.shape:
        raise ValueError(f"ground truth {gt.shape} and generated {gen.shape} differ in shape")
    panels = [gt, gen]
    if reference is not None:
        ref = np.asarray(reference)
        if ref.shape != gt.shape[1:] or ref.dtype != np.uint8:
            raise ValueError(f"reference must be {gt.shape[1:]} uint8 like a frame, got {ref.shape} {ref.dtype}")
        panels.insert(0, repeat(ref, "h w c -> t h w c", t=len(gt)))
    k = upscale_factor(gt.shape[1], min_panel)
    return repeat(np.stack(panels), "p t h w c -> t (h k1) (p w k2) c", k1=k, k2=k)


def write_sample_video(
    path: str | os.PathLike,
    ground_truth: np.ndarray,
    generated: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    reference: np.ndarray | None = None,
    min_panel: int = MIN_PANEL,
) -> Path:
    """An mp4 (H.264, AAC) of [reference |] ground truth | generated, upscaled, with the driving audio muxed in,
    written atomically."""
    frames = side_by_side(ground_truth, generated, reference=reference, min_panel=min_panel)
    return write_video(path, frames, fps=fps, audio=audio, sample_rate=sample_rate)


def write_mouth_plot(path: str | os.PathLike, truth: np.ndarray | None, generated: np.ndarray, title: str = "",
                     fps: float = 25.0) -> Path:
    """A PNG of the mouth opening per frame (`singer.faces.mouth_opening`: inner-lip gap / inter-ocular distance),
    ground truth against generated, over time in seconds; NaN (no face found) leaves gaps. Written atomically."""
    from matplotlib.figure import Figure

    from singer.io import write_png_atomic

    fig = Figure(figsize=(7.68, 2.4), dpi=100)  # as wide as a 3-panel video of 256-pixel panels
    ax = fig.add_subplot(1, 1, 1)
    gen = np.asarray(generated, np.float64).reshape(-1)
    if truth is not None:
        t = np.asarray(truth, np.float64).reshape(-1)
        ax.plot(np.arange(len(t)) / fps, t, label="ground truth", color="black")
    ax.plot(np.arange(len(gen)) / fps, gen, label="generated", color="tab:red")
    ax.set_xlabel("seconds")
    ax.set_ylabel("mouth opening")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return write_png_atomic(path, fig)
