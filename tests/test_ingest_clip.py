"""Data tests for ingest and clip: what is kept, what is rejected and why, and the clip contract."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import audio_only, face_video, truncated, vfr_face_video

from singer.config import load_config
from singer.data.clip import clip_starts, quality, run_clip
from singer.data.common import StageError
from singer.data.ingest import run_ingest
from singer.data.validate import ValidationError, validate_stage
from singer.media import probe, read_wav

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project folder with the repository's params.yaml, as the working directory."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def rejected(path: Path) -> dict[str, str]:
    return {Path(r["item"]).name: r["reason"] for r in map(json.loads, path.read_text().splitlines())}


def test_ingest_keeps_good_files_and_says_why_it_drops_the_rest(project):
    raw = project / "data/raw"
    face_video(raw / "alice/take1.mp4")
    shutil.copy(raw / "alice/take1.mp4", raw / "alice/copy.mp4")            # duplicate
    face_video(raw / "bob.mp4", seconds=2.2, fps=30, seed=1)                  # subject from the stem
    (raw / "zero.mp4").write_bytes(b"")
    (raw / "text.mp4").write_text("this is not a video\n" * 20)
    truncated(raw / "alice/take1.mp4", raw / "trunc.mp4")
    face_video(raw / "silent.mp4", audio=False)
    audio_only(raw / "audio.mp4")
    face_video(raw / "slow.mp4", fps=1, seconds=4)
    face_video(raw / "short.mp4", seconds=1.0)
    (raw / "notes.txt").write_text("ignored: not a video extension")

    cfg = load_config()
    stats = run_ingest(cfg, progress=False)
    manifest = pd.read_parquet(cfg.paths.ingested / "manifest.parquet")
    assert sorted(manifest["subject"]) == ["alice", "bob"]
    assert stats["n_accepted"] == 2 and stats["n_rejected"] == 8
    reasons = rejected(cfg.paths.ingested / "rejected.jsonl")
    dup = reasons.get("copy.mp4") or reasons["take1.mp4"]  # whichever of the two came second
    assert dup.startswith("duplicate of alice_") and not ("copy.mp4" in reasons and "take1.mp4" in reasons)
    assert reasons["zero.mp4"] == "zero bytes"
    assert reasons["text.mp4"].startswith("not a readable media file")
    assert reasons["trunc.mp4"].startswith("not a readable media file")
    assert reasons["silent.mp4"] == "no audio stream"
    assert reasons["audio.mp4"] == "audio-only file"
    assert reasons["slow.mp4"].startswith("frame rate too low")
    assert reasons["short.mp4"].startswith("shorter than one clip")
    for file in manifest["file"]:
        assert (cfg.paths.ingested / file).stat().st_size > 0
    assert json.loads((project / "metrics/ingest.json").read_text())["n_accepted"] == 2
    validate_stage("ingest", cfg)
    assert (project / "reports/ingest.validation.md").read_text().startswith("# Validation of `ingest`: PASSED")


def test_ingest_with_nothing_usable_exits_with_a_clear_error_and_keeps_its_report(project):
    (project / "data/raw").mkdir(parents=True)
    (project / "data/raw/zero.mp4").write_bytes(b"")
    cfg = load_config()
    with pytest.raises(StageError, match="no usable video among 1 candidate"):
        run_ingest(cfg, progress=False)
    assert rejected(cfg.paths.ingested / "rejected.jsonl") == {"zero.mp4": "zero bytes"}


def test_clip_resamples_to_25_fps_and_16k_mono(project):
    raw = project / "data/raw"
    face_video(raw / "a/30fps.mp4", seconds=4.1, fps=30, sample_rate=44100)
    vfr_face_video(raw / "b/vfr.mp4", seconds=2.6)
    cfg = load_config()
    run_ingest(cfg, progress=False)
    stats = run_clip(cfg, progress=False)
    manifest = pd.read_parquet(cfg.paths.clips / "manifest.parquet")
    assert stats["n_clips"] == 3  # 4.1 s -> two clips, 2.6 s -> one
    for _, row in manifest.iterrows():
        info = probe(cfg.paths.clips / row["video"])
        assert info.n_frames == 50 and abs(info.fps - 25) < 1e-6 and not info.has_audio
        audio, rate = read_wav(cfg.paths.clips / row["audio"])
        assert rate == 16000 and audio.ndim == 1 and len(audio) == 32000
        assert np.sqrt(np.mean(audio**2)) > 0.05  # the tone made it through, not silence
    validate_stage("clip", cfg)


def test_clip_drops_dark_static_and_cut_clips_with_reasons(project):
    from factories import face_frames, tone

    from singer.media import write_video

    raw = project / "data/raw"
    frames = face_frames(50)
    write_video(raw / "dark.mp4", (frames * 0.05).astype(np.uint8), 25, audio=tone(2), sample_rate=16000)
    write_video(raw / "static.mp4", np.repeat(frames[:1], 50, 0), 25, audio=tone(2), sample_rate=16000)
    cut = np.concatenate([frames[:25], 255 - frames[25:]])
    write_video(raw / "cut.mp4", cut, 25, audio=tone(2), sample_rate=16000)
    face_video(raw / "good.mp4", seconds=2.0)
    cfg = load_config()
    run_ingest(cfg, progress=False)
    run_clip(cfg, progress=False)
    rows = [json.loads(x) for x in (cfg.paths.clips / "rejected.jsonl").read_text().splitlines()]
    by_video = {r["video_id"].split("_")[0]: r["reason"] for r in rows}
    assert by_video["dark"].startswith("too dark")
    assert by_video["static"].startswith("static")
    assert by_video["cut"].startswith("crosses a scene cut")
    assert pd.read_parquet(cfg.paths.clips / "manifest.parquet")["subject"].tolist() == ["good"]


def test_clip_starts_and_quality_units():
    assert clip_starts(6.0, 2.0, 2.0) == [0.0, 2.0, 4.0]
    assert clip_starts(5.99, 2.0, 2.0) == [0.0, 2.0]
    assert clip_starts(1.0, 2.0, 2.0) == []
    still = np.full((5, 8, 8, 3), 128, np.uint8)
    q = quality(still)
    assert q["motion"] == 0 and abs(q["mean_luma"] - 128) < 1e-3 and q["max_cut_score"] < 1e-6


def test_failed_validation_stops_with_a_readable_report(project):
    raw = project / "data/raw"
    face_video(raw / "a.mp4", seconds=2.0)
    cfg = load_config()
    run_ingest(cfg, progress=False)
    strict = load_config(overrides=["ingest.min_fps=30"])  # the manifest has a 25 fps video
    with pytest.raises(ValidationError, match="expect_column_values_to_be_between.column=fps"):
        validate_stage("ingest", strict)
    report = (project / "reports/ingest.validation.md").read_text()
    assert "FAILED" in report and "**FAIL**" in report and "fps" in report
