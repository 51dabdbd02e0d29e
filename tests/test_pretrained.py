"""Released weights into the model (singer/models/pretrained.py): a fabricated folder in Hallo's key layout at the
tiny preset's widths (our state dict renamed through the inverse of the convert mapping, fresh random values),
loaded through `model.pretrained`: every tensor equals the file's, MSM/SFM are fresh, and a missing, extra or
wrongly shaped tensor is an error that names it. MSM and SFM are identities at init, so Hallo's weights plus
fresh MSM/SFM denoise exactly as the same weights without them."""

from __future__ import annotations

import pytest
import torch
from factories import fabricate_module, tiny_batch

from singer.config import load_config
from singer.models.convert import convert_files, map_key
from singer.models.pretrained import (
    NEW_BY_DESIGN,
    PretrainedMismatchError,
    folder_kind,
    load_pretrained,
    released_state_dicts,
)
from singer.models.singer import SingerModel

fab = fabricate_module()
RES = 64


def tiny_cfg(**update):
    return load_config(preset="tiny").model.model_copy(update=update)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A fabricated pretrained_models/ folder for the tiny preset (seed-1 shapes, tame random values)."""
    folder = tmp_path_factory.mktemp("pretrained_models")
    fab.fabricate_from_model(folder, SingerModel.build(tiny_cfg(), RES, seed=1), seed=7)
    return folder


def ours(source: str, key: str) -> str:
    return map_key(source, key)


def test_every_tensor_equals_the_files_and_msm_sfm_are_fresh(release):
    model = SingerModel.build(tiny_cfg(pretrained=str(release)), RES, seed=2)
    report = model.pretrained_report
    state = model.state_dict()
    files = fab.released_tensors(release)
    net, w2v = files["hallo/net.pth"], files["wav2vec/wav2vec2-base-960h"]
    checked = set()
    for source, tensors in (("hallo_net", net), ("wav2vec2", w2v)):
        for key, tensor in tensors.items():
            name = ours(source, key)
            if name is None:
                continue
            assert torch.equal(state[name], tensor.to(state[name].dtype)), name
            checked.add(name)
    fresh = SingerModel.build(tiny_cfg(), RES, seed=2).state_dict()  # the same seed, nothing loaded
    new = {k for k in state if k.startswith(("msm.", "denoising_unet.sfm."))}
    assert new and set(report.new) == new
    for name in new:
        assert torch.equal(state[name], fresh[name]), name
    assert checked == set(report.loaded) and checked | new == set(state)  # every tensor accounted for
    assert report.missing == [] and set(report.skipped) == {"wav2vec2:lm_head.weight", "wav2vec2:lm_head.bias"}
    # the motion-module file is overridden by net.pth key by key, so nothing of it is read
    assert set(report.per_file) == {"hallo/net.pth", "wav2vec/wav2vec2-base-960h/model.safetensors"}
    assert report.summary().startswith(f"{len(checked)} loaded, 10 new by design (msm 5, sfm 5), 0 missing")
    fingerprint = report.fingerprint()
    assert set(fingerprint["files"]) == set(report.per_file) and len(fingerprint["sha256"]) == 64


def test_converted_folder_loads_the_same_tensors(release, tmp_path):
    convert_files(release, tmp_path / "converted", dtype=None)
    assert folder_kind(tmp_path / "converted") == "converted"
    a = SingerModel.build(tiny_cfg(pretrained=str(release)), RES, seed=2)
    b = SingerModel.build(tiny_cfg(pretrained=str(tmp_path / "converted")), RES, seed=3)
    assert b.pretrained_report.kind == "converted" and sorted(b.pretrained_report.loaded) == sorted(
        a.pretrained_report.loaded)
    sa, sb = a.state_dict(), b.state_dict()
    for name in a.pretrained_report.loaded:
        assert torch.equal(sa[name], sb[name]), name


def test_a_save_pretrained_folder_carries_msm_and_sfm(release, tmp_path):
    from singer.pipeline import SingerPipeline

    model = SingerModel.build(tiny_cfg(pretrained=str(release)), RES, seed=2)
    with torch.no_grad():
        model.msm.w.add_(0.5)  # a "trained" MSM
    SingerPipeline.from_model(model, RES).save_pretrained(tmp_path / "saved")
    again = SingerModel.build(tiny_cfg(pretrained=str(tmp_path / "saved")), RES, seed=5)
    assert again.pretrained_report.kind == "pipeline" and again.pretrained_report.new == {}
    assert torch.equal(again.msm.w, model.msm.w)


def _rewrite_net(release, tmp_path, edit):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(release, folder)
    net = torch.load(folder / "hallo/net.pth", weights_only=True)
    edit(net)
    torch.save(net, folder / "hallo/net.pth")
    return folder


@pytest.mark.parametrize("what", ["missing", "unexpected", "shape"])
def test_a_tensor_that_does_not_fit_is_named(release, tmp_path, what):
    key = "denoising_unet.conv_in.weight"

    def edit(net):
        if what == "missing":
            del net[key]
        elif what == "unexpected":
            net["denoising_unet.extra_head.weight"] = torch.zeros(3)
        else:
            net[key] = torch.zeros(2, 2)

    folder = _rewrite_net(release, tmp_path, edit)
    model = SingerModel.build(tiny_cfg(), RES, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(model, folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    if what == "missing":
        assert f"1 missing ({key})" in message and err.value.missing == [key]
    elif what == "unexpected":
        assert "1 unexpected (hallo/net.pth:denoising_unet.extra_head.weight" in message
    else:
        assert f"1 shape-mismatched ({key}: [2, 2] in hallo/net.pth" in message
    # nothing was loaded: the check comes before any copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(PretrainedMismatchError):  # through the config, as `singer train` would
        SingerModel.build(tiny_cfg(pretrained=str(folder)), RES, seed=2)


def test_a_model_of_other_sizes_is_refused_with_the_names(release):
    with pytest.raises(PretrainedMismatchError) as err:
        SingerModel.build(tiny_cfg(pretrained=str(release), cross_attention_dim=32), RES)
    assert "shape-mismatched" in str(err.value) and "face_encoder.proj.weight" in str(err.value) + "".join(
        err.value.mismatched)


def test_folders_without_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_kind(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        folder_kind(tmp_path)


def test_pretrained_plus_fresh_msm_sfm_denoises_exactly_as_without_them(release):
    """DESIGN 3: a pretrained Hallo model plus fresh MSM/SFM gives Hallo's output until training moves them."""
    full = SingerModel.build(tiny_cfg(pretrained=str(release)), RES, seed=2).eval()
    plain = SingerModel.build(tiny_cfg(pretrained=str(release), msm=False, sfm=False), RES, seed=3).eval()
    assert full.msm is not None and plain.msm is None
    assert not any(k.startswith("denoising_unet.sfm.") for k in plain.state_dict())
    batch = tiny_batch(batch=2, frames=8, size=RES, seed=0)
    batch.setdefault("face_region", (batch["masks"][:, 1:2] > 0).float())  # the hard face box
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond_full, cond_plain = full.conditions(batch), plain.conditions(batch)
        z = torch.randn(2, 48, 8, 16, 16, generator=g)
        t = torch.tensor([999, 400])
        a, b = full.denoise(z, t, cond_full), plain.denoise(z, t, cond_plain)
    assert a.abs().mean() > 1e-3  # a real output, not zeros
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_released_layout_is_the_inverse_of_the_convert_mapping():
    state = SingerModel.build(tiny_cfg(), RES, seed=1).state_dict()
    released = released_state_dicts(state)
    for source, tensors in released.items():
        for key in tensors:
            assert map_key(source, key) in state, (source, key)
    mapped = {map_key(s, k) for s, t in released.items() for k in t}
    left = {k for k in state if k not in mapped}
    assert left and all(any(k.startswith(p) for p in NEW_BY_DESIGN) for k in left)
