"""Video and audio I/O (PyAV in-process; there is no system ffmpeg)."""

from singer.media.audio import read_audio, read_wav, resample_audio, write_wav
from singer.media.video import MediaError, VideoInfo, frames_at, probe, read_frames, write_video

__all__ = [
    "MediaError",
    "VideoInfo",
    "frames_at",
    "probe",
    "read_audio",
    "read_frames",
    "read_wav",
    "resample_audio",
    "write_video",
    "write_wav",
]
