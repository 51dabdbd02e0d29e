"""Stage `crop`: face crops, landmarks, Hallo's masks, reference frame, vocals, rejections, atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from factories import face_frames, tone

from singer import faces as F
from singer.config import load_config
from singer.data import crop as C
from singer.data.common import StageError
from singer.media import probe, read_frames, write_video, write_wav

FPS = 25
N = 25  # one second per clip keeps the batch quick


def jumping_frames(n: int, size=(160, 160), jump: float = 24.0, seed: int = 1) -> np.ndarray:
    """The astronaut jumping by up to `jump` pixels from frame to frame."""
    rng = np.random.default_rng(seed)
    out = []
    for frame in face_frames(n, size):
        dx, dy = rng.uniform(-jump, jump, 2)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        out.append(cv2.warpAffine(frame, m, (size[1], size[0]), borderMode=cv2.BORDER_REPLICATE))
    return np.stack(out)


class ClipDir:
    """A clips folder as the clip stage writes it (mp4 + wav + manifest.parquet)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def add(self, clip_id: str, frames: np.ndarray | None = None, truth: dict | None = None,
            video_bytes: bytes | None = None, vocals: bool = False) -> None:
        video = self.root / f"{clip_id}.mp4"
        if video_bytes is not None:
            video.write_bytes(video_bytes)
            h = w = 160
        else:
            write_video(video, frames, FPS, crf=12)
            h, w = frames.shape[1:3]
        write_wav(self.root / f"{clip_id}.wav", tone(N / FPS), 16000)
        if vocals:  # the separated vocals, as a separating clip stage will name them
            write_wav(self.root / f"{clip_id}.vocals.wav", tone(N / FPS, freq=440.0), 16000)
        truth_name = ""
        if truth is not None:
            truth_name = f"{clip_id}.truth.json"
            (self.root / truth_name).write_text(json.dumps(truth))
        self.rows.append({
            "clip_id": clip_id, "video_id": f"v_{clip_id}", "subject": f"s_{clip_id}", "start_s": 0.0,
            "seconds": N / FPS, "fps": float(FPS), "n_frames": N, "width": w, "height": h,
            "video": f"{clip_id}.mp4", "audio": f"{clip_id}.wav", "truth": truth_name,
            "vocals": f"{clip_id}.vocals.wav" if vocals else "",
        })

    def write(self) -> None:
        pd.DataFrame(self.rows).to_parquet(self.root / "manifest.parquet", index=False)


