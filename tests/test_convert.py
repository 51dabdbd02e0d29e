"""Checkpoint conversion (singer/models/convert.py) against the key/shape manifests of the released Hallo and SINGER
files (tests/data/checkpoints, a copy of shared/reference/checkpoints; see its README), and end to end on small
random checkpoints with the manifests' names and shrunk shapes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from factories import CHECKPOINT_MANIFESTS

from singer.config import load_config
from singer.models import convert
from singer.models.audio import AudioProjection
from singer.models.convert import (
    NOT_TRANSFERABLE,
    TARGET_PREFIX,
    convert_files,
    convert_state_dict,
    load_checkpoint,
    load_state_into,
    map_key,
    skip_reason,
    split_component,
)
from singer.models.face import FaceEncoder
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


def projections(model_cfg, shrink: int = 1):
    """Our FaceEncoder (Hallo's ImageProjModel) and AudioProjection (Hallo's AudioProjModel) at the config's
    sizes, every width divided by `shrink`."""
    image = FaceEncoder(embed_dim=model_cfg.face_embed_dim // shrink, tokens=model_cfg.face_tokens,
                        cross_attention_dim=model_cfg.cross_attention_dim // shrink)
    audio = AudioProjection(2 * model_cfg.audio_window + 1, model_cfg.audio_layers,
                            model_cfg.audio_hidden_size // shrink, model_cfg.audio_proj_dim // shrink,
                            model_cfg.audio_tokens, model_cfg.cross_attention_dim // shrink)
    return image, audio


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
        w2v = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec2-base's config, transformers' names
        image_proj, audio_proj = projections(cfg)
    targets = {
        "denoising_unet": den.state_dict(),
        "reference_unet": ref.state_dict(),
        "face_locator": loc.state_dict(),
        "vae": vae.state_dict(),
    }
    # the face encoder and the audio encoder's parts, placed where TARGET_PREFIX says
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
    # the projections: every key of our face encoder and audio projection is covered
    image, audio = projections(load_config(preset="paper").model)
    for prefix, module in ((TARGET_PREFIX["imageproj"], image), (TARGET_PREFIX["audioproj"], audio)):
        assert {prefix + k for k in module.state_dict()} <= set(mapped)


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
# end to end on small random tensors named and shaped as the manifests say
#
# The fake checkpoints take their key names from the manifests (the released files' names, not ours) and their
# shapes from the manifests with every width divided by SHRINK (`shrunk`), so they are small. The modules they
# are loaded into are ours at the paper preset's structure with the same widths divided by SHRINK (`narrow`):
# loading strictly shows that the names and the shapes match.

SHRINK = 32  # 320 -> 10, 768 -> 24, 1280 -> 40, ...


def shrunk(shape: list[int]) -> list[int]:
    """A manifest shape with the widths divided by SHRINK: every dimension >= 320 (the SD-1.5 and wav2vec2
    widths and their multiples; kernel sizes, latent channels, the face locator's 16..128 and the 32-frame `pe`
    tables are smaller) is divided."""
    return [d // SHRINK if d >= 320 and d % SHRINK == 0 else d for d in shape]


def fake_checkpoint(name: str, dtype=torch.float32, seed: int = 0, fill: float | None = None) -> dict:
    """The manifest's keys with random (or `fill`) tensors of the shrunk shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in manifest(name).items():
        size = shrunk(shape)
        out[key] = (torch.full(size, fill) if fill is not None else torch.randn(size, generator=g)).to(dtype)
    return out


