"""Checkpoint conversion (singer/models/convert.py) against the key/shape manifests of the released Hallo and SINGER
files (tests/data/checkpoints, a copy of shared/reference/checkpoints; see its README), and end to end on small random state dicts."""

from __future__ import annotations

import json

import pytest
import torch
from factories import CHECKPOINT_MANIFESTS
from torch import nn

from singer.config import load_config
from singer.models import convert
from singer.models.convert import (
    NOT_TRANSFERABLE,
    TARGET_PREFIX,
    convert_files,
    convert_state_dict,
    load_checkpoint,
    map_key,
    skip_reason,
    split_component,
)
from singer.models.face_locator import FaceLocator
from singer.models.unet_denoising import DenoisingUNet3D
from singer.models.unet_reference import ReferenceUNet2D

MANIFESTS = CHECKPOINT_MANIFESTS

# Hallo's and SINGER's numbers (README of the manifests)
HALLO_DENOISING_ELEMENTS = 1_526_736_644  # 1946 keys, incl. 42 pe buffers
HALLO_REFERENCE_ELEMENTS = 859_508_800  # 682 keys
HALLO_FACE_LOCATOR_ELEMENTS = 514_896


def manifest(name: str) -> dict[str, list[int]]:
    return json.loads((MANIFESTS / name).read_text())["params"]


class ImageProj(nn.Module):
    """Stand-in with Hallo's ImageProjModel sizes (the face encoder's projection belongs to another module)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(512, 4 * 768)
        self.norm = nn.LayerNorm(768)


class AudioProj(nn.Module):
    """Stand-in with Hallo's AudioProjModel sizes."""

    def __init__(self):
        super().__init__()
        self.proj1 = nn.Linear(5 * 12 * 768, 512)
        self.proj2 = nn.Linear(512, 512)
        self.proj3 = nn.Linear(512, 32 * 768)
        self.norm = nn.LayerNorm(768)


@pytest.fixture(scope="module")
def paper_targets():
    """Every target component of the paper preset, built on the meta device: {component: state_dict}."""
    from diffusers import AutoencoderKL
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = load_config(preset="paper").model
    with torch.device("meta"):
        den = DenoisingUNet3D.from_model_config(cfg)
        ref = ReferenceUNet2D.from_model_config(cfg)
        loc = FaceLocator.from_model_config(cfg)
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            latent_channels=4,
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=256,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
        )
        w2v = Wav2Vec2Model(Wav2Vec2Config())
        image_proj, audio_proj = ImageProj(), AudioProj()
    targets = {
        "denoising_unet": den.state_dict(),
        "reference_unet": ref.state_dict(),
        "face_locator": loc.state_dict(),
        "vae": vae.state_dict(),
    }
    # the components other engineers own: our stand-ins placed where TARGET_PREFIX says
    for prefix, module in (
        (TARGET_PREFIX["imageproj"], image_proj),
        (TARGET_PREFIX["audioproj"], audio_proj),
        (TARGET_PREFIX["wav2vec2"], w2v),
    ):
        component, inner = split_component(prefix)
        targets.setdefault(component, {}).update({inner + k: v for k, v in module.state_dict().items()})
    return targets


def _check_manifest(source, params, targets):
    """Map every manifest key; return (mapped {target: shape}, skipped {key: reason}, errors)."""
    mapped, skipped, errors = {}, {}, []
    for key, shape in params.items():
        target = map_key(source, key)
        if target is None:
            skipped[key] = skip_reason(source, key)
            assert skipped[key], key
            continue
        component, inner = split_component(target)
        have = targets.get(component, {}).get(inner)
        if have is None:
            errors.append(f"{key} -> {target}: no such parameter/buffer")
        elif list(have.shape) != list(shape):
            errors.append(f"{key} -> {target}: shape {list(have.shape)} != {shape}")
        if target in mapped:
            errors.append(f"{key} -> {target}: mapped twice")
        mapped[target] = shape
    return mapped, skipped, errors


# ---------------------------------------------------------------------------------------------------------------
# the paper preset on the meta device


def test_paper_parameter_counts(paper_targets):
    def count(sd):
        return sum(t.numel() for t in sd.values())

    den, ref, loc = (paper_targets[k] for k in ("denoising_unet", "reference_unet", "face_locator"))
    sfm = sum(t.numel() for k, t in den.items() if k.startswith("sfm."))
    print(
        f"\npaper preset (state dict elements, buffers included): denoising {count(den):,} "
        f"(Hallo {HALLO_DENOISING_ELEMENTS:,} + SFM {sfm:,}), reference {count(ref):,}, face locator {count(loc):,}"
    )
    assert count(den) == HALLO_DENOISING_ELEMENTS + sfm
    assert sfm == 4 * 1280 + (1280 * 320 + 320) + (320 * 1280 + 1280)  # band weights + SE bottleneck (r = 4)
    assert len(den) == 1946 + 5
    assert count(ref) == HALLO_REFERENCE_ELEMENTS and len(ref) == 682
    assert count(loc) == HALLO_FACE_LOCATOR_ELEMENTS and len(loc) == 16


