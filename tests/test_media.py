"""singer/media: what the stages' outputs rest on."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
from factories import face_frames, tone

from singer.media import read_frames, write_video


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_write_video_is_deterministic_within_and_across_processes(tmp_path):
    """The same frames give the same bytes: DVC hashes the crop stage's mp4s, and a re-encode that differs marks
    every downstream stage as changed. x264's frame threads, and its macroblock-tree rate control in the first
    encode of a process, made the bytes differ from call to call."""
    frames = face_frames(50, size=(128, 128))
    np.save(tmp_path / "frames.npy", frames)
    audio = tone(2.0) * 0.3
    # a fresh process: its first encode is the one that differed
    script = textwrap.dedent(f"""
        import numpy as np
        from singer.media import write_video
        frames = np.load({str(tmp_path / "frames.npy")!r})
        write_video({str(tmp_path / "child-0.mp4")!r}, frames, 25.0)
        write_video({str(tmp_path / "child-1.mp4")!r}, frames, 25.0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    here = [write_video(tmp_path / f"here-{i}.mp4", frames, 25.0) for i in range(3)]
    hashes = {_md5(p) for p in [tmp_path / "child-0.mp4", tmp_path / "child-1.mp4", *here]}
    assert len(hashes) == 1, f"5 encodes of the same frames gave {len(hashes)} different files"
    with_audio = {_md5(write_video(tmp_path / f"audio-{i}.mp4", frames, 25.0, audio=audio)) for i in range(2)}
    assert len(with_audio) == 1
    decoded, _ = read_frames(here[0])
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 3  # crf 18: near lossless