def make_cfg(tmp: Path, clips: Path, **crop):
    overrides = [f"paths.clips={clips}", f"paths.crops={tmp / 'crops'}", f"paths.metrics={tmp / 'metrics'}",
                 "crop.workers=1"]
    overrides += [f"crop.{k}={v}" for k, v in crop.items()]
    return load_config(Path(__file__).parent.parent / "params.yaml", preset="tiny", overrides=overrides)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One crop run over good and bad clips; tests below inspect its output."""
    tmp = tmp_path_factory.mktemp("crop")
    clips = ClipDir(tmp / "clips")
    clips.add("good", face_frames(N, (160, 160)), truth={"mouth_opening": [0.1] * N})
    clips.add("portrait", face_frames(N, (320, 180), seed=2), vocals=True)
    clips.add("two_faces", face_frames(N, (160, 320), faces=2))
    clips.add("no_face", face_frames(N, (160, 160), faces=0))
    clips.add("jumpy", jumping_frames(N))
    half = np.concatenate([face_frames(10, (160, 160)), face_frames(N - 10, (160, 160), faces=0)])
    clips.add("half_missing", half)
    good_mp4 = (clips.root / "good.mp4").read_bytes()
    clips.add("broken", video_bytes=good_mp4[: len(good_mp4) // 3])
    clips.write()
    cfg = make_cfg(tmp, clips.root)
    stats = C.run_crop(cfg, progress=False)
    return cfg, stats


def _rejected(cfg) -> dict[str, str]:
    rows = [json.loads(line) for line in (cfg.paths.crops / "rejected.jsonl").read_text().splitlines()]
    assert all(r["stage"] == "crop" for r in rows)
    return {r["clip_id"]: r["reason"] for r in rows}


def test_batch_keeps_good_clips_and_rejects_bad_ones_with_reasons(batch):
    cfg, stats = batch
    manifest = pd.read_parquet(cfg.paths.crops / "manifest.parquet")
    assert sorted(manifest["clip_id"]) == ["good", "portrait"]
    assert list(manifest.columns) == C.MANIFEST_COLUMNS
    reasons = _rejected(cfg)
    assert reasons["two_faces"].startswith("several faces")
    assert reasons["no_face"].startswith("no face")
    assert reasons["jumpy"].startswith("jittery track")
    assert reasons["half_missing"].startswith("too many frames without a face")
    assert reasons["broken"].startswith("unreadable clip")
    assert stats["n_in"] == 7 and stats["n_accepted"] == 2 and stats["n_rejected"] == 5
    assert stats["rejected_reasons"] == {"several faces": 1, "no face": 1, "jittery track": 1,
                                         "too many frames without a face": 1, "unreadable clip": 1}
    assert stats["frames_per_second"] > 0
    assert json.loads((cfg.paths.metrics / "crop.json").read_text())["n_accepted"] == 2


def test_good_clip_files_and_shapes(batch):
    cfg, _ = batch
    res = cfg.crop.resolution
    folder = cfg.paths.crops / "good"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["frames.mp4", "audio.wav", "landmarks.npy", "masks.npz", "reference.png", "meta.json", "truth.json"])
    info = probe(folder / "frames.mp4")
    assert (info.width, info.height, info.n_frames) == (res, res, N)
    assert not info.has_audio and abs(info.fps - FPS) < 0.01
    lm = np.load(folder / "landmarks.npy")
    assert lm.shape == (N, 68, 2) and lm.dtype == np.float32
    masks = np.load(folder / "masks.npz")
    assert sorted(masks.files) == ["face", "face_region", "full", "lip"]
    for name in ("full", "face", "lip"):  # soft, in [0, 1]
        assert masks[name].shape == (res, res) and masks[name].dtype == np.float16
        assert masks[name].min() >= 0 and masks[name].max() <= 1 and len(np.unique(masks[name])) > 10
    assert masks["face_region"].dtype == np.uint8 and set(np.unique(masks["face_region"])) == {0, 1}
    ref = cv2.imread(str(folder / "reference.png"))
    assert ref.shape == (res, res, 3)
    assert (folder / "audio.wav").read_bytes() == (cfg.paths.clips / "good.wav").read_bytes()
    assert json.loads((folder / "truth.json").read_text()) == {"mouth_opening": [0.1] * N}
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta["crop_boxes"]) == N and len(meta["scores"]) == N and len(meta["face_boxes"]) == N
    assert meta["missing_fraction"] == 0 and set(meta["landmarks_source"]) == {"dlib"}
    assert 0 <= meta["reference_frame"] < N
    row = pd.read_parquet(cfg.paths.crops / "manifest.parquet").set_index("clip_id").loc["good"]
    assert row["has_truth"] and row["n_frames"] == N and row["resolution"] == res and row["dir"] == "good"
    assert row["face_score_min"] >= cfg.crop.min_face_score
    assert 0 <= row["jitter"] <= cfg.crop.max_jitter
    portrait = pd.read_parquet(cfg.paths.crops / "manifest.parquet").set_index("clip_id").loc["portrait"]
    assert not portrait["has_truth"] and not (cfg.paths.crops / "portrait" / "truth.json").exists()
    # separated vocals named by the clips manifest are copied; a clip without them gets none
    vocals = (cfg.paths.crops / "portrait" / "vocals.wav").read_bytes()
    assert vocals == (cfg.paths.clips / "portrait.vocals.wav").read_bytes()


@pytest.mark.parametrize("clip_id", ["good", "portrait"])
def test_landmarks_inside_crop_and_match_dlib_on_the_crop(batch, clip_id):
    cfg, _ = batch
    res = cfg.crop.resolution
    folder = cfg.paths.crops / clip_id
    lm = np.load(folder / "landmarks.npy")
    assert lm.min() > -0.5 and lm.max() < res - 0.5
    # the face (landmark extent) spans crop.scale of the crop side
    extent = (lm.max(axis=1) - lm.min(axis=1)).max(axis=1)
    assert abs(np.median(extent) / res - cfg.crop.scale) < 0.05
    frames, _ = read_frames(folder / "frames.mp4")
    errors = []
    for i in range(0, N, 6):
        found = F.detect_landmarks(frames[i], (0, 1, 2, 3))
        assert found is not None, f"dlib finds no face in crop frame {i}"
        errors.append(np.abs(found[0] - lm[i]).mean())
    assert max(errors) < 1.5, errors  # pixels at 64^2


def test_masks_are_hallos_training_masks(batch):
    """Hallo's training masks (image_processor.py:304-314): the face and lip boxes of every frame united, ratio 1,
    blurred: full = the background, face = the face without the lips, lip = the lips; face_region = the hard
    face box. Here from the clip's own crop landmarks, at crop resolution."""
    cfg, _ = batch
    res = cfg.crop.resolution
    for clip_id in ("good", "portrait"):
        stored = np.load(cfg.paths.crops / clip_id / "masks.npz")
        lm = np.load(cfg.paths.crops / clip_id / "landmarks.npy")
        expected = F.make_masks(lm, res)
        for k in ("full", "face", "lip"):
            np.testing.assert_allclose(stored[k].astype(np.float32), expected[k], atol=1e-3)
        assert np.array_equal(stored["face_region"], expected["face_region"])
        region = stored["face_region"].astype(bool)
        outline = np.round(F.face_outline(lm[0])).astype(int).clip(0, res - 1)
        assert region[outline[:, 1], outline[:, 0]].mean() > 0.9  # the face box holds the face
        assert region.sum() < region.size
        mouth = np.round(lm[:, 48:60].reshape(-1, 2).mean(0)).astype(int)
        full, face, lip = (stored[k].astype(np.float32) for k in ("full", "face", "lip"))
        assert lip[mouth[1], mouth[0]] > 0.9 and face[mouth[1], mouth[0]] < 0.1
        centre = np.round(lm[0, 27:31].mean(0)).astype(int)  # the nose: face, not lip, not background
        assert face[centre[1], centre[0]] > 0.3 and full[centre[1], centre[0]] < 0.05
        assert full.max() > 0.5  # there is background


