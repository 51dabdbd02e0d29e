"""Map Hallo's and SINGER's released checkpoints (and the third-party weights they start from) onto our modules.

Our UNets and face locator carry Hallo's names (``singer.models.unet_blocks``), so for them the mapping is the
identity under a component prefix. Target keys are ``<component>.<name inside the component>``; the component
prefixes are in ``TARGET_PREFIX`` (one table, so the composite model can be wired to it):

==========================  ======================================  ==========================================
source (``map_key``)        file (Hallo's ``pretrained_models/``)   goes to
==========================  ======================================  ==========================================
hallo_net                   hallo/net.pth                           reference_unet., denoising_unet.,
                                                                    face_locator., face_encoder. (imageproj),
                                                                    audio_encoder.projection. (audioproj)
singer_net                  SINGER's net.pth                        as hallo_net; its 6 spectral keys are
                                                                    ``NOT_TRANSFERABLE``
motion_module               motion_module/mm_sd_v15_v2.ckpt         denoising_unet.
sd15_unet                   stable-diffusion-v1-5/unet/...          denoising_unet.
sd15_reference_unet         (the same file)                         reference_unet. (no conv_norm_out/conv_out)
stage1_<name>               sub_models/<name>.pth                   reference_unet., denoising_unet.,
                                                                    face_locator., face_encoder.
sd_vae                      sd-vae-ft-mse/                          vae. (old attention names renamed)
wav2vec2                    wav2vec/wav2vec2-base-960h/             audio_encoder.wav2vec2. (CTC head dropped)
==========================  ======================================  ==========================================

``convert_files(pretrained_dir, out_dir)`` applies what it finds in that order (later files override earlier
ones, as in Hallo: SD-1.5 -> motion module -> net.pth) and writes one safetensors state dict per component
(keys without the component prefix) plus ``convert_report.json`` (mapped/skipped keys with reasons).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from singer.models.weights_io import LazySafetensors, load_checkpoint, open_checkpoint, resolve_weights

__all__ = [
    "NOT_TRANSFERABLE",
    "SOURCES",
    "TARGET_PREFIX",
    "adapt_tensor",
    "adapted_shape",
    "convert_files",
    "convert_state_dict",
    "fit_tensor",
    "load_checkpoint",
    "load_state_into",
    "map_key",
    "open_checkpoint",
    "shapes_fit",
    "skip_reason",
    "split_component",
]

# Where each Hallo module lands in our composite model. Inner names are kept (Hallo's ImageProjModel: proj, norm;
# AudioProjModel: proj1, proj2, proj3, norm; wav2vec2: transformers' Wav2Vec2Model names).
TARGET_PREFIX: dict[str, str] = {
    "reference_unet": "reference_unet.",
    "denoising_unet": "denoising_unet.",
    "face_locator": "face_locator.",
    "imageproj": "face_encoder.",
    "audioproj": "audio_encoder.projection.",
    "wav2vec2": "audio_encoder.wav2vec2.",
    "vae": "vae.",
}

# The checkpoint keys (as stored in SINGER's net.pth) that are deliberately not carried over.
NOT_TRANSFERABLE: dict[str, str] = {
    "denoising_unet.hidden_spectral_weighting.weight": (
        "SINGER's released SFM: per-sub-band, per-channel scalar tensor [4,1,1280,4,4] that was never trained "
        "(frozen with the UNet, so it holds its random normal init) and has different semantics from our SFM "
        "(band weights 1 + raw, zero-initialised, plus a gated FC); our SFM starts as the identity instead"
    ),
    "denoising_unet.hidden_spectral_weighting.fc.0.weight": (
        "SINGER's released SFM gate Linear(8->4, no bias) over 8 attention heads: a different gate design "
        "(ours: Linear(C, C/r) -> SiLU -> Linear(C/r, C) on pooled channels), and never trained"
    ),
    "denoising_unet.hidden_spectral_weighting.fc.2.weight": (
        "SINGER's released SFM gate Linear(4->8, no bias): a different gate design, and never trained"
    ),
    "audioembed.dct_layer.weight": (
        "SINGER's released MSM 'tunable matrix' is a frozen random buffer ([bs,4,14,64,64], batch size and 14 "
        "frames hard-coded); our MSM weight is a trainable parameter initialised to ones (paper section 3.2)"
    ),
    "audioembed.fc.0.weight": (
        "SINGER's released MSM FC Linear(4->2, no bias) was trained together with the random dct buffer above, so "
        "its values are meaningless without it; our MSM FC (with bias, zero-initialised last layer) differs in shape"
    ),
    "audioembed.fc.2.weight": (
        "SINGER's released MSM FC Linear(2->1, no bias): produces one weight instead of our four sub-band weights "
        "and depends on the random dct buffer; not transferable"
    ),
}

# source name -> (description, default path under Hallo's pretrained_models/)
SOURCES: dict[str, tuple[str, str | None]] = {
    "sd15_unet": ("SD-1.5 UNet -> denoising UNet", "stable-diffusion-v1-5/unet"),
    "sd15_reference_unet": ("SD-1.5 UNet -> reference UNet", "stable-diffusion-v1-5/unet"),
    "stage1_reference_unet": ("Hallo stage-1 reference UNet", "sub_models/reference_unet.pth"),
    "stage1_denoising_unet": ("Hallo stage-1 denoising UNet", "sub_models/denoising_unet.pth"),
    "stage1_face_locator": ("Hallo stage-1 face locator", "sub_models/face_locator.pth"),
    "stage1_imageproj": ("Hallo stage-1 image projection", "sub_models/imageproj.pth"),
    "motion_module": ("AnimateDiff mm_sd_v15_v2 motion modules", "motion_module/mm_sd_v15_v2.ckpt"),
    "hallo_net": ("Hallo net.pth", "hallo/net.pth"),
    "singer_net": ("SINGER net.pth", "singer/net.pth"),
    "sd_vae": ("sd-vae-ft-mse", "sd-vae-ft-mse"),
    "wav2vec2": ("wav2vec2-base-960h", "wav2vec/wav2vec2-base-960h"),
}

_NET_PREFIXES = ("reference_unet", "denoising_unet", "face_locator", "imageproj", "audioproj")
_SD_OUTPUT_KEYS = ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")
_VAE_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_OLD_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _net_key(key: str) -> str | None:
    head, _, rest = key.partition(".")
    if head in _NET_PREFIXES and rest:
        return TARGET_PREFIX[head] + rest
    return None


def skip_reason(source: str, key: str) -> str | None:
    """Why ``key`` of ``source`` is not mapped (None when it is)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {sorted(SOURCES)}")
    if source == "singer_net" and key in NOT_TRANSFERABLE:
        return "not transferable: " + NOT_TRANSFERABLE[key]
    if source in ("hallo_net", "singer_net"):
        return None if _net_key(key) is not None else f"unknown prefix {key.split('.', 1)[0]!r} in {source}"
    if source == "motion_module":
        return None if ".motion_modules." in key else "not a motion-module key"
    if source == "sd15_reference_unet" and key in _SD_OUTPUT_KEYS:
        return "the reference UNet has no output head (conv_norm_out/conv_out), as in Hallo: unused"
    if source == "wav2vec2":
        if key.startswith("lm_head."):
            return "CTC head of Wav2Vec2ForCTC: SINGER uses the hidden states only (Hallo ignores it too)"
        if key.startswith("quantizer.") or key.startswith("project_"):
            return "pre-training head (quantizer/projections): not part of Wav2Vec2Model"
    return None


