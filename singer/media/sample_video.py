"""Side-by-side sample videos (ground truth | generated, with the driving audio), for training and evaluation.

    frames = side_by_side(gt, gen)                                   # (T, H, 2W, 3)
    write_sample_video("samples/step-000100.mp4", gt, gen, fps=25, audio=wav, sample_rate=16000)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from singer.media.video import write_video


def _as_video(name: str, frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{name} must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    return frames


def side_by_side(ground_truth: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """(T,H,W,3) uint8 twice -> (T,H,2W,3): ground truth on the left, generated on the right."""
    gt = _as_video("ground_truth", ground_truth)
    gen = _as_video("generated", generated)
    if gt.shape != gen.shape:
        raise ValueError(f"ground truth {gt.shape} and generated {gen.shape} differ in shape")
    return np.concatenate([gt, gen], axis=2)


def write_sample_video(
    path: str | os.PathLike,
    ground_truth: np.ndarray,
    generated: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> Path:
    """An mp4 (H.264, AAC) of ground truth | generated with the driving audio muxed in, written atomically."""
    return write_video(
        path, side_by_side(ground_truth, generated), fps=fps, audio=audio, sample_rate=sample_rate
    )
