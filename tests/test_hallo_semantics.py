"""The conditioning data means what Hallo's released weights were trained on (fudan-generative-vision/hallo at
8fd7c57). Each test states the Hallo rule it checks and where Hallo's code has it."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from factories import tone
from PIL import Image

from singer.config import load_config
from singer.faces import masks as M
from singer.media import write_video, write_wav

RES = 64


def landmarks_at(cx: float, cy: float, scale: float = 1.0, mouth: float = 0.0) -> np.ndarray:
    """A plausible (68, 2) face in crop pixels: jaw arc, brows, nose, eyes, lips (opened by `mouth` px)."""
    lm = np.zeros((68, 2))
    a = np.linspace(np.pi * 0.95, np.pi * 0.05, 17)
    lm[0:17] = np.c_[cx - 20 * np.cos(a), cy + 4 + 18 * np.sin(a)]          # jaw, chin at 8
    lm[17:27] = np.c_[np.linspace(cx - 17, cx + 17, 10), np.full(10, cy - 12)]  # brows
    lm[27:36] = np.c_[np.full(9, cx), np.linspace(cy - 9, cy + 4, 9)]        # nose, top at 27
    lm[36:48] = np.c_[np.r_[np.linspace(cx - 13, cx - 5, 6), np.linspace(cx + 5, cx + 13, 6)], np.full(12, cy - 6)]
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    lm[48:60] = np.c_[cx + 8 * np.cos(t), cy + 12 + (3 + mouth / 2) * np.sin(t)]   # outer lip
    lm[60:68] = np.c_[cx + 5 * np.cos(t[:8]), cy + 12 + (1 + mouth / 2) * np.sin(t[:8])]
    return (lm - [cx, cy]) * scale + [cx, cy]


def hallo_expand_region(points: np.ndarray, ratio: float, w: int, h: int) -> tuple[int, int, int, int]:
    """hallo/utils/util.py:418-425 + expand_region (:529-564), written out in Hallo's own frame (pixel edges
    at integers: our crop pixels + 0.5): round the corners, centre = (max + min) // 2, half side =
    ((max - min) * ratio) // 2, shift a box that leaves the image back inside. -> (x0, y0, x1, y1)."""
    pts = points + 0.5
    (min_x, min_y), (max_x, max_y) = np.round(pts.min(0)), np.round(pts.max(0))
    mid_x, mid_y = (max_x + min_x) // 2, (max_y + min_y) // 2
    sx, sy = (max_x - min_x) * ratio, (max_y - min_y) * ratio
    min_x, max_x, min_y, max_y = mid_x - sx // 2, mid_x + sx // 2, mid_y - sy // 2, mid_y + sy // 2
    if min_x < 0:
        max_x, min_x = max_x - min_x, 0
    if max_x > w:
        min_x, max_x = min_x - (max_x - w), w
    if min_y < 0:
        max_y, min_y = max_y - min_y, 0
    if max_y > h:
        min_y, max_y = min_y - (max_y - h), h
    return round(min_x), round(min_y), round(max_x), round(max_y)


def hallo_blur(hard: np.ndarray, kernel: int) -> np.ndarray:
    """blur_mask (util.py:589-609) on a 0/1 box: resize to 64x64, GaussianBlur(kernel, sigma 0), NORM_MINMAX."""
    small = cv2.resize(hard.astype(np.float32), (64, 64))
    blurred = cv2.GaussianBlur(small, (kernel, kernel), 0)
    return cv2.normalize(blurred, None, 0, 1, cv2.NORM_MINMAX)


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("ratio", [1.0, 1.2, 2.0])
@pytest.mark.parametrize("where", [(32.3, 30.6), (8.0, 10.0), (58.0, 56.5)])  # inside, and leaving two edges
def test_boxes_follow_hallos_expand_region(ratio, where):
    """Hallo's face and lip boxes: the landmark bounding box, rounded, scaled by the ratio about the floored
    centre, shifted back inside the image (util.py:407-495, 529-564). A box larger than the image is clipped to
    it (a deliberate difference: Hallo's negative start would slice from the far end in numpy)."""
    lm = landmarks_at(*where)
    for points in (M.face_outline(lm), lm[48:60]):
        hallo = tuple(int(np.clip(v, 0, RES)) for v in hallo_expand_region(points, ratio, RES, RES))
        assert M.expand_box(points, ratio, RES, RES) == hallo
    x0, y0, x1, y1 = M.expand_box(lm[48:60], 2.0, RES, RES)
    assert 0 <= x0 < x1 <= RES and 0 <= y0 < y1 <= RES


