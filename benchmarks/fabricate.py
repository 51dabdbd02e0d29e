"""Fabricated release folders: Hallo's ``pretrained_models/`` layout with random values, for the rehearsals.

    fabricate_released(out, CHECKPOINT_MANIFESTS)   # the released names and FULL shapes (tests/data/checkpoints)
    fabricate_from_model(out, model)                # the released names at a small model's shapes (the inverse
                                                    # of the convert mapping applied to its state dict)

Both write what the paper preset reads from ``pretrained_models/``: ``hallo/net.pth`` (fp16, as released),
``motion_module/mm_sd_v15_v2.ckpt``, ``sd-vae-ft-mse/`` (config.json + safetensors), ``wav2vec/wav2vec2-base-960h/``
(a ``Wav2Vec2ForCTC`` file: ``wav2vec2.`` prefix, ``weight_g``/``weight_v``, CTC head) and
``face_analysis/models/glintr100.onnx`` (a tiny ArcFace-shaped ONNX graph: 112^2 RGB -> ``face_dim``). Values are
random but tame (unit-gain layers, unit norm scales, zero-mean small biases, sinusoidal motion-module position
tables), so a forward pass of the full-size UNets stays finite. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "data" / "checkpoints"
SD_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512}


def tame_tensor(key: str, shape: list[int] | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor for a weight named ``key``: sinusoids for ``pos_encoder.pe``, ones for norm scales and
    weight-norm magnitudes, small biases, and weights of gain 0.5 over their fan-in."""
    shape = tuple(int(s) for s in shape)
    if key.endswith("pos_encoder.pe"):
        _, length, dim = shape
        position = torch.arange(length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, length, dim)
        pe[0, :, 0::2] = torch.sin(position * div)
        pe[0, :, 1::2] = torch.cos(position * div)
        return pe
    if key.endswith("weight_g") or (len(shape) == 1 and key.endswith("weight")):
        return torch.ones(shape)
    if len(shape) <= 1:
        return torch.randn(shape, generator=generator) * 0.01
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=generator) * (0.5 / math.sqrt(fan_in))


