"""A video written as it is generated: frames go to the encoder as they come, the song's own audio with them.

    with VideoWriter("out.mp4", fps=25, size=(1920, 1080), audio="song.flac") as out:
        for window in windows:          # (F, H, W, 3) uint8 RGB, or one (H, W, 3) frame
            out.write(window)
    # leaving the block normally renames `.out.tmp.mp4` to out.mp4; any exception (Ctrl-C included) deletes it

Memory stays flat however long the song: nothing is held but the encoders' own buffers, and the audio is
decoded from the song file a little at a time, as far as the video has got, so the two streams are
interleaved in the file (a muxer given all the video first would queue every packet waiting for audio).

The sound track is the song as it was: its channels (mono, stereo, 5.1, ...) and its sample rate, encoded as
AAC at 160 kbit/s per stereo pair. AAC has a fixed list of sample rates; a song at another rate is resampled to
the nearest one above it (the encoder's list; 44.1 / 48 kHz songs are never touched). The audio is cut, or
padded with silence, to the video's length: round(frames / fps * rate) samples.

x264 runs with the same options as `write_video` (one thread, no mbtree: the same frames give the same bytes).
"""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from singer.media.video import MediaError, _open, rgb_to_frame

AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
AAC_FRAME = 1024          # samples per AAC frame
STEREO_BIT_RATE = 160_000  # the encoder's default (~69 kbit/s mono) audibly distorts music


def aac_rate(rate: int) -> int:
    """The AAC sample rate a song at `rate` is encoded at: `rate` itself when AAC has it, else the next above."""
    return next((r for r in AAC_RATES if r >= rate), AAC_RATES[-1])


# what AAC is given for a channel count when the song's own layout is one it cannot take (wav and flac
# often say only "2 channels")
DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0(side)", 6: "5.1", 7: "6.1", 8: "7.1"}


def aac_layout(name: str, channels: int, rate: int) -> str:
    """The song's channel layout if the AAC encoder opens with it, else the usual one for its channel count.
    Raises MediaError for a channel count AAC cannot carry."""
    for candidate in dict.fromkeys([name, DEFAULT_LAYOUTS.get(channels, name)]):
        context = av.CodecContext.create("aac", "w")
        context.sample_rate, context.format = rate, "fltp"
        try:
            context.layout = candidate
            context.open()
            return candidate
        except (av.error.FFmpegError, ValueError):
            continue
    raise MediaError(f"the song has {channels} audio channels ({name}); an mp4's AAC track takes at most 8")


class _SongReader:
    """The first audio stream of a file, decoded on demand into (C, n) float32 at the output rate and layout."""

    def __init__(self, path: str | os.PathLike):
        self.container = _open(path)
        if not self.container.streams.audio:
            self.container.close()
            raise MediaError("no audio stream")
        stream = self.container.streams.audio[0]
        self.channels = int(stream.codec_context.channels)
        self.source_rate = int(stream.codec_context.sample_rate)
        self.rate = aac_rate(self.source_rate)
        self.layout = aac_layout(stream.layout.name, self.channels, self.rate)
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self._packets = self.container.decode(stream)
        self._buffer = np.zeros((self.channels, 0), np.float32)
        self._ended = False

    def take(self, n: int) -> np.ndarray:
        """The next `n` samples, (C, n); silence once the song has ended."""
        while self._buffer.shape[1] < n and not self._ended:
            try:
                frame = next(self._packets)
                frame.pts = None  # the resampler keeps its own clock (odd pts make gaps)
                pieces = self._resampler.resample(frame)
            except StopIteration:
                self._ended = True
                pieces = self._resampler.resample(None)
            except av.error.FFmpegError as exc:
                raise MediaError(f"audio decoding failed ({exc})") from exc
            if pieces:
                self._buffer = np.concatenate([self._buffer, *[p.to_ndarray() for p in pieces]], axis=1)
        out, self._buffer = self._buffer[:, :n], self._buffer[:, n:]
        if out.shape[1] < n:
            out = np.pad(out, ((0, 0), (0, n - out.shape[1])))
        return out

    def close(self) -> None:
        self.container.close()


class VideoWriter:
    """H.264 (yuv420p) mp4 of frames sized `size` = (width, height), both even, with the song at `audio`."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int],
                 audio: str | os.PathLike | None = None, crf: int = 18):
        self.path = Path(path)
        width, height = map(int, size)
        if width % 2 or height % 2 or width < 2 or height < 2:
            raise ValueError(f"frame size must be even (yuv420p), got {width}x{height}")
        self.size = (width, height)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.frames = 0
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
        self._song = _SongReader(audio) if audio is not None else None
        self._audio_written = 0
        try:
            self._container = av.open(str(self.tmp), mode="w", format="mp4")
            self._video = self._container.add_stream("libx264", rate=self.fps)
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"
            self._video.options = {"crf": str(crf), "preset": "veryfast", "threads": "1",
                                   "x264-params": "no-mbtree=1"}  # see write_video: one result per input
            self._audio = None
            if self._song is not None:
                self._audio = self._container.add_stream("aac", rate=self._song.rate)
                self._audio.layout = self._song.layout
                self._audio.bit_rate = STEREO_BIT_RATE * max(1, self._song.channels // 2)
        except BaseException:
            self._discard()
            raise

    @property
    def seconds(self) -> float:
        return float(self.frames / self.fps)

    def write(self, frames: np.ndarray) -> None:
        """(T, H, W, 3) or (H, W, 3) uint8 RGB at `size`; then the song up to the video's new end."""
        frames = np.asarray(frames)
        frames = frames[None] if frames.ndim == 3 else frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 \
                or (frames.shape[2], frames.shape[1]) != self.size:
            raise ValueError(f"frames must be (T, {self.size[1]}, {self.size[0]}, 3) uint8, got "
                             f"{frames.shape} {frames.dtype}")
        for image in frames:
            frame = rgb_to_frame(image)
            frame.pts, frame.time_base = self.frames, 1 / self.fps  # explicit: the same bytes every run
            for packet in self._video.encode(frame):
                self._container.mux(packet)
            self.frames += 1
        self._write_audio(final=False)

    def _write_audio(self, final: bool) -> None:
        if self._audio is None:
            return
        end = int(round(self.seconds * self._song.rate))
        # whole AAC frames while the video goes on; the last, partial one when it has ended
        while end - self._audio_written >= AAC_FRAME or (final and end > self._audio_written):
            n = min(AAC_FRAME, end - self._audio_written)
            piece = np.ascontiguousarray(np.clip(self._song.take(n), -1.0, 1.0))
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=self._song.layout)
            frame.sample_rate, frame.pts = self._song.rate, self._audio_written
            for packet in self._audio.encode(frame):
                self._container.mux(packet)
            self._audio_written += n

    def close(self) -> Path:
        """Flush both encoders and rename the file into place."""
        try:
            if self.frames == 0:
                raise ValueError("no frames were written")
            for packet in self._video.encode():
                self._container.mux(packet)
            self._write_audio(final=True)
            if self._audio is not None:
                for packet in self._audio.encode():
                    self._container.mux(packet)
            self._container.close()
            self._song_close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise
        return self.path

    def _song_close(self) -> None:
        if self._song is not None:
            self._song.close()
            self._song = None

    def _discard(self) -> None:
        """Leave nothing behind: close what is open, delete the temporary file."""
        try:
            container = getattr(self, "_container", None)
            if container is not None:
                with contextlib.suppress(Exception):  # a half-written file may not close cleanly; it goes anyway
                    container.close()
            self._song_close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._discard()