def test_masks_are_hallos_separation_of_blurred_boxes():
    """ImageProcessorForDataProcessing.preprocess (image_processor.py:304-314): blur the face box with a 51x51
    and the lip box with a 31x31 kernel on a 64x64 canvas, normalise; full = 1 - face blur (the BACKGROUND),
    face = face blur - lip blur (the face WITHOUT the lips), lip = lip blur; face_region = the hard face box."""
    lm = landmarks_at(32, 30)
    m = M.make_masks(lm[None], RES)
    assert set(m) == {"full", "face", "lip", "face_region"}
    x0, y0, x1, y1 = hallo_expand_region(M.face_outline(lm), 1.0, RES, RES)
    face_box = np.zeros((RES, RES), np.uint8)
    face_box[y0:y1, x0:x1] = 1
    lx0, ly0, lx1, ly1 = hallo_expand_region(lm[48:60], 1.0, RES, RES)
    lip_box = np.zeros((RES, RES), np.uint8)
    lip_box[ly0:ly1, lx0:lx1] = 1
    assert np.array_equal(m["face_region"], face_box) and m["face_region"].dtype == np.uint8
    face_blur, lip_blur = hallo_blur(face_box, 51), hallo_blur(lip_box, 31)
    np.testing.assert_allclose(m["full"], 1 - face_blur, atol=1e-5)
    np.testing.assert_allclose(m["face"], np.maximum(face_blur - lip_blur, 0), atol=1e-5)
    np.testing.assert_allclose(m["lip"], lip_blur, atol=1e-5)
    for k in ("full", "face", "lip"):
        v = m[k]
        assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
        assert ((v > 0.05) & (v < 0.95)).mean() > 0.1, f"{k} is not soft"
    # the background is high away from the face, the lips are not part of "face"
    assert m["full"][0, 0] > 0.5 and m["full"][30, 32] < 0.05
    mouth = (round(lm[48:60, 1].mean()), round(lm[48:60, 0].mean()))
    assert m["lip"][mouth] > 0.95 and m["face"][mouth] < 0.1


def test_the_blur_is_relative_to_the_image_side():
    """blur_mask resizes every mask to a fixed 64x64 canvas before the fixed-size blur, so the same face at
    twice the resolution gets the same masks, twice the size (util.py:602-607)."""
    lm = landmarks_at(32, 30)
    small = M.make_masks(lm[None], 64)
    big = M.make_masks(((lm + 0.5) * 2 - 0.5)[None], 128)
    for k in ("full", "face", "lip"):
        down = cv2.resize(big[k], (64, 64), interpolation=cv2.INTER_AREA)
        assert np.abs(down - small[k]).max() < 0.1, k  # a kernel fixed in pixels: 0.33


