"""The bad-input battery: every odd file goes through ingest -> clip -> crop and comes out either
processed correctly or rejected with its reason; no stage crashes and no good file is lost."""

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from factories import audio_only, face_frames, face_video, tone, truncated, vfr_face_video

from singer.config import load_config
from singer.data.clip import run_clip
from singer.data.crop import run_crop
from singer.data.ingest import run_ingest
from singer.data.validate import validate_stage
from singer.media import probe, read_frames

ROOT = Path(__file__).resolve().parents[1]


def faststart_truncated(path: Path) -> Path:
    """An mp4 whose index comes first (faststart) cut in half: it opens, then decoding runs out."""
    full = path.with_name("full_" + path.name)
    with av.open(str(full), "w", format="mp4", options={"movflags": "faststart"}) as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 192, 192, "yuv420p"
        as_ = c.add_stream("aac", rate=16000)
        as_.layout = "mono"
        for f in face_frames(75):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        audio = tone(3.0)
        for s in range(0, len(audio), 1024):
            af = av.AudioFrame.from_ndarray(audio[None, s : s + 1024].copy(), format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, s
            for p in as_.encode(af):
                c.mux(p)
        for p in as_.encode():
            c.mux(p)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return path


@pytest.mark.slow
def test_bad_input_battery(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data/raw"
    # subject folder = case name, so every outcome can be traced back to its input
    face_video(raw / "good/take.mp4", seconds=2.2)
    truncated(face_video(raw / "scratch/full.mp4"), raw / "truncated/take.mp4")
    shutil.rmtree(raw / "scratch")
    (raw / "faststart_truncated").mkdir()
    faststart_truncated(raw / "faststart_truncated/take.mp4")
    (raw / "zero_bytes").mkdir()
    (raw / "zero_bytes/take.mp4").write_bytes(b"")
    (raw / "text_file").mkdir()
    (raw / "text_file/take.mp4").write_text("not a video, just text named .mp4\n")
    face_video(raw / "no_audio/take.mp4", audio=False)
    audio_only(raw / "audio_only/take.mp4")
    face_video(raw / "one_fps/take.mp4", fps=1, seconds=4)
    face_video(raw / "vertical/take.mp4", size=(320, 180), seed=2)
    face_video(raw / "two_faces/take.mp4", size=(160, 320), faces=2)
    face_video(raw / "no_face/take.mp4", faces=0)
    face_video(raw / "short_4k/take.mp4", seconds=2.0, size=(2160, 3840))
    vfr_face_video(raw / "variable_fps/take.mp4", seconds=2.6)

    cfg = load_config()
    run_ingest(cfg, progress=False)
    run_clip(cfg, progress=False)
    run_crop(cfg, progress=False)
    for stage in ("ingest", "clip", "crop"):
        validate_stage(stage, cfg)

    outcome: dict[str, str] = {}
    for stage, folder in (("ingest", cfg.paths.ingested), ("clip", cfg.paths.clips), ("crop", cfg.paths.crops)):
        for row in map(json.loads, (folder / "rejected.jsonl").read_text().splitlines()):
            subject = Path(row["item"]).parent.name if stage == "ingest" else row["item"].rsplit("_", 2)[0]
            outcome.setdefault(subject, f"{stage}: {row['reason']}")
    crops = pd.read_parquet(cfg.paths.crops / "manifest.parquet")
    for subject in crops["subject"]:
        outcome.setdefault(subject, "cropped")

    expected = {
        "good": "cropped",
        "vertical": "cropped",
        "short_4k": "cropped",
        "variable_fps": "cropped",
        "truncated": "ingest: not a readable media file",
        "faststart_truncated": ("ingest: truncated", "ingest: decoding failed"),
        "zero_bytes": "ingest: zero bytes",
        "text_file": "ingest: not a readable media file",
        "no_audio": "ingest: no audio stream",
        "audio_only": "ingest: audio-only file",
        "one_fps": "ingest: frame rate too low",
        "two_faces": "crop: several faces",
        "no_face": "crop: no face",
    }
    got = {k: outcome.get(k, "LOST") for k in expected}
    wrong = {k: v for k, v in got.items() if not v.startswith(expected[k])}
    assert not wrong, json.dumps(got, indent=1)

    # the survivors are well-formed: 50 frames at 25 fps at the preset's resolution, 16 kHz audio
    for _, row in crops.iterrows():
        frames, _ = read_frames(cfg.paths.crops / row["dir"] / "frames.mp4")
        assert frames.shape == (50, 64, 64, 3)
        lm = np.load(cfg.paths.crops / row["dir"] / "landmarks.npy")
        assert lm.shape == (50, 68, 2) and np.isfinite(lm).all()
    clips = pd.read_parquet(cfg.paths.clips / "manifest.parquet").set_index("subject")
    assert max(clips.loc["short_4k", ["width", "height"]]) == cfg.clip.max_side  # 4K downscaled
    assert probe(cfg.paths.ingested / pd.read_parquet(cfg.paths.ingested / "manifest.parquet")
                 .set_index("subject").loc["variable_fps", "file"]).vfr
