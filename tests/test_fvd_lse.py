"""FVD and LSE-D/C: the maths without weights, the networks on random weights, the loaders' refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from singer.evaluate.metrics import fvd as fvd_mod
from singer.evaluate.metrics import lse as lse_mod
from singer.evaluate.metrics.fvd import frechet_distance, fvd, fvd_from_features, gaussian_stats
from singer.evaluate.metrics.lse import lse, lse_from_distances, psf_mfcc, sync_distances
from singer.evaluate.networks.i3d import InceptionI3d, WeightsUnavailable, load_i3d, set_bn_eps
from singer.evaluate.networks.syncnet import SyncNet, load_syncnet

# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_1d_closed_form():
    m1, s1, m2, s2 = 0.3, 2.0, -1.2, 0.5
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
    got = frechet_distance(np.array([m1]), np.array([[s1]]), np.array([m2]), np.array([[s2]]))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_identical_sets_is_zero_even_rank_deficient():
    feats = np.random.default_rng(1).normal(size=(6, 100))  # 6 samples, 100-d: singular covariance
    mu, sigma = gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    r = fvd_from_features(feats, feats)
    assert r.status == "ok" and abs(r.value) < 1e-3
    assert (
        r.details["n_clips_real"] == 6
        and r.details["rank_deficient"] is True
        and "rank-deficient" in r.reason
    )


def test_identical_rank_deficient_sets_are_exactly_zero_apart():
    """50 clips of 400-d features: covariance rank 49. The symmetric square root gives 0 to rounding; sqrtm
    of the singular product does not (so this would fail on that path)."""
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 400)) * rng.uniform(0.1, 3.0, 400)
    r = fvd_from_features(feats, feats, bn_eps=1e-5, clips_per_video=1)
    assert r.status == "ok" and abs(r.value) < 1e-9
    assert r.details["covariance_rank_real"] == r.details["covariance_rank_fake"] == 49
    assert r.details["sqrt"] == "symmetric eigendecomposition" and r.details["rank_deficient"] is True
    assert r.details["bn_eps"] == 1e-5 and r.details["clips_per_video"] == 1
    mu, sigma = gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) > 1e-6  # the sqrtm path's error, for contrast
    # both paths agree where the answer is not 0, and on full-rank sets sqrtm is kept
    other = rng.normal(size=(50, 400)) * rng.uniform(0.1, 3.0, 400) + 0.1
    mu2, sigma2 = gaussian_stats(other)
    assert fvd_from_features(feats, other).value == pytest.approx(frechet_distance(mu, sigma, mu2, sigma2), rel=1e-6)
    full = fvd_from_features(rng.normal(size=(500, 8)), rng.normal(size=(500, 8)))
    assert full.details["sqrt"] == "scipy.linalg.sqrtm" and full.details["covariance_rank_real"] == 8


def test_fvd_from_features_grows_with_shift_and_needs_two_clips():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(50, 8))
    assert fvd_from_features(a, a + 1.0).value > fvd_from_features(a, a + 0.1).value > 0
    assert fvd_from_features(a[:1], a).status == "unavailable"


# --------------------------------------------------------------------------- I3D


def test_i3d_state_dict_names_match_the_pytorch_port():
    keys = set(InceptionI3d().state_dict())
    for k in (
        "Conv3d_1a_7x7.conv3d.weight",
        "Conv3d_1a_7x7.bn.running_var",
        "Conv3d_2c_3x3.conv3d.weight",
        "Mixed_3b.b0.conv3d.weight",
        "Mixed_4f.b1b.conv3d.weight",
        "Mixed_5c.b3b.bn.weight",
        "logits.conv3d.weight",
        "logits.conv3d.bias",
    ):
        assert k in keys
    sd = InceptionI3d().state_dict()
    assert sd["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    assert sd["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert sd["Mixed_5c.b1b.conv3d.weight"].shape == (384, 192, 3, 3, 3)


def test_i3d_full_forward_shape():  # about 1-2 s on 2 CPU cores
    torch.manual_seed(0)
    with torch.no_grad():
        y = InceptionI3d().eval()(torch.rand(1, 3, 16, 224, 224) * 2 - 1)
    assert y.shape == (1, 400) and torch.isfinite(y).all()


def test_i3d_reduced_width_forward_shape():
    with torch.no_grad():
        y = InceptionI3d(width=0.125).eval()(torch.rand(2, 3, 16, 64, 64) * 2 - 1)
    assert y.shape == (2, 400)


def test_i3d_loader_roundtrip_and_refusals(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = InceptionI3d().eval()
    path = tmp_path / "i3d_pretrained_400.pt"
    # old ports were saved before BatchNorm had num_batches_tracked: accept those files too
    torch.save({k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_i3d(path)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a state dict runs at the eps of the code it was converted for (VideoGPT/TATS), unless told otherwise
    eps = {m.eps for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm3d)}
    assert eps == {1e-5} and loaded.bn_eps == 1e-5 and ref.bn_eps == 1e-3
    assert load_i3d(path, bn_eps=1e-3).bn_eps == 1e-3
    monkeypatch.setenv("SINGER_I3D_PATH", str(path))
    assert isinstance(load_i3d(), InceptionI3d)

    bad = tmp_path / "bad.pt"
    torch.save({"foo.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsUnavailable, match="do not match"):
        load_i3d(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_i3d_torchscript_file_is_accepted(tmp_path):
    class Fake(torch.nn.Module):
        def forward(
            self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False
        ):
            return x.mean(dim=(2, 3, 4))[:, :1].repeat(1, 400)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(Fake()).save(str(path))
    model = load_i3d(path)
    assert model(torch.zeros(2, 3, 16, 8, 8)).shape == (2, 400) and model.bn_eps is None  # as exported
    with pytest.raises(ValueError, match="keeps the batch-norm eps"):
        load_i3d(path, bn_eps=1e-5)


def test_fvd_unavailable_without_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("SINGER_I3D_PATH", raising=False)
    video = np.zeros((16, 32, 32, 3), np.uint8)
    r = fvd([video, video], [video, video])
    assert r.status == "unavailable" and r.value is None and "SINGER_I3D_PATH" in r.reason
    missing = tmp_path / "nope.pt"
    r = fvd([video], [video], i3d_path=missing)
    assert r.status == "unavailable" and str(missing) in r.reason


def test_fvd_end_to_end_with_a_given_model():
    rng = np.random.default_rng(3)
    videos = [rng.integers(0, 256, (20, 40, 40, 3), dtype=np.uint8) for _ in range(2)]  # 1 clip each
    model = InceptionI3d(width=0.125).eval()
    same = fvd(videos, videos, model=model)
    assert same.status == "ok" and abs(same.value) < 1e-9 and same.details["n_clips_real"] == 2
    long = np.zeros((33, 8, 8, 3), np.uint8)
    assert len(fvd_mod.video_clips(long)) == 1  # one clip per video, as the common FVD code takes
    assert len(fvd_mod.video_clips(long, max_clips=None)) == 2
    x = fvd_mod.preprocess_clips(fvd_mod.video_clips(np.concatenate([videos[0], videos[1]]), max_clips=None))
    assert x.shape == (2, 3, 16, 224, 224) and x.min() >= -1 and x.max() <= 1


def test_fvd_moves_with_the_batch_norm_eps(tmp_path):
    """The same weights through eps 1e-3 (the port, TF) and 1e-5 (VideoGPT/TATS): different features and
    FVDs, each recording its eps. Running variances of order 1e-3, as trained I3D layers have, make the
    difference visible."""
    torch.manual_seed(0)
    model = InceptionI3d(width=0.125).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_var.uniform_(1e-4, 1e-2)
            m.running_mean.normal_(0, 0.05)
    rng = np.random.default_rng(4)
    real = [rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    fake = [np.clip(v.astype(int) + rng.integers(-40, 40, v.shape), 0, 255).astype(np.uint8) for v in real]
    results = {}
    for eps in (1e-3, 1e-5):
        set_bn_eps(model, eps)
        results[eps] = fvd(real, fake, model=model)
        assert results[eps].details["bn_eps"] == eps and results[eps].details["n_clips_fake"] == 3
    assert results[1e-3].value > 0 and results[1e-5].value > 0
    assert abs(results[1e-3].value - results[1e-5].value) > 0.01 * results[1e-5].value


# --------------------------------------------------------------------------- LSE


@pytest.mark.parametrize("k", [-7, -2, 0, 3, 11])
def test_sync_search_finds_planted_offset(k):
    rng = np.random.default_rng(4)
    t, d = 40, 64
    video = rng.normal(size=(t, d))
    audio = rng.normal(size=(t, d))
    # video frame i matches audio frame i - k (the reference's offset convention)
    for i in range(t):
        if 0 <= i - k < t:
            audio[i - k] = video[i]
    offsets, mdist = sync_distances(video, audio, vshift=15)
    assert len(offsets) == len(mdist) == 31 and offsets[0] == 15 and offsets[-1] == -15
    s = lse_from_distances(offsets, mdist)
    assert s["offset"] == k
    assert s["lse_d"] == pytest.approx(mdist.min()) and s["lse_c"] > 0
    # the distance at the planted offset: 0 where matched, ||v_i|| where the zero padding is compared
    expected = np.mean(
        [1e-6 * np.sqrt(d) if 0 <= i - k < t else np.linalg.norm(video[i] + 1e-6) for i in range(t)]
    )
    assert s["lse_d"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_lse_c_zero_for_flat_curve():
    s = lse_from_distances(np.arange(15, -16, -1), np.full(31, 7.5))
    assert s["lse_c"] == 0 and s["lse_d"] == 7.5


def test_syncnet_shapes_and_names():
    net = SyncNet().eval()
    keys = set(net.state_dict())
    for k in (
        "netcnnaud.0.weight",
        "netcnnaud.18.weight",
        "netfcaud.3.weight",
        "netcnnlip.0.weight",
        "netcnnlip.19.running_var",
        "netfclip.1.running_mean",
    ):
        assert k in keys, k
    with torch.no_grad():
        assert net.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255).shape == (2, 1024)
        assert net.forward_aud(torch.randn(2, 1, 13, 20)).shape == (2, 1024)


def test_syncnet_loader(tmp_path, monkeypatch):
    monkeypatch.delenv("SINGER_SYNCNET_PATH", raising=False)
    with pytest.raises(WeightsUnavailable, match="SINGER_SYNCNET_PATH"):
        load_syncnet()
    net = SyncNet()
    path = tmp_path / "syncnet_v2.model"
    torch.save({f"__S__.{k}": v for k, v in net.state_dict().items()}, path)
    monkeypatch.setenv("SINGER_SYNCNET_PATH", str(path))
    assert torch.equal(load_syncnet().netfclip[3].weight, net.netfclip[3].weight)
    torch.save(net, tmp_path / "pickled.model")  # a whole pickled model: refused, not unpickled
    with pytest.raises(WeightsUnavailable, match="not a plain state dict"):
        load_syncnet(tmp_path / "pickled.model")


def test_lse_unavailable_without_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("SINGER_SYNCNET_PATH", raising=False)
    out = lse(np.zeros((30, 64, 64, 3), np.uint8), np.zeros(19200), 16000, 25)
    assert set(out) == {"LSE-D", "LSE-C"}
    assert all(r.status == "unavailable" and r.value is None for r in out.values())
    out = lse(np.zeros((30, 64, 64, 3), np.uint8), np.zeros(19200), 16000, 25, syncnet_path=tmp_path / "x.model")
    assert "not found" in out["LSE-D"].reason


def test_lse_end_to_end_windows_on_random_weights():
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)  # 12 frames at 25 fps = 0.48 s
    audio = rng.normal(scale=0.1, size=7680)
    boxes = np.tile([8.0, 6.0, 40.0, 42.0], (12, 1))
    torch.manual_seed(0)
    net = SyncNet().eval()
    out = lse(frames, audio, 16000, 25, model=net, boxes=boxes, min_track=5)
    assert out["LSE-D"].status == "ok" and out["LSE-D"].details["n_windows"] == 12 - 5
    assert out["LSE-C"].value >= 0 and -15 <= out["LSE-D"].details["offset"] <= 15
    assert out["LSE-D"].details["track_start"] == 0 and out["LSE-D"].details["track_end"] == 11
    # the same clip at 50 fps (every frame twice) is taken back to the same 12 frames at 25 fps
    doubled = lse(np.repeat(frames, 2, axis=0), audio, 16000, 50, model=net,
                  boxes=np.repeat(boxes, 2, axis=0), min_track=5)
    assert doubled["LSE-D"].details["fps_in"] == 50 and doubled["LSE-D"].value == pytest.approx(out["LSE-D"].value)
    short = lse(frames, audio, 16000, 25, model=net, boxes=boxes)  # 12 <= MIN_TRACK detections
    assert short["LSE-D"].status == "unavailable" and "no face track of more than 25 frames" in short["LSE-D"].reason


def test_psf_mfcc_framing_and_energy():
    rng = np.random.default_rng(6)
    sig = np.round(rng.normal(scale=3000, size=16000))
    m = psf_mfcc(sig)
    assert m.shape == (99, 13)  # 1 + ceil((16000 - 400) / 160) frames of 13
    pre = np.append(sig[0], sig[1:] - 0.97 * sig[:-1])
    energy0 = np.sum(np.abs(np.fft.rfft(pre[:400], 512)) ** 2) / 512
    assert m[0, 0] == pytest.approx(np.log(energy0))
    fb = lse_mod.psf_filterbanks()
    assert fb.shape == (26, 257) and fb.max() <= 1 and (fb.sum(1) > 0).all()


# --------------------------------------------------------------------------- LSE's input crop


def _reference_crop(frame: np.ndarray, s: float, x: float, y: float, cs: float = 0.4) -> np.ndarray:
    """syncnet_python run_pipeline.py's crop of one frame, written out from its formula."""
    import cv2

    pad = int(s * (1 + 2 * cs))
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=110)
    rows = slice(int(y + pad - s), int(y + pad + s * (1 + 2 * cs)))
    cols = slice(int(x + pad - s * (1 + cs)), int(x + pad + s * (1 + cs)))
    return cv2.resize(padded[rows, cols], (224, 224))