def test_training_masks_unite_the_clip_and_a_portrait_enlarges_its_boxes():
    """Training data unites the boxes of all frames into their bounding box, ratio 1 (get_union_face_mask /
    get_union_lip_mask, util.py:433-495, 923-957); one image at inference enlarges the face box by 1.2
    (configs/inference/default.yaml:41) and the lip box by 2.0 (get_lip_mask, util.py:407)."""
    a, b = landmarks_at(28, 28, mouth=0), landmarks_at(36, 32, mouth=6)
    union = M.make_masks(np.stack([a, b]), RES)["face_region"]
    ys, xs = np.nonzero(union)
    boxes = [hallo_expand_region(M.face_outline(lm), 1.0, RES, RES) for lm in (a, b)]
    assert (xs.min(), ys.min()) == (min(bx[0] for bx in boxes), min(bx[1] for bx in boxes))
    assert (xs.max() + 1, ys.max() + 1) == (max(bx[2] for bx in boxes), max(bx[3] for bx in boxes))
    assert union[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # a box, not two
    assert (M.TRAIN_FACE_EXPAND, M.TRAIN_LIP_EXPAND) == (1.0, 1.0)
    assert (M.INFERENCE_FACE_EXPAND, M.INFERENCE_LIP_EXPAND) == (1.2, 2.0)
    lm = landmarks_at(32, 28, scale=0.7)
    train = M.make_masks(lm[None], RES)
    portrait = M.make_masks(lm[None], RES, M.INFERENCE_FACE_EXPAND, M.INFERENCE_LIP_EXPAND)
    tx0, _, tx1, _ = M.expand_box(lm[48:60], 1.0, RES, RES)
    px0, _, px1, _ = M.expand_box(lm[48:60], 2.0, RES, RES)
    assert abs((px1 - px0) - 2 * (tx1 - tx0)) <= 2
    assert portrait["face_region"].sum() > 1.3 * train["face_region"].sum()


def test_prepare_reference_builds_hallos_inference_masks():
    """A portrait gets Hallo's one-image masks (ImageProcessor.preprocess -> get_mask, image_processor.py:141):
    the face box x1.2, the lip box x2.0, from its crop landmarks."""
    from skimage import data

    from singer.faces import prepare_reference

    ref = prepare_reference(data.astronaut(), RES)
    expected = M.make_masks(ref["landmarks"][None], RES, 1.2, 2.0)
    assert set(ref["masks"]) == {"full", "face", "lip", "face_region"}
    for k, v in expected.items():
        assert ref["masks"][k].dtype == v.dtype and np.array_equal(ref["masks"][k], v), k


# ------------------------------------------------------------------------------------------------- audio
@pytest.fixture(scope="module")
def encoder():
    from singer.models.audio import make_audio_encoder

    return make_audio_encoder(load_config("params.yaml", preset="tiny").model, seed=0).eval()


def test_a_window_is_a_slice_of_the_whole_clip_encoding(encoder):
    """Hallo encodes the whole clip once (audio_processor.py:108-119: seq_len = ceil(seconds * fps)), windows
    +-2 frames over that whole sequence and slices the training window out of it (talk_video.py:242-250);
    it never runs wav2vec2 on a window's samples alone."""
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(2, 32000, generator=g) * 0.1
    starts = torch.tensor([3, 30])
    with torch.no_grad():
        whole = encoder(clip, num_frames=None, fps=25)             # (2, 50, tokens, D): Hallo's 50 frames
        tokens = encoder.window_tokens(clip, starts, num_frames=16, fps=25)
        first = encoder.window_tokens(clip, None, num_frames=16, fps=25)
        alone = encoder(clip[1:, 30 * 640:46 * 640], num_frames=16, fps=25)
    assert whole.shape[1] == math.ceil(32000 / 16000 * 25) == 50
    assert tokens.shape == (2, 16, encoder.config.tokens, encoder.config.cross_attention_dim)
    for i, s in enumerate(starts.tolist()):
        torch.testing.assert_close(tokens[i], whole[i, s:s + 16], rtol=0, atol=1e-5)
    torch.testing.assert_close(first, whole[:, :16], rtol=0, atol=1e-5)
    assert (tokens[1] - alone[0]).abs().max() > 1e-2  # encoding the window alone means something else
    with pytest.raises(ValueError, match="do not fit"):
        encoder.window_tokens(clip, torch.tensor([40, 0]), num_frames=16, fps=25)


# ------------------------------------------------------------------------------------------------- data
def write_crops(root, clip_id="c0", n=50, vocals=False, old_masks=False):
    """A crops folder as the crop stage writes it, for one clip of n frames at 64^2."""
    d = root / clip_id
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_video(d / "frames.mp4", rng.integers(0, 255, (n, RES, RES, 3), dtype=np.uint8), 25, crf=12)
    write_wav(d / "audio.wav", tone(n / 25), 16000)
    if vocals:
        write_wav(d / "vocals.wav", tone(n / 25, freq=440.0), 16000)
    Image.fromarray(np.full((RES, RES, 3), 128, np.uint8)).save(d / "reference.png")
    m = M.make_masks(landmarks_at(32, 30)[None], RES)
    if old_masks:
        m = {"face": m["face_region"], "lip": m["face_region"], "pose": m["face_region"]}
    np.savez_compressed(d / "masks.npz", **m)
    pd.DataFrame([{"clip_id": clip_id, "dir": clip_id, "n_frames": n}]).to_parquet(root / "manifest.parquet")
    return m


@pytest.fixture
def tiny_cfg(tmp_path):
    cfg = load_config("params.yaml", preset="tiny")
    return cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"crops": tmp_path / "crops"})})