def test_failing_runs_leave_previous_output_intact(batch, tmp_path, monkeypatch):
    cfg, _ = batch
    crops = tmp_path / "crops"
    shutil.copytree(cfg.paths.crops, crops)
    before = {p.relative_to(crops): p.read_bytes() for p in crops.rglob("*") if p.is_file()}

    # 1. nothing survives: CropError (a StageError), the old output stays
    clips = ClipDir(tmp_path / "clips")
    clips.add("no_face", face_frames(N, (160, 160), faces=0))
    clips.write()
    cfg2 = make_cfg(tmp_path, clips.root)
    with pytest.raises(StageError, match="no clip survived"):
        C.run_crop(cfg2, progress=False)
    # 2. a crash while writing the stage output
    clips.add("good", face_frames(N, (160, 160)))
    clips.write()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(C, "write_parquet_atomic", boom)
    with pytest.raises(OSError, match="disk full"):
        C.run_crop(cfg2, progress=False)
    after = {p.relative_to(crops): p.read_bytes() for p in crops.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "crops", "metrics"]  # no temp dirs left


def test_missing_clips_manifest_is_a_stage_error(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "nothing")
    with pytest.raises(C.CropError, match="not found"):
        C.run_crop(cfg, progress=False)


# ------------------------------------------------------------------------------------ pure functions
def test_crop_frame_and_to_crop_agree():
    rng = np.random.default_rng(0)
    frame = np.zeros((200, 300, 3), np.uint8)
    points = np.array([[133.0, 101.0], [150.0, 112.0], [137.0, 121.0]])
    for x, y in points.astype(int):
        frame[y - 1 : y + 2, x - 1 : x + 2] = 255
    for side, res in ((90.0, 64), (150.0, 64), (40.0, 64), (130.0, 128)):
        centre = np.array([140.0, 110.0]) + rng.uniform(-3, 3, 2)
        crop = F.crop_frame(frame, centre, side, res)
        assert crop.shape == (res, res, 3)
        expected = F.to_crop(points[None], centre[None], side, res)[0]
        for (u, v) in expected:
            r = max(2, int(np.ceil(res / side * 3)))
            win = crop[int(v) - r : int(v) + r + 2, int(u) - r : int(u) + r + 2, 0].astype(float)
            ys, xs = np.mgrid[int(v) - r : int(v) + r + 2, int(u) - r : int(u) + r + 2]
            cu, cv_ = (win * xs).sum() / win.sum(), (win * ys).sum() / win.sum()
            assert abs(cu - u) < 0.3 and abs(cv_ - v) < 0.3, (side, res, (u, v), (cu, cv_))


def test_crop_outside_the_frame_replicates_edges():
    frame = np.zeros((100, 100, 3), np.uint8)
    frame[:, :50] = 200
    crop = F.crop_frame(frame, np.array([10.0, 50.0]), 80.0, 32)
    assert crop.shape == (32, 32, 3)
    assert (crop[:, :4] == 200).all()  # left of the frame: replicated column 0


def test_choose_reference_prefers_early_closed_mouth():
    mouth = np.array([0.30, 0.05, 0.20, 0.04, 0.01, 0.25])
    detected = np.array([True, True, True, True, False, True])
    assert C.choose_reference(mouth, detected) == 1  # 0.05 is within 0.02 of the detected minimum 0.04
    assert C.choose_reference(mouth, np.ones(6, bool)) == 4