@pytest.mark.parametrize(
    "file, source, expect_skipped",
    [
        ("hallo_net.pth.json", "hallo_net", set()),
        ("singer_net.pth.json", "singer_net", set(NOT_TRANSFERABLE)),
        ("motion_module_mm_sd_v15_v2.ckpt.json", "motion_module", set()),
        ("sd15_unet_diffusion_pytorch_model.json", "sd15_unet", set()),
        (
            "sd15_unet_diffusion_pytorch_model.json",
            "sd15_reference_unet",
            {"conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias"},
        ),
        ("stage1_reference_unet.pth.json", "stage1_reference_unet", set()),
        ("stage1_denoising_unet.pth.json", "stage1_denoising_unet", set()),
        ("stage1_face_locator.pth.json", "stage1_face_locator", set()),
        ("stage1_imageproj.pth.json", "stage1_imageproj", set()),
        ("sd_vae_ft_mse.json", "sd_vae", set()),
        ("wav2vec2_base_960h.json", "wav2vec2", {"lm_head.weight", "lm_head.bias"}),
    ],
)
def test_every_manifest_key_maps(paper_targets, file, source, expect_skipped):
    params = manifest(file)
    mapped, skipped, errors = _check_manifest(source, params, paper_targets)
    assert not errors, errors[:10]
    assert set(skipped) == expect_skipped, sorted(skipped)
    assert len(mapped) + len(skipped) == len(params)


def test_hallo_net_covers_our_unets(paper_targets):
    """Hallo's net.pth initialises every parameter and buffer of our UNets and face locator, except SFM."""
    mapped, _, _ = _check_manifest("hallo_net", manifest("hallo_net.pth.json"), paper_targets)
    for component in ("denoising_unet", "reference_unet", "face_locator"):
        ours = {f"{component}.{k}" for k in paper_targets[component]}
        missing = sorted(ours - set(mapped))
        if component == "denoising_unet":
            assert missing and all(k.startswith("denoising_unet.sfm.") for k in missing), missing
        else:
            assert not missing, missing
    # the projections: every key of our stand-ins is covered
    for prefix, stand_in in ((TARGET_PREFIX["imageproj"], ImageProj), (TARGET_PREFIX["audioproj"], AudioProj)):
        assert {prefix + k for k in stand_in().state_dict()} <= set(mapped)


def test_motion_module_and_sd15_cover_the_denoising_unet(paper_targets):
    """SD-1.5 + AnimateDiff initialise everything but the audio modules and SFM (as in Hallo's stage 2)."""
    mapped = {}
    for file, source in (("sd15_unet_diffusion_pytorch_model.json", "sd15_unet"),
                         ("motion_module_mm_sd_v15_v2.ckpt.json", "motion_module")):
        mapped.update(_check_manifest(source, manifest(file), paper_targets)[0])
    left = {k for k in paper_targets["denoising_unet"] if f"denoising_unet.{k}" not in mapped}
    assert left and all(".audio_modules." in k or k.startswith("sfm.") for k in left)


def test_wav2vec2_leaves_only_masked_spec_embed(paper_targets):
    mapped, _, _ = _check_manifest("wav2vec2", manifest("wav2vec2_base_960h.json"), paper_targets)
    component, inner = split_component(TARGET_PREFIX["wav2vec2"])
    ours = {f"{component}.{k}" for k in paper_targets[component] if k.startswith(inner)}
    assert ours - set(mapped) == {TARGET_PREFIX["wav2vec2"] + "masked_spec_embed"}


def test_vae_old_attention_names():
    table = json.loads((MANIFESTS / "sd_vae_ft_mse.json").read_text())["deprecated_attention_key_names"]
    for modern, old in table["modern_to_old"].items():
        assert map_key("sd_vae", old) == "vae." + modern
        assert map_key("sd_vae", modern) == "vae." + modern
    # a very old file storing the attention projections as 1x1 convs
    mapped, _ = convert_state_dict("sd_vae", {"encoder.mid_block.attentions.0.query.weight": torch.ones(4, 4, 1, 1)})
    assert mapped["vae.encoder.mid_block.attentions.0.to_q.weight"].shape == (4, 4)