@pytest.mark.parametrize("vocals", [False, True])
def test_a_training_item_carries_the_whole_clip_and_where_the_window_starts(tiny_cfg, vocals):
    """The item gives the whole clip's waveform and the window's first frame (the model slices the window
    out of the whole-clip encoding, as Hallo); the encoder hears vocals.wav when the clip has it (Hallo
    trains on separated vocals, configs/train/stage2.yaml:15); masks are (full, face, lip), plus the hard box."""
    from singer.data.dataset import SingerClipDataset

    stored = write_crops(tiny_cfg.paths.crops, vocals=vocals)
    ds = SingerClipDataset(tiny_cfg, "train", clip_ids=["c0"])
    item = ds[0]
    heard = tone(2.0, freq=440.0 if vocals else 220.0)
    assert item["audio"].shape == (32000,) and torch.allclose(item["audio"], torch.from_numpy(heard), atol=1e-4)
    assert np.allclose(ds.song("c0"), tone(2.0), atol=1e-4)  # the song stays audio.wav
    assert item["audio_start_frame"].dtype == torch.long and int(item["audio_start_frame"]) == item["start"]
    assert item["masks"].shape == (3, RES, RES) and item["masks"].dtype == torch.float32
    for i, k in enumerate(("full", "face", "lip")):
        np.testing.assert_allclose(item["masks"][i].numpy(), stored[k], atol=1e-7)
    assert item["face_region"].shape == (1, RES, RES) and item["face_region"].dtype == torch.float32
    assert torch.equal(item["face_region"][0], torch.from_numpy(stored["face_region"]).float())


def test_training_windows_keep_their_audio_context_inside_the_clip(tiny_cfg):
    """Hallo draws start_idx in [n_motion_frames, n - n_sample_frames - audio_margin - 1]
    (talk_video.py:222-225), so every frame of a training window has its whole +-2 audio context."""
    from singer.data.dataset import SingerClipDataset

    write_crops(tiny_cfg.paths.crops)
    mc = tiny_cfg.model
    starts = {SingerClipDataset(tiny_cfg, "train", clip_ids=["c0"], epoch=e).window_start(0) for e in range(200)}
    assert min(starts) == mc.motion_frames and max(starts) == 50 - mc.num_frames - mc.audio_window - 1


def test_masks_from_an_older_crop_stage_are_a_one_line_error(tiny_cfg):
    from singer.data.dataset import SingerClipDataset

    write_crops(tiny_cfg.paths.crops, old_masks=True)
    with pytest.raises(ValueError, match="older crop stage") as err:
        SingerClipDataset(tiny_cfg, "train", clip_ids=["c0"])[0]
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- betas
@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_betas_are_hallos_training_betas(preset):
    """Hallo trains with scaled_linear betas from 0.00085 to 0.012 (betas = linspace(sqrt(b0), sqrt(b1))^2),
    rescaled to zero terminal SNR, v-prediction, trailing spacing (scripts/train_stage2.py:213-223 over
    configs/train/stage2.yaml:46-52)."""
    from singer.models.scheduler import make_scheduler

    mc = load_config("params.yaml", preset=preset).model
    assert mc.beta_schedule == "scaled_linear"
    sched = make_scheduler(mc)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])  # zero terminal SNR, first step unchanged
    torch.testing.assert_close(sched.alphas_cumprod, root**2, rtol=0, atol=1e-6)
    linear = torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000), 0)
    assert (sched.alphas_cumprod[500] - linear[500]).abs() > 0.05  # not the linear schedule
    assert sched.config.timestep_spacing == "trailing" and sched.config.rescale_betas_zero_snr