def map_key(source: str, key: str) -> str | None:
    """Our target key (``<component>.<name>``) for ``key`` of a ``source`` checkpoint, or None (see
    ``skip_reason``)."""
    if skip_reason(source, key) is not None:
        return None
    if source in ("hallo_net", "singer_net"):
        return _net_key(key)
    if source in ("motion_module", "sd15_unet", "stage1_denoising_unet"):
        return TARGET_PREFIX["denoising_unet"] + key
    if source in ("sd15_reference_unet", "stage1_reference_unet"):
        return TARGET_PREFIX["reference_unet"] + key
    if source == "stage1_face_locator":
        return TARGET_PREFIX["face_locator"] + key
    if source == "stage1_imageproj":
        return TARGET_PREFIX["imageproj"] + key
    if source == "sd_vae":
        match = _VAE_OLD_RE.match(key)
        if match:
            key = f"{match.group(1)}.{_VAE_OLD_ATTENTION[match.group(2)]}.{match.group(3)}"
        return TARGET_PREFIX["vae"] + key
    if source == "wav2vec2":
        if key.startswith("wav2vec2."):
            key = key[len("wav2vec2.") :]
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        key = key.replace(".weight_v", ".parametrizations.weight.original1")
        return TARGET_PREFIX["wav2vec2"] + key
    raise AssertionError(source)  # pragma: no cover - skip_reason validated it