def test_not_transferable_is_singer_spectral_keys():
    diff = json.loads((MANIFESTS / "singer_net.pth.json").read_text())["diff_vs_hallo_net_pth"]["added_keys"]
    assert set(NOT_TRANSFERABLE) == set(diff)
    for key in diff:
        assert map_key("singer_net", key) is None
        assert skip_reason("singer_net", key).startswith("not transferable")
        assert map_key("hallo_net", key) is None or key.startswith("denoising_unet.")
    # either batch size of SINGER's buffer is skipped the same way
    _, skipped = convert_state_dict("singer_net", {"audioembed.dct_layer.weight": torch.zeros(6, 4, 14, 2, 2)})
    assert set(skipped) == {"audioembed.dct_layer.weight"}


def test_unknown_keys_and_sources():
    assert map_key("hallo_net", "something_else.weight") is None
    assert "unknown prefix" in skip_reason("hallo_net", "something_else.weight")
    assert map_key("motion_module", "down_blocks.0.resnets.0.conv1.weight") is None
    with pytest.raises(ValueError, match="unknown source"):
        map_key("nope", "x")


# ---------------------------------------------------------------------------------------------------------------
# end to end on small random tensors


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(preset="tiny").model
    torch.manual_seed(0)
    den = DenoisingUNet3D.from_model_config(cfg)
    ref = ReferenceUNet2D.from_model_config(cfg)
    loc = FaceLocator.from_model_config(cfg)
    with torch.no_grad():  # give the zero-initialised tensors values, so the round trip is not trivially zeros
        for module in (den, ref, loc):
            for p in module.parameters():
                if torch.count_nonzero(p) == 0:
                    p.normal_()
    return cfg, den, ref, loc


def _fresh(tiny):
    cfg = tiny[0]
    return (DenoisingUNet3D.from_model_config(cfg), ReferenceUNet2D.from_model_config(cfg),
            FaceLocator.from_model_config(cfg))


def _hallo_net(den, ref, loc, dtype=torch.float16):
    """A Hallo-layout net.pth state dict of our tiny modules (Hallo's prefixes; fp16 like the released file)."""
    sd = {}
    for prefix, module in (("reference_unet.", ref), ("denoising_unet.", den), ("face_locator.", loc)):
        sd.update({prefix + k: v.detach().clone().to(dtype) for k, v in module.state_dict().items()
                   if not k.startswith("sfm.")})
    sd["imageproj.proj.weight"] = torch.randn(12, 8).to(dtype)
    return sd


def test_convert_state_dict_round_trip(tiny):
    _, den, ref, loc = tiny
    mapped, skipped = convert_state_dict("hallo_net", _hallo_net(den, ref, loc, torch.float32))
    assert not skipped
    den2, ref2, loc2 = _fresh(tiny)
    for component, module, original in (("denoising_unet", den2, den), ("reference_unet", ref2, ref),
                                        ("face_locator", loc2, loc)):
        state = {split_component(k)[1]: v for k, v in mapped.items() if split_component(k)[0] == component}
        if component == "denoising_unet":  # SFM is ours, not Hallo's: the only keys a Hallo file lacks
            missing, unexpected = module.load_state_dict(state, strict=False)
            assert not unexpected and missing and all(k.startswith("sfm.") for k in missing)
            state.update({k: v for k, v in original.state_dict().items() if k.startswith("sfm.")})
        module.load_state_dict(state, strict=True)
        a, b = original.state_dict(), module.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert mapped["face_encoder.proj.weight"].shape == (12, 8)


def test_fp16_is_cast(tiny):
    _, den, ref, loc = tiny
    mapped, _ = convert_state_dict("hallo_net", _hallo_net(den, ref, loc))
    assert all(t.dtype == torch.float32 for t in mapped.values())
    kept, _ = convert_state_dict("hallo_net", _hallo_net(den, ref, loc), dtype=None)
    assert all(t.dtype == torch.float16 for t in kept.values())
    w = den.state_dict()["conv_in.weight"]
    assert torch.equal(mapped["denoising_unet.conv_in.weight"], w.half().float())
    assert (mapped["denoising_unet.conv_in.weight"] - w).abs().max() < 1e-2


def test_load_checkpoint_formats(tmp_path):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "x.ckpt")
    (tmp_path / "folder").mkdir()
    save_file(sd, str(tmp_path / "folder" / "model.safetensors"))
    for path in (tmp_path / "x.safetensors", tmp_path / "x.ckpt", tmp_path / "folder"):
        loaded = load_checkpoint(path)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")