def _save_torch(state: dict, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def _save_safetensors(state: dict, path: Path) -> int:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path.stat().st_size


def tiny_arcface(path: Path, dim: int = 512, seed: int = 0) -> int:
    """Conv1x1(3->8) -> GlobalAveragePool -> Flatten -> MatMul(8 x dim): 1x3x112x112 -> 1 x dim (float32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 1, 1)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(size=(8, dim)).astype(np.float32), "mat")]
    nodes = [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], name="Conv_0"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="GAP_1"),
             helper.make_node("Flatten", ["g"], ["f"], name="Flatten_2"),
             helper.make_node("MatMul", ["f", "mat"], ["embedding"], name="MatMul_3")]
    graph = helper.make_graph(nodes, "fabricated_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, dim])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path.stat().st_size


def _from_manifest(name: str, manifests: Path, dtype: torch.dtype, generator: torch.Generator,
                   skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    params = json.loads((manifests / name).read_text())["params"]
    return {k: tame_tensor(k, shape, generator).to(dtype) for k, shape in params.items()
            if not any(k.startswith(s) for s in skip)}


def _wav2vec2_config(folder: Path, **sizes) -> None:
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config(**sizes)
    config.architectures = ["Wav2Vec2ForCTC"]
    config.save_pretrained(folder)


def fabricate_released(out: Path, manifests: Path = MANIFESTS, seed: int = 0, net_dtype: torch.dtype = torch.float16,
                       motion_dtype: torch.dtype = torch.float16, face_dim: int = 512) -> dict[str, int]:
    """Hallo's released files at their full shapes (names and shapes from the manifests), random values.
    One file is in memory at a time (net.pth in fp16: about 4.9 GB). Returns {relative path: bytes}."""
    from diffusers import AutoencoderKL

    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    sizes = {}
    sizes["hallo/net.pth"] = _save_torch(_from_manifest("hallo_net.pth.json", manifests, net_dtype, g),
                                         out / "hallo/net.pth")
    sizes["motion_module/mm_sd_v15_v2.ckpt"] = _save_torch(
        _from_manifest("motion_module_mm_sd_v15_v2.ckpt.json", manifests, motion_dtype, g),
        out / "motion_module/mm_sd_v15_v2.ckpt")
    vae = out / "sd-vae-ft-mse"
    with torch.device("meta"):
        AutoencoderKL(**SD_VAE_CONFIG).save_config(vae)
    sizes["sd-vae-ft-mse/diffusion_pytorch_model.safetensors"] = _save_safetensors(
        _from_manifest("sd_vae_ft_mse.json", manifests, torch.float32, g), vae / "diffusion_pytorch_model.safetensors")
    w2v = out / "wav2vec/wav2vec2-base-960h"
    _wav2vec2_config(w2v)  # transformers' defaults are wav2vec2-base's sizes
    sizes["wav2vec/wav2vec2-base-960h/model.safetensors"] = _save_safetensors(
        _from_manifest("wav2vec2_base_960h.json", manifests, torch.float32, g), w2v / "model.safetensors")
    sizes["face_analysis/models/glintr100.onnx"] = tiny_arcface(out / "face_analysis/models/glintr100.onnx",
                                                                face_dim, seed)
    return sizes


def fabricate_from_model(out: Path, model, seed: int = 0, net_dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """The released layout at ``model``'s own shapes: its state dict renamed by
    ``singer.models.pretrained.released_state_dicts`` (the inverse of the convert mapping), values replaced by
    tame random ones (rounded to ``net_dtype`` in net.pth, as released). Returns {relative path: bytes}."""
    from singer.models.pretrained import released_state_dicts

    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    released = released_state_dicts(model.state_dict())
    fresh = {src: {k: tame_tensor(k, v.shape, g) for k, v in state.items()} for src, state in released.items()}
    sizes = {"hallo/net.pth": _save_torch({k: v.to(net_dtype) for k, v in fresh["hallo_net"].items()},
                                          out / "hallo/net.pth")}
    # the motion modules as in net.pth (which overrides them anyway), so both files agree
    motion = {k: fresh["hallo_net"]["denoising_unet." + k].to(net_dtype) for k in fresh["motion_module"]}
    sizes["motion_module/mm_sd_v15_v2.ckpt"] = _save_torch(motion, out / "motion_module/mm_sd_v15_v2.ckpt")
    if fresh["sd_vae"]:
        vae = out / "sd-vae-ft-mse"
        model.vae.save_config(vae)
        sizes["sd-vae-ft-mse/diffusion_pytorch_model.safetensors"] = _save_safetensors(
            fresh["sd_vae"], vae / "diffusion_pytorch_model.safetensors")
    w2v = out / "wav2vec/wav2vec2-base-960h"
    config = model.audio_encoder.wav2vec2.config
    _wav2vec2_config(w2v, **{k: v for k, v in config.to_dict().items()
                             if not k.startswith("_") and k not in ("architectures", "transformers_version")})
    head = {"lm_head.weight": tame_tensor("lm_head.weight", (32, config.hidden_size), g),
            "lm_head.bias": tame_tensor("lm_head.bias", (32,), g)}
    sizes["wav2vec/wav2vec2-base-960h/model.safetensors"] = _save_safetensors(
        {**fresh["wav2vec2"], **head}, w2v / "model.safetensors")
    if str(model.cfg.face_encoder).lower() == "insightface":
        sizes["face_analysis/models/glintr100.onnx"] = tiny_arcface(
            out / "face_analysis/models/glintr100.onnx", model.cfg.face_embed_dim, seed)
    return sizes


def released_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """What a fabricated folder holds, read back: {relative file: {key: tensor}} (for tests)."""
    from singer.models.weights_io import load_checkpoint

    files = ["hallo/net.pth", "motion_module/mm_sd_v15_v2.ckpt", "sd-vae-ft-mse", "wav2vec/wav2vec2-base-960h"]
    return {f: load_checkpoint(folder / f) for f in files if (folder / f).exists()}


def shrunk_paper_overrides(pretrained: str | Path = "pretrained_models", resolution: int = 64,
                           frames: int = 4) -> list[str]:
    """``-S`` overrides of the paper preset with every width shrunk (the rehearsal's test-suite size): same
    components (KL VAE, wav2vec2 from a folder, InsightFace ONNX, 4-level UNets), small numbers."""
    p = Path(pretrained)
    values = {
        "crop.resolution": resolution, "model.num_frames": frames, "model.motion_frames": 2,
        "model.block_out_channels": "[32,64,64,64]", "model.layers_per_block": 1, "model.attention_head_dim": 2,
        "model.norm_num_groups": 8, "model.cross_attention_dim": 64, "model.motion_num_heads": 2,
        "model.audio_hidden_size": 32, "model.audio_layers": 2, "model.audio_heads": 2,
        "model.audio_intermediate_size": 64, "model.audio_conv_dim": 32, "model.audio_proj_dim": 64,
        "model.face_embed_dim": 64,
        "model.autoencoder_path": p / "sd-vae-ft-mse", "model.audio_encoder_path": p / "wav2vec/wav2vec2-base-960h",
        "model.face_encoder_path": p / "face_analysis/models/glintr100.onnx",
    }
    return [f"{k}={v}" for k, v in values.items()]