def _squeezed(source: str, target: str, shape: tuple[int, ...]) -> bool:
    """Very old VAE attention weights are stored as 1x1 convs; ours are Linear weights."""
    return (
        source == "sd_vae"
        and len(shape) == 4
        and tuple(shape[-2:]) == (1, 1)
        and ".attentions." in target
        and target.endswith(".weight")
        and not target.endswith("group_norm.weight")
    )


def adapted_shape(source: str, target: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a stored tensor of ``shape`` has once ``adapt_tensor`` has fixed its layout."""
    return tuple(shape[:2]) if _squeezed(source, target, tuple(shape)) else tuple(shape)


def adapt_tensor(source: str, key: str, target: str, tensor: torch.Tensor) -> torch.Tensor:
    """Layout fixes: very old VAE attention weights stored as 1x1 convs become Linear weights."""
    return tensor[:, :, 0, 0] if _squeezed(source, target, tuple(tensor.shape)) else tensor


_adapt = adapt_tensor


def convert_state_dict(
    source: str, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a whole checkpoint: ``(mapped {target_key: tensor}, skipped {key: reason})``.

    Floating-point tensors are cast to ``dtype`` (the released Hallo/SINGER files are fp16); None keeps them.
    """
    mapped: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for key, tensor in state_dict.items():
        target = map_key(source, key)
        if target is None:
            skipped[key] = skip_reason(source, key) or "unmapped"
            continue
        if not torch.is_tensor(tensor):
            skipped[key] = f"not a tensor ({type(tensor).__name__})"
            continue
        tensor = _adapt(source, key, target, tensor)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if target in mapped:
            raise ValueError(f"{source}: two keys map to {target!r}")
        mapped[target] = tensor
    return mapped, skipped


def split_component(target: str) -> tuple[str, str]:
    """``"denoising_unet.conv_in.weight" -> ("denoising_unet", "conv_in.weight")``."""
    component, _, rest = target.partition(".")
    return component, rest


def shapes_fit(key: str, shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` can initialise ours of ``target_shape`` (equal, or a ``pos_encoder.pe`` table
    of another length: see ``fit_tensor``)."""
    shape, target_shape = tuple(shape), tuple(target_shape)
    if shape == target_shape:
        return True
    return key.endswith("pos_encoder.pe") and len(shape) == 3 == len(target_shape) and \
        shape[::2] == target_shape[::2]


def fit_tensor(key: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` shaped to initialise ``target``, or None when it cannot. A motion module's sinusoidal
    ``pos_encoder.pe`` table (1, L, C) of another length L is not an error: the sinusoids are the same for shared
    positions, so the overlap is taken from ``tensor`` and the rest kept from ``target``."""
    if tuple(tensor.shape) == tuple(target.shape):
        return tensor
    if not shapes_fit(key, tuple(tensor.shape), tuple(target.shape)):
        return None
    n = min(tensor.shape[1], target.shape[1])
    merged = target.detach().clone()
    merged[:, :n] = tensor[:, :n].to(merged.dtype)
    return merged


def load_state_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = False) -> dict:
    """Load a converted component state dict (keys without the component prefix) into ``module``.

    Shapes are checked key by key. A ``pos_encoder.pe`` table of another length (``motion_max_len``) is not an
    error: the sinusoids are the same for shared positions, so the overlap is copied and the rest kept. Returns
    ``{"loaded", "missing", "unexpected", "mismatched"}`` (lists of keys); ``strict`` raises on any of the last
    three.
    """
    own = module.state_dict()
    loadable: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, tensor in state_dict.items():
        if key not in own:
            unexpected.append(key)
            continue
        target = own[key]
        fitted = fit_tensor(key, tensor, target)
        if fitted is None:
            mismatched.append(f"{key}: {tuple(tensor.shape)} vs ours {tuple(target.shape)}")
            continue
        loadable[key] = fitted.to(target.dtype)
    result = module.load_state_dict(loadable, strict=False)
    report = {
        "loaded": sorted(loadable),
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(unexpected),
        "mismatched": mismatched,
    }
    if strict and (report["missing"] or report["unexpected"] or report["mismatched"]):
        raise RuntimeError(
            f"loading into {type(module).__name__}: missing {report['missing'][:5]}, unexpected "
            f"{report['unexpected'][:5]}, mismatched {report['mismatched'][:5]}"
        )
    return report


# --------------------------------------------------------------------------------------------------------------
# files


def convert_files(
    pretrained_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = torch.float32,
    paths: Mapping[str, str | os.PathLike] | None = None,
) -> dict:
    """Convert whatever released files are present under ``pretrained_dir`` (Hallo's layout, ``SOURCES``) into
    per-component safetensors files in ``out_dir`` plus ``convert_report.json``; returns the report.

    ``paths`` overrides or adds source files (``{"singer_net": "/path/net.pth"}``); relative paths are taken
    from ``pretrained_dir``. Later sources override earlier ones key by key (order of ``SOURCES``). Floating-point
    tensors are written as ``dtype`` (None: as stored). Memory: the sources are opened lazily (memory-mapped or
    read a tensor at a time) and one component is converted and written at a time.
    """
    from safetensors.torch import save_file

    pretrained_dir = Path(pretrained_dir)
    out_dir = Path(out_dir)
    locations = {name: default for name, (_, default) in SOURCES.items()}
    locations.update({k: str(v) for k, v in (paths or {}).items()})
    unknown = set(locations) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; known: {sorted(SOURCES)}")

    plan: dict[str, tuple[str, Path, str]] = {}  # target -> (source, file, key in the file); the last source wins
    report: dict = {"pretrained_dir": str(pretrained_dir), "dtype": str(dtype), "sources": {}, "components": {}}
    opened: dict[Path, Mapping[str, torch.Tensor]] = {}
    for source in SOURCES:
        where = locations.get(source)
        resolved = resolve_weights(pretrained_dir / where) if where else None
        if resolved is None:
            report["sources"][source] = {"found": False, "path": str(pretrained_dir / where) if where else None}
            continue
        if resolved not in opened:
            opened[resolved] = open_checkpoint(resolved)
        checkpoint = opened[resolved]
        mine: set[str] = set()
        skipped: dict[str, str] = {}
        overridden = 0
        for key in checkpoint:
            target = map_key(source, key)
            if target is None:
                skipped[key] = skip_reason(source, key) or "unmapped"
                continue
            if not isinstance(checkpoint, LazySafetensors) and not torch.is_tensor(checkpoint[key]):
                skipped[key] = f"not a tensor ({type(checkpoint[key]).__name__})"
                continue
            if target in mine:
                raise ValueError(f"{source}: two keys map to {target!r}")
            mine.add(target)
            overridden += target in plan
            plan[target] = (source, resolved, key)
        report["sources"][source] = {
            "found": True,
            "path": str(resolved),
            "num_keys": len(checkpoint),
            "mapped": len(mine),
            "overrode": overridden,
            "skipped": skipped,
        }

    components: dict[str, list[str]] = {}
    for target in plan:
        components.setdefault(split_component(target)[0], []).append(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    for component, targets in sorted(components.items()):
        state: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for target in targets:
            source, file, key = plan[target]
            tensor = adapt_tensor(source, key, target, opened[file][key])
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[split_component(target)[1]] = tensor.contiguous()
            counts[source] = counts.get(source, 0) + 1
        file = out_dir / f"{component}.safetensors"
        tmp = file.with_suffix(".safetensors.tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "component": component})
        os.replace(tmp, file)
        report["components"][component] = {
            "file": file.name,
            "num_keys": len(state),
            "num_elements": int(sum(t.numel() for t in state.values())),
            "from_sources": counts,
        }
        del state
    opened.clear()
    report_file = out_dir / "convert_report.json"
    tmp = report_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
    os.replace(tmp, report_file)
    return report