def test_convert_files_end_to_end(tmp_path, tiny):
    """A fake pretrained_models/ in Hallo's layout (tiny sizes, Hallo's names and dtypes) -> per-component
    safetensors that load into fresh modules; precedence SD-1.5 < motion module < net.pth."""
    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    _, den, ref, loc = tiny
    root = tmp_path / "pretrained_models"
    # SD-1.5 unet: the reference UNet's keys + an output head (a 2D UNet's names), different values
    sd15 = {k: torch.full_like(v, 0.5) for k, v in ref.state_dict().items()}
    sd15.update({k: torch.full_like(v, 0.5) for k, v in den.state_dict().items() if k.startswith("conv_")})
    (root / "stable-diffusion-v1-5" / "unet").mkdir(parents=True)
    save_file(sd15, str(root / "stable-diffusion-v1-5" / "unet" / "diffusion_pytorch_model.safetensors"))
    # motion module: a plain dict of the motion-module keys
    mm = {k: torch.full_like(v, 0.25) for k, v in den.state_dict().items() if ".motion_modules." in k}
    (root / "motion_module").mkdir()
    torch.save(mm, root / "motion_module" / "mm_sd_v15_v2.ckpt")
    # Hallo net.pth (fp16), overriding both
    (root / "hallo").mkdir()
    torch.save(_hallo_net(den, ref, loc), root / "hallo" / "net.pth")
    # wav2vec2 (a CTC checkpoint with old weight-norm names, like the released one)
    w2v_cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                              num_conv_pos_embedding_groups=2, vocab_size=6)
    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(w2v_cfg)
    w2v_sd = {}
    for k, v in ctc.state_dict().items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v")
        if k != "wav2vec2.masked_spec_embed":
            w2v_sd[k] = v
    (root / "wav2vec" / "wav2vec2-base-960h").mkdir(parents=True)
    save_file(w2v_sd, str(root / "wav2vec" / "wav2vec2-base-960h" / "model.safetensors"))

    out = tmp_path / "converted"
    report = convert_files(root, out)
    saved = json.loads((out / "convert_report.json").read_text())
    assert saved["components"].keys() == report["components"].keys()
    assert {s for s, v in report["sources"].items() if v["found"]} == {
        "sd15_unet", "sd15_reference_unet", "motion_module", "hallo_net", "wav2vec2"}
    assert set(report["sources"]["sd15_reference_unet"]["skipped"]) == {
        "conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias"}
    hallo_keys = len([k for k in den.state_dict() if not k.startswith("sfm.")])
    assert report["components"]["denoising_unet"]["from_sources"] == {"hallo_net": hallo_keys}  # net.pth won
    assert report["sources"]["hallo_net"]["overrode"] > 0
    assert not report["sources"]["sd_vae"]["found"]

    den2, ref2, loc2 = _fresh(tiny)
    state = load_file(str(out / "denoising_unet.safetensors"))
    missing, unexpected = den2.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("sfm.") for k in missing)
    ref2.load_state_dict(load_file(str(out / "reference_unet.safetensors")), strict=True)
    loc2.load_state_dict(load_file(str(out / "face_locator.safetensors")), strict=True)
    for a, b in ((den, den2), (ref, ref2), (loc, loc2)):
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            if not k.startswith("sfm."):
                assert torch.equal(sb[k], sa[k].half().float()), k  # net.pth won (fp16 -> fp32)

    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model(w2v_cfg).eval()
    ctc.eval()
    audio = load_file(str(out / "audio_encoder.safetensors"))
    inner = split_component(TARGET_PREFIX["wav2vec2"])[1]
    w2v_state = {k[len(inner):]: v for k, v in audio.items() if k.startswith(inner)}
    missing, unexpected = model.load_state_dict(w2v_state, strict=False)
    assert not unexpected and missing == ["masked_spec_embed"]
    x = torch.randn(1, 400)
    with torch.no_grad():
        assert torch.allclose(model(x).last_hidden_state, ctc.wav2vec2(x).last_hidden_state, atol=1e-5)


def test_sources_table_is_consistent():
    assert set(convert.SOURCES) >= {"hallo_net", "singer_net", "motion_module", "sd15_unet", "sd15_reference_unet",
                                    "sd_vae", "wav2vec2", "stage1_reference_unet"}
    for prefix in TARGET_PREFIX.values():
        assert prefix.endswith(".")


def test_load_state_into(tiny):
    from singer.models.convert import load_state_into

    cfg, den, _, _ = tiny
    short = DenoisingUNet3D.from_model_config(cfg, motion_max_len=12)
    state = dict(den.state_dict())
    state["not_ours.weight"] = torch.zeros(1)
    state["conv_in.bias"] = torch.zeros(3)
    report = load_state_into(short, state)
    assert report["unexpected"] == ["not_ours.weight"]
    assert [m.split(":")[0] for m in report["mismatched"]] == ["conv_in.bias"]
    assert report["missing"] == ["conv_in.bias"]
    pe = next(k for k in state if k.endswith("pos_encoder.pe"))
    assert short.state_dict()[pe].shape[1] == 12 and torch.equal(short.state_dict()[pe], state[pe][:, :12])
    with pytest.raises(RuntimeError, match="mismatched"):
        load_state_into(short, state, strict=True)
