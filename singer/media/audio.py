"""Audio decoding and resampling. Audio arrays are float32 in [-1, 1]: (S,) mono or (C, S)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from singer.media.video import MediaError, _open


def read_audio(
    path: str | os.PathLike,
    sample_rate: int | None = 16000,
    mono: bool = True,
    start_s: float = 0.0,
    end_s: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container PyAV reads (mp4, wav, mp3, flac, ...).

    Resamples to `sample_rate` (None keeps the native rate) and downmixes to mono when asked.
    Returns (audio, rate): (S,) when mono else (C, S).
    """
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        rate = int(sample_rate or stream.codec_context.sample_rate)
        layout = "mono" if mono else None
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler keep its own clock (avoids gaps on odd pts)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.error.FFmpegError as exc:
            raise MediaError(f"audio decoding failed ({exc})") from exc
    if not chunks:
        raise MediaError("audio stream has no decodable samples")
    audio = np.concatenate(chunks, axis=1).astype(np.float32)
    begin = int(round(start_s * rate))
    end = None if end_s is None else int(round(end_s * rate))
    audio = audio[:, begin:end]
    return (audio[0] if mono else audio), rate


def audio_seconds(source: str | os.PathLike | bytes) -> float:
    """The first audio stream's duration without decoding it: the container's header, else the stream's, else
    the sum of its packets' durations. `source` is a path or a file's bytes. Raises MediaError."""
    if isinstance(source, (bytes, bytearray)):
        try:
            container = av.open(io.BytesIO(bytes(source)), mode="r")
        except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
            raise MediaError(f"not a readable media file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
                from exc
    else:
        container = _open(source)
    with container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        if container.duration:
            return float(container.duration) / av.time_base
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        try:
            return sum(float(p.duration * p.time_base) for p in container.demux(stream) if p.duration and p.time_base)
        except av.error.FFmpegError as exc:
            raise MediaError(f"audio stream unreadable ({exc})") from exc


def resample_audio(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling (polyphase) of (S,) or (C, S) audio."""
    if source_rate == target_rate:
        return audio.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(source_rate), int(target_rate))
    return resample_poly(audio, target_rate // g, source_rate // g, axis=-1).astype(np.float32)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> Path:
    """Write 16-bit PCM wav atomically. audio: (S,) or (C, S)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(audio, np.float32)
    data = data.T if data.ndim == 2 else data
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        sf.write(str(tmp), np.clip(data, -1, 1), int(sample_rate), subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a wav (or flac) with soundfile -> ((S,) or (C, S) float32, rate)."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    return (data.T if data.ndim == 2 else data), int(rate)