@pytest.fixture(scope="module")
def narrow():
    """Our paper-preset components with every width divided by SHRINK: {component: module}."""
    paper = load_config(preset="paper").model
    cfg = paper.model_copy(update={
        "block_out_channels": [c // SHRINK for c in paper.block_out_channels],
        "cross_attention_dim": paper.cross_attention_dim // SHRINK,
        "attention_head_dim": 2, "motion_num_heads": 2, "norm_num_groups": 10,  # head counts and groups fit
    })
    image, audio = projections(paper, shrink=SHRINK)
    return {
        "denoising_unet": DenoisingUNet3D.from_model_config(cfg),
        "reference_unet": ReferenceUNet2D.from_model_config(cfg),
        "face_locator": FaceLocator.from_model_config(cfg),
        "face_encoder": image,
        "audio_encoder.projection": audio,  # the audio encoder's projection (its wav2vec2 is transformers')
    }


def _by_module(mapped: dict, modules: dict) -> dict[str, dict]:
    """Converted {target: tensor} grouped by the module it belongs to (keys inside that module)."""
    out = {name: {} for name in modules}
    for target, tensor in mapped.items():
        owner = next(name for name in modules if target.startswith(name + "."))
        out[owner][target[len(owner) + 1:]] = tensor
    return out


def _load_strictly(modules: dict, states: dict) -> None:
    """Load every state strictly (shapes included); the denoising UNet may lack only SFM (ours, not Hallo's)."""
    for name, module in modules.items():
        report = load_state_into(module, states[name])
        assert not report["unexpected"] and not report["mismatched"], (name, report)
        missing = report["missing"]
        if name == "denoising_unet":
            assert missing and all(k.startswith("sfm.") for k in missing), missing
        else:
            assert not missing, (name, missing)


def _loaded(modules: dict) -> dict[str, torch.Tensor]:
    """Every module's state under our target keys (``<module name>.<key>``)."""
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


def test_hallo_net_round_trip(narrow):
    """Hallo's net.pth keys (and shapes) land in our modules; every value arrives unchanged where it should."""
    fake = fake_checkpoint("hallo_net.pth.json")
    mapped, skipped = convert_state_dict("hallo_net", fake)
    assert not skipped and len(mapped) == len(fake)
    modules = {name: copy.deepcopy(module) for name, module in narrow.items()}
    _load_strictly(modules, _by_module(mapped, modules))
    loaded = _loaded(modules)
    for key, tensor in fake.items():
        target = map_key("hallo_net", key)
        assert torch.equal(mapped[target], tensor) and torch.equal(loaded[target], tensor), key


def test_fp16_is_cast():
    fake = fake_checkpoint("hallo_net.pth.json", dtype=torch.float16)
    mapped, _ = convert_state_dict("hallo_net", fake)
    kept, _ = convert_state_dict("hallo_net", fake, dtype=None)
    assert mapped.keys() == kept.keys() and len(mapped) == len(fake)
    for key, tensor in fake.items():
        target = map_key("hallo_net", key)
        assert mapped[target].dtype == torch.float32 and torch.equal(mapped[target], tensor.float()), key
        assert kept[target].dtype == torch.float16 and torch.equal(kept[target], tensor), key


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


def test_convert_files_end_to_end(tmp_path, narrow):
    """A fake pretrained_models/ in Hallo's layout (the manifests' names, shrunk shapes, Hallo's dtypes) ->
    per-component safetensors that load strictly into our modules; net.pth wins over SD-1.5 and the motion
    module, and without it SD-1.5 + the motion module leave only the audio modules and SFM uninitialised."""
    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    root = tmp_path / "pretrained_models"
    sd15 = fake_checkpoint("sd15_unet_diffusion_pytorch_model.json", fill=0.5)
    (root / "stable-diffusion-v1-5" / "unet").mkdir(parents=True)
    save_file(sd15, str(root / "stable-diffusion-v1-5" / "unet" / "diffusion_pytorch_model.safetensors"))
    mm = fake_checkpoint("motion_module_mm_sd_v15_v2.ckpt.json", fill=0.25)  # a plain dict, no prefix
    (root / "motion_module").mkdir()
    torch.save(mm, root / "motion_module" / "mm_sd_v15_v2.ckpt")
    net = fake_checkpoint("hallo_net.pth.json", dtype=torch.float16, seed=1)  # fp16 like the released file
    (root / "hallo").mkdir()
    torch.save(net, root / "hallo" / "net.pth")
    # wav2vec2: a small CTC checkpoint with transformers' names, stored under the file's old weight-norm names
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
    # the same naming as the manifest of the released file (the small file has fewer layers)
    layer0 = {k.replace(".layers.0.", ".layers.#.").replace(".conv_layers.1.", ".conv_layers.#.")
              for k in manifest("wav2vec2_base_960h.json")}
    assert {k.replace(".layers.0.", ".layers.#.").replace(".conv_layers.1.", ".conv_layers.#.")
            for k in w2v_sd} <= layer0
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
    n_den = sum(k.startswith("denoising_unet.") for k in net)
    assert report["components"]["denoising_unet"]["from_sources"] == {"hallo_net": n_den} == {"hallo_net": 1946}
    assert report["components"]["reference_unet"]["from_sources"] == {"hallo_net": 682}
    # net.pth overrode every SD-1.5 key (in both UNets) and every motion-module key
    assert report["sources"]["hallo_net"]["overrode"] == len(sd15) + (len(sd15) - 4) + len(mm)
    assert not report["sources"]["sd_vae"]["found"]

    files = {name: load_file(str(out / f"{name.split('.')[0]}.safetensors")) for name in narrow}
    states = {name: ({k[len("projection."):]: v for k, v in files[name].items() if k.startswith("projection.")}
                     if name == "audio_encoder.projection" else files[name]) for name in narrow}
    modules = {name: copy.deepcopy(module) for name, module in narrow.items()}
    _load_strictly(modules, states)
    loaded = _loaded(modules)
    for key, tensor in net.items():  # net.pth won everywhere (fp16 -> fp32)
        assert torch.equal(loaded[map_key("hallo_net", key)], tensor.float()), key

    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model(w2v_cfg).eval()
    ctc.eval()
    audio = files["audio_encoder.projection"]  # the whole audio_encoder file
    inner = split_component(TARGET_PREFIX["wav2vec2"])[1]
    w2v_state = {k[len(inner):]: v for k, v in audio.items() if k.startswith(inner)}
    missing, unexpected = model.load_state_dict(w2v_state, strict=False)
    assert not unexpected and missing == ["masked_spec_embed"]
    x = torch.randn(1, 400)
    with torch.no_grad():
        assert torch.allclose(model(x).last_hidden_state, ctc.wav2vec2(x).last_hidden_state, atol=1e-5)

    # without net.pth: SD-1.5 and the motion module initialise all but the audio modules and SFM (Hallo's stage 2)
    (root / "hallo" / "net.pth").unlink()
    report = convert_files(root, tmp_path / "stage2")
    assert report["components"]["denoising_unet"]["from_sources"] == {"sd15_unet": len(sd15),
                                                                      "motion_module": len(mm)}
    den = copy.deepcopy(narrow["denoising_unet"])
    result = load_state_into(den, load_file(str(tmp_path / "stage2" / "denoising_unet.safetensors")))
    assert not result["unexpected"] and not result["mismatched"]
    assert result["missing"] and all(".audio_modules." in k or k.startswith("sfm.") for k in result["missing"])
    assert {k for k in den.state_dict() if ".audio_modules." in k} <= set(result["missing"])
    state = den.state_dict()
    assert all(torch.equal(state[k], torch.full_like(state[k], 0.5)) for k in sd15)
    assert all(torch.equal(state[k], torch.full_like(state[k], 0.25)) for k in mm)


def test_sources_table_is_consistent():
    assert set(convert.SOURCES) >= {"hallo_net", "singer_net", "motion_module", "sd15_unet", "sd15_reference_unet",
                                    "sd_vae", "wav2vec2", "stage1_reference_unet"}
    for prefix in TARGET_PREFIX.values():
        assert prefix.endswith(".")


def test_load_state_into(narrow):
    den = narrow["denoising_unet"]
    config = {k: v for k, v in den.config.items() if not k.startswith("_")}
    short = DenoisingUNet3D(**{**config, "motion_max_len": 12})
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
