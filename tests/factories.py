"""Small media files for tests, made on the spot (no fixtures on disk).

Face videos use the real photo `skimage.data.astronaut()`, moved a little each frame so clips are not
static; audio is a tone with a syllable-like envelope.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from singer.media import write_video

# Key/shape manifests of the released Hallo / SINGER / SD-1.5 / wav2vec2 checkpoints (their README says how they
# were made): a copy of shared/reference/checkpoints inside the repository, so the tests that use them run anywhere.
CHECKPOINT_MANIFESTS = Path(__file__).resolve().parent / "data" / "checkpoints"


def tone(seconds: float, sample_rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.3 * envelope * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def face_frames(n: int, size: tuple[int, int] = (192, 192), faces: int = 1, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) frames of the astronaut (or `faces` of them side by side), drifting a few pixels."""
    from skimage import data

    h, w = size
    portrait = data.astronaut()[30:330, 90:390]  # the face with some margin
    rng = np.random.default_rng(seed)
    if faces == 0:
        base = cv2.resize(data.coffee(), (w, h))
    else:
        side = min(h, w // faces)
        tile = cv2.resize(portrait, (side, side), interpolation=cv2.INTER_AREA)
        base = np.full((h, w, 3), 90, np.uint8)
        y0 = (h - side) // 2
        for k in range(faces):
            x0 = k * (w // faces) + (w // faces - side) // 2
            base[y0 : y0 + side, x0 : x0 + side] = tile
    frames = []
    for i in range(n):
        dx, dy = 2.0 * np.sin(i / 4.0) + rng.normal(0, 0.3), 1.5 * np.cos(i / 5.0)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        frames.append(cv2.warpAffine(base, m, (w, h), borderMode=cv2.BORDER_REPLICATE))
    return np.stack(frames)


def face_video(path: Path, seconds: float = 2.4, fps: float = 25, size=(192, 192), faces: int = 1,
               audio: bool = True, sample_rate: int = 16000, seed: int = 0) -> Path:
    frames = face_frames(int(round(seconds * fps)), size=size, faces=faces, seed=seed)
    return write_video(path, frames, fps, audio=tone(seconds, sample_rate) if audio else None,
                       sample_rate=sample_rate)


def vfr_face_video(path: Path, seconds: float = 2.6, size=(160, 160), sample_rate: int = 16000) -> Path:
    """Variable frame rate: frame intervals alternate between 30 ms and 50 ms (about 25 fps on average)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    steps_ms, t = [], 0
    while t < seconds * 1000:
        steps_ms.append(t)
        t += 30 if len(steps_ms) % 2 else 50
    frames = face_frames(len(steps_ms), size=size)
    audio = tone(seconds, sample_rate)
    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = size[1], size[0], "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        as_ = c.add_stream("aac", rate=sample_rate)
        as_.layout = "mono"
        for pts, image in zip(steps_ms, frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        for s in range(0, len(audio), 1024):
            af = av.AudioFrame.from_ndarray(audio[None, s : s + 1024].copy(), format="fltp", layout="mono")
            af.sample_rate, af.pts = sample_rate, s
            for p in as_.encode(af):
                c.mux(p)
        for p in as_.encode():
            c.mux(p)
    return path


def audio_file(path: Path, audio: np.ndarray, sample_rate: int, codec: str = "aac", fmt: str | None = "mp4",
               frame_size: int = 1024) -> Path:
    """An audio-only file (no video stream) encoded with PyAV: aac in mp4, libmp3lame, flac, ..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, np.float32)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=sample_rate)
        s.layout = "mono"
        for i in range(0, len(audio), frame_size):
            af = av.AudioFrame.from_ndarray(audio[None, i : i + frame_size].copy(), format="fltp", layout="mono")
            af.sample_rate, af.pts = sample_rate, i
            for p in s.encode(af):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def audio_only(path: Path, seconds: float = 3.0, sample_rate: int = 16000) -> Path:
    return audio_file(path, tone(seconds, sample_rate), sample_rate)


def truncated(src: Path, dst: Path, keep: float = 0.4) -> Path:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def tiny_batch(batch: int = 2, frames: int = 8, motion: int = 2, size: int = 64, seed: int = 0) -> dict:
    """A random training batch shaped like SingerClipDataset's items plus face embeddings: the whole clip's
    audio (frames + motion + 3 frames long) with the window starting after the motion frames, Hallo's soft
    masks (full, face, lip) and the hard face box."""
    import torch

    g = torch.Generator().manual_seed(seed)
    face = torch.zeros(batch, 1, size, size)
    face[:, :, 8:-6, 10:-10] = 1
    lip = torch.zeros(batch, 1, size, size)
    lip[:, :, 40:52, 22:42] = 1
    blur = torch.nn.AvgPool2d(9, stride=1, padding=4, count_include_pad=False)
    face_soft, lip_soft = blur(face), blur(lip)
    masks = torch.cat([1 - face_soft, (face_soft - lip_soft).clamp(min=0), lip_soft], dim=1)
    clip_frames = frames + motion + 3
    return {
        "frames": torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1,
        "motion": torch.rand(batch, 3, motion, size, size, generator=g) * 2 - 1,
        "reference": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
        "audio": torch.randn(batch, 16000 * clip_frames // 25, generator=g) * 0.1,
        "audio_start_frame": torch.full((batch,), motion, dtype=torch.long),
        "masks": masks,
        "face_region": face,
        "face_embedding": torch.randn(batch, 128, generator=g) * 0.1,
    }


def fabricate_module():
    """benchmarks/fabricate.py (fabricated release folders) as a module: benchmarks/ is not a package."""
    import importlib.util
    import sys

    name = "singer_benchmarks_fabricate"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "fabricate.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# encoder -> (sample format it takes, container format); formats as users have songs (issue 16)
SONG_CODECS = {
    "mp3": ("libmp3lame", "fltp", "mp3"),
    "m4a": ("aac", "fltp", "mp4"),
    "flac": ("flac", "s16", "flac"),
    "ogg": ("libopus", "flt", "ogg"),
    "wav": ("pcm_s16le", "s16", "wav"),
}


def song(seconds: float, sample_rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(C, S) float32: a sung-like tone (220 Hz with a 3 Hz syllable envelope) plus a different note per channel."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    rows = [0.3 * envelope * np.sin(2 * np.pi * (220 + 55 * c) * t + seed) for c in range(channels)]
    return np.stack(rows).astype(np.float32)


def song_file(path: Path, audio: np.ndarray, sample_rate: int, kind: str | None = None,
              layout: str | None = None) -> Path:
    """`audio` (C, S) or (S,) written with PyAV as `kind` (mp3 | m4a | flac | ogg | wav; default: the suffix)."""
    codec, sample_fmt, fmt = SONG_CODECS[kind or path.suffix.lstrip(".")]
    audio = np.asarray(audio, np.float32)
    audio = audio[None] if audio.ndim == 1 else audio
    layout = layout or {1: "mono", 2: "stereo", 6: "5.1"}[audio.shape[0]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=sample_rate)
        s.layout = layout
        s.format = sample_fmt
        size = s.codec_context.frame_size or 1024
        for i in range(0, audio.shape[1], size):
            piece = audio[:, i : i + size]
            if sample_fmt in ("s16", "flt"):       # packed: (1, S * C) interleaved
                piece = piece.T.reshape(1, -1)
                piece = (np.clip(piece, -1, 1) * 32767).astype(np.int16) if sample_fmt == "s16" else piece
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format=sample_fmt, layout=layout)
            af.sample_rate, af.pts = sample_rate, i
            for p in s.encode(af):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