def test_crop_box_of_a_face_track_follows_the_reference_formula():
    from scipy.signal import medfilt

    from singer.evaluate.metrics import syncnet_crop

    rng = np.random.default_rng(7)
    t = 30
    frames = rng.integers(0, 256, (t, 120, 160, 3), dtype=np.uint8)
    boxes = np.array([50.0, 30.0, 100.0, 90.0]) + rng.normal(0, 1.5, (t, 4))
    boxes[10] += [40, -20, 40, -20]  # one wild detection: the 13-frame median removes it
    crops = syncnet_crop.crop_track(frames, boxes)
    side = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    s = medfilt(side, 13)
    x = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, 13)
    y = medfilt((boxes[:, 1] + boxes[:, 3]) / 2, 13)
    for i in range(t):
        assert np.array_equal(crops[i], _reference_crop(frames[i], s[i], x[i], y[i])), i
    assert abs(x[10] - 75) < 5 and abs(y[10] - 60) < 5  # the outlier's centre was (115, 40)


def test_crop_puts_the_face_centre_where_syncnet_expects_it():
    """Rows cy - s .. cy + 1.8 s, columns cx +- 1.4 s: the box centre lands at row 224 / 2.8 = 80, column 112;
    a face at the frame's edge is padded with grey 110."""
    from singer.evaluate.metrics import syncnet_crop

    frames = np.zeros((20, 200, 200, 3), np.uint8)
    frames[:, 98:103, 98:103] = 255  # a marker at the centre of the box (70, 70)-(130, 130)
    crops = syncnet_crop.crop_track(frames, np.tile([70.0, 70.0, 130.0, 130.0], (20, 1)))
    rows, cols = np.nonzero(crops[10, :, :, 0] > 128)
    assert abs(rows.mean() - 80) <= 2 and abs(cols.mean() - 112) <= 2
    edge = syncnet_crop.crop_track(frames, np.tile([0.0, 0.0, 60.0, 60.0], (20, 1)))
    assert (edge[10, :20, :20] == 110).all()  # above and left of the frame: the reference's grey