def test_geometry_ignores_the_jaw_and_smooths():
    from skimage import data

    image = data.astronaut()
    lm0, _, _ = F.detect_landmarks(image)
    t = 30
    lms = np.repeat(lm0[None].astype(np.float64), t, axis=0)
    lms[:, :, 0] += np.linspace(0, 6, t)[:, None]  # slow drift
    lms[::2, 5:12, 1] += 8.0                       # the jaw drops on every other frame
    lms[::2, 56:59, 1] += 8.0
    detected = np.ones(t, bool)
    detected[7] = False
    lms[7] = np.nan
    cc = load_config().crop
    geo = F.crop_geometry(lms.astype(np.float32), detected, cc)
    assert np.allclose(np.diff(geo.centres[:, 1]), 0, atol=1e-6)  # jaw motion does not move the crop
    assert np.all(np.diff(geo.centres[:, 0]) >= -1e-9)
    assert np.nanmax(geo.jumps) < 0.01
    assert np.isfinite(geo.jumps[6]) and np.isnan(geo.jumps[7])  # 6 -> 8 measured over the gap
    assert abs(geo.side - np.median(F.face_size(lms[detected])) / cc.scale) < 1e-6


@pytest.mark.slow
def test_two_workers_give_the_same_result(tmp_path):
    clips = ClipDir(tmp_path / "clips")
    for k in range(3):
        clips.add(f"c{k}", face_frames(N, (160, 160), seed=k))
    clips.add("no_face", face_frames(N, (160, 160), faces=0))
    clips.write()
    serial = make_cfg(tmp_path / "a", clips.root)
    parallel = make_cfg(tmp_path / "b", clips.root, workers=2)
    s1, s2 = C.run_crop(serial, progress=False), C.run_crop(parallel, progress=False)
    assert s2["workers"] == 2 and s1["n_accepted"] == s2["n_accepted"] == 3
    m1 = pd.read_parquet(serial.paths.crops / "manifest.parquet")
    m2 = pd.read_parquet(parallel.paths.crops / "manifest.parquet")
    pd.testing.assert_frame_equal(m1, m2)
    for k in range(3):
        np.testing.assert_array_equal(np.load(serial.paths.crops / f"c{k}" / "landmarks.npy"),
                                      np.load(parallel.paths.crops / f"c{k}" / "landmarks.npy"))
    assert _rejected(parallel) == _rejected(serial)


@pytest.mark.parametrize("second, counted", [(120, True), (60, False)])
def test_a_second_face_counts_by_size_not_by_count(second, counted):
    from skimage import data

    portrait = cv2.resize(data.astronaut()[30:330, 90:390], (200, 200), interpolation=cv2.INTER_AREA)
    small = cv2.resize(portrait, (second, second), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(6):
        f = np.full((200, 400, 3), 90, np.uint8)
        f[:, :200] = portrait
        f[20 : 20 + second, 250 : 250 + second] = small
        frames.append(np.roll(f, i, axis=1))
    cc = load_config().crop.model_copy(update={"redetect_every": 3})  # ratio 0.6 vs 0.3 of the main face
    track = F.track_faces(np.stack(frames), cc)
    assert track.keyframes == [0, 3] and track.detected.all()
    reason = C._reject_reason(track, 6, cc)
    assert (reason is not None and reason.startswith("several faces")) == counted
    assert track.boxes[:, 2].max() < 200  # the track stays on the main (larger, first-found) face


def test_an_exception_in_one_clip_rejects_it_and_the_batch_goes_on(tmp_path, monkeypatch):
    clips = ClipDir(tmp_path / "clips")
    clips.add("boom", face_frames(N, (160, 160)))
    clips.add("good", face_frames(N, (160, 160), seed=3))
    clips.add("../escape", face_frames(2, (160, 160)))
    clips.write()
    original = C.process_clip

    def flaky(row, *args, **kwargs):
        if row["clip_id"] == "boom":
            raise RuntimeError("something unexpected")
        return original(row, *args, **kwargs)

    monkeypatch.setattr(C, "process_clip", flaky)
    cfg = make_cfg(tmp_path, clips.root)
    stats = C.run_crop(cfg, progress=False)
    assert stats["n_accepted"] == 1 and stats["rejected_reasons"] == {"error": 1, "bad clip id": 1}
    reasons = _rejected(cfg)
    assert "RuntimeError" in reasons["boom"] and "something unexpected" in reasons["boom"]
    assert sorted(p.name for p in cfg.paths.crops.iterdir()) == ["good", "manifest.parquet", "rejected.jsonl"]
