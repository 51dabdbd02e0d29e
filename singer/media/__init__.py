"""Video and audio I/O (PyAV in-process; there is no system ffmpeg), loudness, vocal separation."""

from singer.media.audio import audio_seconds, read_audio, read_wav, resample_audio, write_wav
from singer.media.loudness import integrated_loudness, normalize_loudness, true_peak
from singer.media.separate import METHODS as SEPARATION_METHODS
from singer.media.separate import SeparationError, separate_vocals
from singer.media.video import MediaError, VideoInfo, frames_at, probe, read_frames, write_video

__all__ = [
    "MediaError",
    "SEPARATION_METHODS",
    "SeparationError",
    "audio_seconds",
    "VideoInfo",
    "frames_at",
    "integrated_loudness",
    "normalize_loudness",
    "probe",
    "read_audio",
    "read_frames",
    "read_wav",
    "resample_audio",
    "separate_vocals",
    "true_peak",
    "write_video",
    "write_wav",
]
