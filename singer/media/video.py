"""Read, probe and write videos with PyAV.

Frames are `uint8` arrays shaped (T, H, W, 3), RGB. Timestamps are seconds from the stream start.
Writers are atomic: they write `<name>.tmp<ext>` next to the target, then rename.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

# Colour conversion. PyAV's rgb24 <-> yuv420p (swscale through `to_ndarray` / `from_ndarray`) costs ~0.5 ms a
# 256^2 frame each way and its yuv -> rgb is the less exact one; OpenCV's BT.601 limited-range I420 conversions
# are ~20x faster. Measured (2026-12, 50 synthetic 256^2 frames, rgb -> yuv420p -> rgb against the rgb):
# swscale both ways 44.6 dB; OpenCV yuv -> rgb 52.8 dB; OpenCV rgb -> yuv then H.264 round trips as well as
# swscale (44.8 vs 44.6 dB). OpenCV's matrix is BT.601 limited range, so it is used only for frames that are
# yuv420p with that meaning (untagged, BT.470BG or SMPTE 170M; range untagged or limited), even-sized;
# anything else goes through swscale as before.
_BT601_SPACES = {2, 5, 6}    # AVCOL_SPC_UNSPECIFIED, BT470BG, SMPTE170M (swscale's default matrix is BT.601)
_LIMITED_RANGES = {0, 1}     # AVCOL_RANGE_UNSPECIFIED, MPEG


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB (OpenCV's I420 conversion where it applies, else swscale)."""
    if (frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
            and frame.colorspace in _BT601_SPACES and frame.color_range in _LIMITED_RANGES):
        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def rgb_to_frame(image: np.ndarray) -> av.VideoFrame:
    """(H, W, 3) uint8 RGB, even-sized -> a yuv420p VideoFrame (BT.601 limited range, as swscale writes)."""
    return av.VideoFrame.from_ndarray(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420),
                                      format="yuv420p")


class MediaError(RuntimeError):
    """A file that cannot be read as the media it claims to be. The message is the reason."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    bytes: int
    duration_s: float
    fps: float                 # average frame rate
    n_frames: int              # decoded, not the container's guess
    width: int
    height: int
    video_codec: str
    has_audio: bool
    audio_sr: int
    audio_channels: int
    vfr: bool                  # frame intervals vary by more than 10 %

    def as_dict(self) -> dict:
        return asdict(self)


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"file does not exist: {path}")
    if path.stat().st_size == 0:
        raise MediaError("zero bytes")
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"not a readable media file ({type(exc).__name__}: {exc})") from exc


def probe(path: str | os.PathLike, decode: bool = True) -> VideoInfo:
    """Describe a video. With `decode`, every video packet is decoded so that truncation is caught
    and the frame count and VFR flag are measured rather than trusted from the header.

    Raises MediaError with the reason when the file is not a usable video (no video stream included).
    """
    with _open(path) as container:
        if not container.streams.video:
            kind = "audio-only file" if container.streams.audio else "no video stream"
            raise MediaError(kind)
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if container.streams.audio else None
        width, height = vstream.codec_context.width, vstream.codec_context.height
        times: list[float] = []
        if decode:
            try:
                for frame in container.decode(vstream):
                    if frame.time is not None:
                        times.append(float(frame.time))
            except av.error.FFmpegError as exc:
                raise MediaError(f"decoding failed after {len(times)} frames ({exc})") from exc
            if not times:
                raise MediaError("video stream has no decodable frames")
            declared = int(vstream.frames or 0)
            if declared and len(times) < 0.9 * declared - 1:
                raise MediaError(f"truncated (decoded {len(times)} of {declared} frames)")
        start = float(vstream.start_time * vstream.time_base) if vstream.start_time is not None else 0.0
        if times:
            times = sorted(times)
            n_frames = len(times)
            deltas = np.diff(times)
            step = float(np.median(deltas)) if len(deltas) else 0.0
            duration = times[-1] - min(times[0], start) + step
            fps = (n_frames - 1) / (times[-1] - times[0]) if n_frames > 1 and times[-1] > times[0] else 0.0
            vfr = bool(len(deltas) > 2 and step > 0 and np.max(np.abs(deltas - step)) > 0.1 * step)
        else:
            n_frames = int(vstream.frames or 0)
            rate = vstream.average_rate or vstream.guessed_rate
            fps = float(rate) if rate else 0.0
            duration = float(vstream.duration * vstream.time_base) if vstream.duration else 0.0
            vfr = False
        return VideoInfo(
            path=str(path),
            bytes=Path(path).stat().st_size,
            duration_s=float(duration),
            fps=float(fps),
            n_frames=n_frames,
            width=int(width),
            height=int(height),
            video_codec=vstream.codec_context.name,
            has_audio=astream is not None,
            audio_sr=int(astream.codec_context.sample_rate) if astream else 0,
            audio_channels=int(astream.codec_context.channels) if astream else 0,
            vfr=vfr,
        )


def read_frames(
    path: str | os.PathLike, start_s: float = 0.0, end_s: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode frames with timestamps in [start_s, end_s). Returns (frames (T,H,W,3) uint8, times (T,) s)."""
    frames, times = [], []
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        vstream = container.streams.video[0]
        vstream.thread_type = "AUTO"
        if start_s > 0:
            container.seek(int(start_s / vstream.time_base), stream=vstream, backward=True)
        try:
            for frame in container.decode(vstream):
                t = float(frame.time) if frame.time is not None else len(times) / float(vstream.average_rate or 25)
                if t < start_s - 1e-6:
                    continue
                if end_s is not None and t >= end_s - 1e-6:
                    break
                frames.append(frame_to_rgb(frame))
                times.append(t)
        except av.error.FFmpegError as exc:
            raise MediaError(f"decoding failed after {len(frames)} frames ({exc})") from exc
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.float64)
    return np.stack(frames), np.asarray(times, np.float64)