def test_face_track_joins_interpolates_and_refuses_like_the_reference():
    from singer.evaluate.metrics import syncnet_crop

    boxes = np.tile([10.0, 10.0, 60.0, 60.0], (100, 1))
    boxes[:, [0, 2]] += np.arange(100)[:, None] * 0.5  # the face drifts right
    boxes[20:30] = np.nan  # 10 missed frames: bridged, interpolated
    track = syncnet_crop.face_track(boxes, min_track=25)
    assert (track.start, track.end, track.n_detected) == (0, 99, 90)
    assert np.allclose(track.boxes[25], [10 + 12.5, 10, 60 + 12.5, 60])
    gap = boxes.copy()
    gap[40:70] = np.nan  # 30 missed frames: more than the 25 the reference bridges
    track = syncnet_crop.face_track(gap, min_track=25)
    assert (track.start, track.end) == (0, 39)  # two tracks, 0-39 (with its bridged gap) and 70-99: the longer
    jump = boxes.copy()
    jump[50:, [0, 2]] += 100  # another face, no overlap: a new track
    assert syncnet_crop.face_track(jump, min_track=25).end == 49
    assert syncnet_crop.face_track(boxes[:25], min_track=25) is None  # 25 detections is not more than 25
    assert syncnet_crop.face_track(boxes, min_face_size=100) is None  # 50-px faces, the reference's 100-px floor
    assert list(syncnet_crop.to_25_fps(6, 30)) == [0, 1, 2, 4, 5]  # 6 frames at 30 fps -> 5 at 25, nearest


