"""Torch dataset over the crop stage's output: windows of frames with their audio, masks and reference.

    ds = SingerClipDataset(cfg, "train")        # clip ids from data/split/train.txt
    item = ds[0]
    item["frames"]      (3, F, H, W) float in [-1, 1]   the window to denoise (F = model.num_frames)
    item["motion"]      (3, M, H, W)                    the M frames before it (M = model.motion_frames)
    item["reference"]   (3, H, W)                       the clip's reference frame (closed mouth)
    item["audio"]       (S,) float 16 kHz               the window's audio, S = F / fps * 16000
    item["masks"]       (3, H, W) float {0,1}           face, lip, pose (the crop stage's unions)
    item["mouth"]       (F,)                            ground-truth mouth opening (NaN when unknown)

Training windows start at a random frame (seeded per item and epoch, so runs repeat); evaluation
windows start right after the motion frames. Decoded clips are kept in memory at small resolutions.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from singer.config import Config
from singer.media import read_frames, read_wav


def to_tensor_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_video(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


class SingerClipDataset(Dataset):
    def __init__(self, cfg: Config, split: str = "train", clip_ids: list[str] | None = None,
                 random_windows: bool | None = None, epoch: int = 0):
        self.cfg = cfg
        self.root = Path(cfg.paths.crops)
        if clip_ids is None:
            clip_ids = (Path(cfg.paths.split) / f"{split}.txt").read_text().split()
        manifest = pd.read_parquet(self.root / "manifest.parquet").set_index("clip_id")
        missing = [c for c in clip_ids if c not in manifest.index]
        if missing:
            raise FileNotFoundError(f"{len(missing)} clip(s) of the {split} split are not in {self.root}: {missing[:3]}")
        self.clip_ids = list(clip_ids)
        self.manifest = manifest.loc[self.clip_ids]
        self.num_frames = cfg.model.num_frames
        self.motion_frames = cfg.model.motion_frames
        self.fps = float(cfg.clip.fps)
        self.sample_rate = int(cfg.clip.sample_rate)
        self.random_windows = (split == "train") if random_windows is None else random_windows
        self.epoch = epoch
        need = self.num_frames + self.motion_frames
        short = self.manifest.index[self.manifest["n_frames"] < need].tolist()
        if short:
            raise ValueError(f"clips shorter than {need} frames (num_frames + motion_frames): {short[:3]}")
        self._cache_frames = cfg.crop.resolution <= 128
        self._load_frames = lru_cache(maxsize=None if self._cache_frames else 2)(self._read_clip)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def clip_dir(self, clip_id: str) -> Path:
        return self.root / str(self.manifest.loc[clip_id, "dir"])

    def _read_clip(self, clip_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        d = self.clip_dir(clip_id)
        frames, _ = read_frames(d / "frames.mp4")
        audio, rate = read_wav(d / "audio.wav")
        if rate != self.sample_rate:
            raise ValueError(f"{d / 'audio.wav'} is {rate} Hz, expected {self.sample_rate}")
        reference = np.array(Image.open(d / "reference.png").convert("RGB"))  # writable, for torch
        masks = np.load(d / "masks.npz")
        mask_stack = np.stack([masks["face"], masks["lip"], masks["pose"]]).astype(np.float32)
        mouth = np.full(len(frames), np.nan, np.float32)
        if (d / "truth.json").exists():
            truth = json.loads((d / "truth.json").read_text())
            values = truth.get("mouth_opening") or []
            mouth[: min(len(values), len(frames))] = np.asarray(values[: len(frames)], np.float32)
        return frames, audio.astype(np.float32), reference, mask_stack, mouth

    def window_start(self, index: int) -> int:
        n = int(self.manifest.iloc[index]["n_frames"])
        lo, hi = self.motion_frames, n - self.num_frames
        if not self.random_windows or hi <= lo:
            return lo
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, index])
        return int(rng.integers(lo, hi + 1))

    def __getitem__(self, index: int) -> dict:
        clip_id = self.clip_ids[index]
        frames, audio, reference, masks, mouth = self._load_frames(clip_id)
        start = self.window_start(index)
        stop = start + self.num_frames
        per_frame = self.sample_rate / self.fps
        a0, a1 = int(round(start * per_frame)), int(round(stop * per_frame))
        window_audio = np.zeros(a1 - a0, np.float32)
        piece = audio[a0:a1]
        window_audio[: len(piece)] = piece
        return {
            "clip_id": clip_id,
            "start": start,
            "frames": to_tensor_video(frames[start:stop]),
            "motion": to_tensor_video(frames[start - self.motion_frames : start]),
            "reference": to_tensor_video(reference[None])[:, 0],
            "audio": torch.from_numpy(window_audio),
            "masks": torch.from_numpy(masks),
            "mouth": torch.from_numpy(mouth[start:stop].copy()),
        }

    def reference_image(self, clip_id: str) -> np.ndarray:
        return self._load_frames(clip_id)[2]
