"""Torch dataset over the crop stage's output: windows of frames with their clip's audio, masks and reference.

    ds = SingerClipDataset(cfg, "train")        # clip ids from data/split/train.txt
    item = ds[0]
    item["frames"]      (3, F, H, W) float in [-1, 1]   the window to denoise (F = model.num_frames)
    item["motion"]      (3, M, H, W)                    the M frames before it (M = model.motion_frames)
    item["reference"]   (3, H, W)                       the clip's reference frame (closed mouth)
    item["audio"]       (S_clip,) float 16 kHz          the WHOLE clip's waveform, S_clip = n_frames / fps * 16000
                                                        (vocals.wav when the clip has one, else audio.wav)
    item["audio_start_frame"]  () long                  the window's first frame in the clip (= item["start"])
    item["masks"]       (3, H, W) float32 in [0, 1]     full, face, lip: Hallo's soft masks (singer.faces.masks)
    item["face_region"] (1, H, W) float32 {0, 1}        the hard face box, the face locator's input
    item["mouth"]       (F,)                            ground-truth mouth opening (NaN when unknown)

Audio as Hallo trains (``hallo/datasets/talk_video.py:242-250``, on ``audio_processor.py:108-119``'s whole-clip
features): wav2vec2 runs over the whole clip, the +-w windows are built over the whole clip's sequence, and
the window's frames are sliced out of it; the model does that with ``AudioEncoder.window_tokens(item["audio"],
item["audio_start_frame"], ...)``. Clips are 2 s, so the whole-clip waveforms of a batch stack. Hallo's
encoder hears the separated vocals (``configs/train/stage2.yaml:15``, ``audio_type: vocals``); so does ours when
a clip folder holds ``vocals.wav``. ``song(clip_id)`` is always ``audio.wav`` (for videos and metrics).

Training windows start at a random frame in ``[motion_frames, n - F - audio_window - 1]`` (Hallo's range,
``talk_video.py:222-225``: every frame of the window has its whole audio context), seeded per item and
epoch so runs repeat; evaluation windows start right after the motion frames. Decoded clips are kept in
memory at small resolutions.
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

MASK_KEYS = ("full", "face", "lip")          # the order of item["masks"]
REGION_KEY = "face_region"


def to_tensor_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_video(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def load_masks(path: Path) -> dict[str, np.ndarray]:
    """masks.npz -> {"full", "face", "lip": (H, W) float32 in [0, 1], "face_region": (H, W) uint8 {0, 1}}."""
    with np.load(path) as stored:
        missing = [k for k in (*MASK_KEYS, REGION_KEY) if k not in stored.files]
        if missing:
            raise ValueError(f"{path} holds {sorted(stored.files)}, not full/face/lip/face_region: it was written "
                             f"by an older crop stage; rerun it (`dvc repro crop` or `singer crop`)")
        out = {k: stored[k].astype(np.float32) for k in MASK_KEYS}
        out[REGION_KEY] = (stored[REGION_KEY] > 0).astype(np.uint8)
    return out


def fit_length(audio: np.ndarray, samples: int) -> np.ndarray:
    """(S,) -> (samples,) float32: cut, or padded with silence."""
    out = np.zeros(samples, np.float32)
    piece = audio[:samples]
    out[: len(piece)] = piece
    return out


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
        self.audio_window = cfg.model.audio_window
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
        self._load_vocals = lru_cache(maxsize=None if self._cache_frames else 2)(self._read_vocals)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def clip_dir(self, clip_id: str) -> Path:
        return self.root / str(self.manifest.loc[clip_id, "dir"])

    def _wav(self, path: Path) -> np.ndarray:
        audio, rate = read_wav(path)
        if rate != self.sample_rate:
            raise ValueError(f"{path} is {rate} Hz, expected {self.sample_rate}")
        return (audio if audio.ndim == 1 else audio.mean(axis=0)).astype(np.float32)

    def _read_clip(self, clip_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, np.ndarray]:
        """-> frames (T, H, W, 3) uint8, song (S,) float32 (audio.wav), reference (H, W, 3) uint8,
        masks (``load_masks``: full/face/lip/face_region), mouth (T,) float32 (NaN when unknown)."""
        d = self.clip_dir(clip_id)
        frames, _ = read_frames(d / "frames.mp4")
        audio = self._wav(d / "audio.wav")
        reference = np.array(Image.open(d / "reference.png").convert("RGB"))  # writable, for torch
        masks = load_masks(d / "masks.npz")
        return frames, audio, reference, masks, self.truth_curve(clip_id, "mouth_opening", len(frames))

    def truth_curve(self, clip_id: str, key: str, n_frames: int) -> np.ndarray:
        """(n_frames,) float32: the per-frame list `key` of the clip's truth.json (the synthesizer's ground truth:
        mouth_opening, mouth_width), NaN where the clip has none."""
        curve = np.full(n_frames, np.nan, np.float32)
        path = self.clip_dir(clip_id) / "truth.json"
        if path.exists():
            values = json.loads(path.read_text()).get(key) or []
            curve[: min(len(values), n_frames)] = np.asarray(values[:n_frames], np.float32)
        return curve

    def _read_vocals(self, clip_id: str) -> np.ndarray | None:
        path = self.clip_dir(clip_id) / "vocals.wav"
        return self._wav(path) if path.exists() else None

    def song(self, clip_id: str) -> np.ndarray:
        """The clip's audio.wav (S,) float32: what a video of it plays and the metrics hear."""
        return self._load_frames(clip_id)[1]

    def encoder_audio(self, clip_id: str) -> np.ndarray:
        """What the audio encoder hears (S,) float32: the clip's vocals.wav when present, else audio.wav."""
        vocals = self._load_vocals(clip_id)
        return self.song(clip_id) if vocals is None else vocals

    def window_start(self, index: int) -> int:
        n = int(self.manifest.iloc[index]["n_frames"])
        lo, hi = self.motion_frames, n - self.num_frames - self.audio_window - 1
        if not self.random_windows or hi <= lo:
            return lo
        rng = np.random.default_rng([self.cfg.train.seed, self.epoch, index])
        return int(rng.integers(lo, hi + 1))

    def __getitem__(self, index: int) -> dict:
        clip_id = self.clip_ids[index]
        frames, _, reference, masks, mouth = self._load_frames(clip_id)
        start = self.window_start(index)
        stop = start + self.num_frames
        clip_samples = int(round(len(frames) / self.fps * self.sample_rate))
        return {
            "clip_id": clip_id,
            "start": start,
            "frames": to_tensor_video(frames[start:stop]),
            "motion": to_tensor_video(frames[start - self.motion_frames : start]),
            "reference": to_tensor_video(reference[None])[:, 0],
            "audio": torch.from_numpy(fit_length(self.encoder_audio(clip_id), clip_samples)),
            "audio_start_frame": torch.tensor(start, dtype=torch.long),
            "masks": torch.from_numpy(np.stack([masks[k] for k in MASK_KEYS])),
            "face_region": torch.from_numpy(masks[REGION_KEY][None].astype(np.float32)),
            "mouth": torch.from_numpy(mouth[start:stop].copy()),
        }

    def reference_image(self, clip_id: str) -> np.ndarray:
        return self._load_frames(clip_id)[2]