def test_lse_finds_the_face_track_itself():
    """Without boxes, dlib's detector makes the track (a face drifting through 30 frames at 25 fps)."""
    import cv2
    from skimage import data

    from singer.evaluate.metrics import syncnet_crop

    face = cv2.resize(data.astronaut()[20:260, 110:350], (128, 128))  # the astronaut's head, 128 px
    frames = np.stack([np.roll(face, i // 3, axis=1) for i in range(30)])
    boxes = syncnet_crop.detect_boxes(frames)
    assert np.isfinite(boxes).all(), "dlib missed the face"
    assert boxes[29, 0] - boxes[0, 0] == pytest.approx(9, abs=3)  # it follows the 9-px drift
    torch.manual_seed(0)
    out = lse(frames, np.random.default_rng(8).normal(scale=0.1, size=30 * 640), 16000, 25, model=SyncNet().eval())
    assert out["LSE-D"].status == "ok", out["LSE-D"].reason
    details = out["LSE-D"].details
    assert (details["track_start"], details["track_end"], details["boxes"]) == (0, 29, "dlib HOG")
    assert details["n_windows"] == 30 - 5 and details["min_track"] == syncnet_crop.MIN_TRACK


def test_evaluation_fvd_records_its_conventions():
    """The set-level FVD of `singer evaluate`: one clip per video by default, the eps of the loaded I3D."""
    from singer.config import load_config
    from singer.evaluate.runner import set_metrics

    cfg = load_config()
    assert cfg.evaluate.fvd_clips_per_video == 1 and cfg.evaluate.i3d_bn_eps is None
    rng = np.random.default_rng(9)
    rows = [{"i3d_real": rng.normal(size=(1, 400)), "i3d_fake": rng.normal(size=(1, 400)) + 0.5,
             "fvd_reason": None, "fvd_bn_eps": 1e-5} for _ in range(5)]
    result = set_metrics(cfg, rows)["fvd"]
    assert result.status == "ok" and result.value > 0
    assert {k: result.details[k] for k in ("bn_eps", "clips_per_video", "n_videos", "n_clips_real")} == {
        "bn_eps": 1e-5, "clips_per_video": 1, "n_videos": 5, "n_clips_real": 5}
    assert result.details["covariance_rank_real"] == 4 and result.details["sqrt"] == "symmetric eigendecomposition"
