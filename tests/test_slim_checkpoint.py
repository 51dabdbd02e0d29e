"""Slim checkpoints (singer.train.checkpoint keep_only / manifest, singer.train.loop.checkpoint_manifest): with
released weights a checkpoint holds the trainable tensors (+ optimizer, scheduler, RNG) only, cites the release
by sha256, and a resume on other weights or other trainables fails naming what differs (MLflow's checkpoint
retention is tested in test_tracking.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import fabricate_module
from safetensors import safe_open

from singer.config import load_config
from singer.models.singer import SingerModel
from singer.train import checkpoint as ckpt
from singer.train.loop import checkpoint_manifest, enable_gradient_checkpointing

fab = fabricate_module()
RES = 64


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained_models")
    cfg = load_config(preset="tiny").model
    fab.fabricate_from_model(folder, SingerModel.build(cfg, RES, seed=1), seed=3)
    return folder


def _prepared(cfg_model, trainable, seed=0):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = SingerModel.build(cfg_model, RES, seed=seed)
    names = model.set_trainable(trainable)
    manifest = checkpoint_manifest(model, names)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(manifest["saved"], list):
        ckpt.keep_only(accelerator, manifest["saved"])
    return accelerator, model, optimizer, names, manifest


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())  # noqa: SIM118


def test_slim_checkpoint_holds_the_trainables_and_resumes_on_the_release(release, tmp_path):
    cfg = load_config(preset="tiny").model.model_copy(update={"pretrained": str(release)})
    trainable = ["audio_encoder", "audio_projection", "msm", "sfm"]
    accelerator, model, optimizer, names, manifest = _prepared(cfg, trainable)
    with torch.no_grad():  # "training": move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    folder = ckpt.save_checkpoint(accelerator, tmp_path, 1, manifest=manifest)
    saved = _keys(folder)
    trainable_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in set(names))
    # trainables only (every MSM/SFM tensor trains here, so nothing else is fresh)
    assert saved == set(names) and manifest["saved"] == sorted(names)
    assert manifest["saved_bytes"] == trainable_bytes
    size = (folder / "model.safetensors").stat().st_size
    assert trainable_bytes <= size < trainable_bytes + 200_000  # + the safetensors header
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < full / 2
    written = json.loads((folder / ckpt.MANIFEST).read_text())
    assert written["pretrained"]["sha256"] == manifest["pretrained"]["sha256"]
    assert set(written["pretrained"]["files"]) == {"hallo/net.pth", "wav2vec/wav2vec2-base-960h/model.safetensors"}

    # a new process: the release at build, the checkpoint on top, equal to what was saved
    accelerator2, model2, optimizer2, _, manifest2 = _prepared(cfg, trainable, seed=5)
    state = ckpt.resume(accelerator2, tmp_path, manifest=manifest2)
    assert state["step"] == 1
    a, b = model.state_dict(), model2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_resume_on_other_weights_or_trainables_is_refused(release, tmp_path):
    cfg = load_config(preset="tiny").model.model_copy(update={"pretrained": str(release)})
    accelerator, _, _, _, manifest = _prepared(cfg, ["msm", "sfm"])
    ckpt.save_checkpoint(accelerator, tmp_path / "ckpt", 1, manifest=manifest)
    # other trainables
    accelerator2, _, _, _, other = _prepared(cfg, ["msm"])
    with pytest.raises(ckpt.CheckpointMismatchError, match="other trainable tensors"):
        ckpt.resume(accelerator2, tmp_path / "ckpt", manifest=other)
    # other release files (same names, other bytes)
    changed = tmp_path / "changed"
    shutil.copytree(release, changed)
    net = torch.load(changed / "hallo/net.pth", weights_only=True)
    net["denoising_unet.conv_in.bias"] = net["denoising_unet.conv_in.bias"] + 1
    torch.save(net, changed / "hallo/net.pth")
    accelerator3, _, _, _, moved = _prepared(cfg.model_copy(update={"pretrained": str(changed)}), ["msm", "sfm"])
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt.resume(accelerator3, tmp_path / "ckpt", manifest=moved)
    message = str(err.value)
    assert "\n" not in message and str(release) in message and str(changed) in message
    assert "files that differ: hallo/net.pth" in message


def test_without_a_release_the_whole_model_is_saved_as_before(tmp_path):
    cfg = load_config(preset="tiny").model
    accelerator, model, _, names, manifest = _prepared(cfg, ["all"])
    assert manifest == {"format": 1, "pretrained": None, "trainable": sorted(names), "saved": "all"}
    folder = ckpt.save_checkpoint(accelerator, tmp_path, 1, manifest=manifest)
    assert _keys(folder) == set(model.state_dict())
    accelerator2, model2, _, _, manifest2 = _prepared(cfg, ["all"], seed=4)
    assert ckpt.resume(accelerator2, tmp_path, manifest=manifest2)["step"] == 1
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())


def test_gradient_checkpointing_is_switched_on_where_gradients_flow():
    cfg = load_config(preset="tiny").model
    model = SingerModel.build(cfg, RES)
    model.set_trainable(["audio_encoder", "msm", "sfm"])
    assert enable_gradient_checkpointing(model) == ["denoising_unet"]
    assert model.denoising_unet.is_gradient_checkpointing and not model.reference_unet.is_gradient_checkpointing
    model.set_trainable(["all"])
    assert enable_gradient_checkpointing(model) == ["denoising_unet", "reference_unet"]
    assert load_config(preset="paper").train.gradient_checkpointing is True
    assert load_config(preset="tiny").train.gradient_checkpointing is False
