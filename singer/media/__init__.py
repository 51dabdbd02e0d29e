"""Video and audio I/O (PyAV in-process; there is no system ffmpeg)."""

from singer.media.audio import read_audio, resample_audio, write_wav, read_wav
from singer.media.video import MediaError, VideoInfo, probe, read_frames, write_video, frames_at

__all__ = [
    "MediaError",
    "VideoInfo",
    "probe",
    "read_frames",
    "frames_at",
    "write_video",
    "read_audio",
    "resample_audio",
    "write_wav",
    "read_wav",
]