def frames_at(frames: np.ndarray, times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Resample a (possibly variable-rate) frame sequence to target times: each target takes the last
    frame shown at that moment (the one with the greatest timestamp <= target), as a player would.

    frames: (T, H, W, 3); times: (T,) ascending; targets: (K,) -> (K, H, W, 3)
    """
    idx = np.searchsorted(times, np.asarray(targets) + 1e-6, side="right") - 1
    return frames[np.clip(idx, 0, len(times) - 1)]


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 18,
) -> Path:
    """Write (T,H,W,3) uint8 RGB frames as H.264 (yuv420p) mp4, with optional AAC audio, atomically.

    audio: (S,) mono or (C, S) float in [-1, 1]. Odd frame sizes are padded by one pixel (yuv420p needs even).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            vstream = container.add_stream("libx264", rate=rate)
            vstream.width, vstream.height = frames.shape[2], frames.shape[1]
            vstream.pix_fmt = "yuv420p"
            # The same frames must give the same bytes, or DVC sees changed outputs. Measured (PyAV 18, libx264):
            # `codec_context.thread_count = 1` did not hold (every other encode differed, up to 34 levels in
            # 3-50 frames); the x264 option threads=1 did, except that with macroblock-tree rate control the first
            # encode in a process still differed from the later ones. One thread (x264's output also depends on
            # the thread count, i.e. on the machine) and no mbtree: 5 processes x 3 encodes, one result.
            vstream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "no-mbtree=1"}
            astream = None
            if audio is not None:
                astream = container.add_stream("aac", rate=int(sample_rate))
                astream.layout = "mono" if np.asarray(audio).ndim == 1 else "stereo"
                astream.bit_rate = 160_000  # the encoder default (~69 kbps mono) audibly distorts music
            for i, image in enumerate(frames):
                frame = rgb_to_frame(image)
                # explicit timestamps: without them the encoder's output differs from run to run,
                # and DVC would see every clip as changed
                frame.pts, frame.time_base = i, 1 / rate
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
            if astream is not None:
                _encode_audio(container, astream, np.asarray(audio, np.float32), int(sample_rate))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _encode_audio(container, astream, audio: np.ndarray, sample_rate: int) -> None:
    planar = np.clip(audio if audio.ndim == 2 else audio[None, :], -1.0, 1.0).astype(np.float32)
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    chunk = 1024
    for start in range(0, planar.shape[1], chunk):
        piece = np.ascontiguousarray(planar[:, start : start + chunk])
        frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        for packet in astream.encode(frame):
            container.mux(packet)
    for packet in astream.encode():
        container.mux(packet)
