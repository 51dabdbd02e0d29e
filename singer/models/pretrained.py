"""Released weights into a built model: Hallo's ``pretrained_models/``, ``singer convert``'s output, or a
``save_pretrained`` folder, with every tensor accounted for.

    model = SingerModel.build(cfg.model, resolution)        # calls load_pretrained when model.pretrained is set
    report = load_pretrained(model, "pretrained_models")     # or by hand; model.pretrained_report holds it too
    report.summary()           # "2692 loaded, 10 new by design (msm 5, sfm 5), 0 missing, 2 skipped"
    report.fingerprint()       # {"files": {relative path: {size, sha256}}, "sha256": ...}: what a checkpoint cites

Folders (``folder_kind``):

* ``released``: Hallo's layout (``convert.SOURCES``: ``hallo/net.pth``, ``motion_module/mm_sd_v15_v2.ckpt``,
  ``sd-vae-ft-mse/``, ``wav2vec/wav2vec2-base-960h/``, ``stable-diffusion-v1-5/unet/``, ...), mapped with convert's
  ``map_key``; later sources override earlier ones key by key, as ``singer convert`` does (SD-1.5 -> motion
  module -> net.pth), and only the winning file's tensor is read;
* ``converted``: ``singer convert``'s output, ``<component>.safetensors`` (keys without the component prefix);
* ``pipeline``: a ``save_pretrained`` folder (``model_index.json``): every component, MSM and SFM included.

Accounting: a tensor of the model's state dict is loaded from a file, or new by design (``NEW_BY_DESIGN``: MSM and
SFM, identities at initialisation), or the load fails with one ``PretrainedMismatchError`` that names the missing,
unexpected and shape-mismatched tensors, before any data is read. Keys of a release that are dropped on purpose
(the CTC head, SINGER's untrained spectral tensors: ``convert.skip_reason``) are listed as ``skipped``.

Memory: tensors are read one at a time (safetensors with ``pread``, torch zip files memory-mapped) and copied into
the model's own parameters; nothing is held twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from singer.io import file_sha256
from singer.models.convert import (
    SOURCES,
    TARGET_PREFIX,
    adapt_tensor,
    adapted_shape,
    fit_tensor,
    map_key,
    shapes_fit,
    skip_reason,
    split_component,
)
from singer.models.weights_io import open_checkpoint, resolve_weights, tensor_shape

__all__ = ["NEW_BY_DESIGN", "LoadReport", "PretrainedMismatchError", "folder_kind", "load_pretrained",
           "released_state_dicts"]

log = logging.getLogger(__name__)

# Tensors no release holds, by design (prefix -> why); everything else must come from the files.
NEW_BY_DESIGN: dict[str, str] = {
    "msm.": "MSM (paper 3.1-3.2) is not in Hallo: an exact identity at initialisation",
    "denoising_unet.sfm.": "SFM (paper 3.3) is not in Hallo: an exact identity at initialisation",
    "audio_encoder.wav2vec2.masked_spec_embed": (
        "wav2vec2's SpecAugment mask embedding is not in wav2vec2-base-960h's file (transformers initialises it); "
        "it only replaces masked time steps in training"),
}
_SHOWN = 8  # names per list in an error message


class PretrainedMismatchError(ValueError):
    """The files do not fit the model; ``missing``, ``unexpected``, ``mismatched`` hold every name."""

    def __init__(self, path: Path, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def names(items: list[str]) -> str:
            more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            return ", ".join(items[:_SHOWN]) + more

        parts = [f"{len(v)} {k} ({names(v)})" for k, v in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if v]
        super().__init__(f"pretrained weights in {path} do not fit the model: {'; '.join(parts)}; nothing was "
                         f"loaded (check model.pretrained and the preset's sizes)")


@dataclass
class LoadReport:
    path: Path
    kind: str                                          # released | converted | pipeline
    loaded: list[str] = field(default_factory=list)    # our state-dict names
    new: dict[str, str] = field(default_factory=dict)  # our name -> why no file holds it
    skipped: dict[str, str] = field(default_factory=dict)  # "<source>:<key>" -> why it is not used
    files: list[Path] = field(default_factory=list)    # the weight files the loaded tensors came from
    per_file: dict[str, int] = field(default_factory=dict)  # relative file -> tensors loaded from it
    missing: list[str] = field(default_factory=list)   # always empty: a load with missing tensors raises

    def summary(self) -> str:
        groups: dict[str, int] = {}
        for name in self.new:
            group = "sfm" if name.startswith("denoising_unet.sfm.") else name.split(".")[0]
            groups[group] = groups.get(group, 0) + 1
        detail = ", ".join(f"{k} {v}" for k, v in sorted(groups.items()))
        return (f"{len(self.loaded)} loaded, {len(self.new)} new by design ({detail or 'none'}), "
                f"{len(self.missing)} missing, {len(self.skipped)} skipped")

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "loaded": len(self.loaded), "new": sorted(self.new),
                "missing": list(self.missing), "skipped": dict(self.skipped), "per_file": dict(self.per_file)}

    def fingerprint(self) -> dict:
        """Size and sha256 of every file the weights came from (relative to ``path``), and one sha256 over them."""
        files = {}
        for file in sorted(set(self.files)):
            files[_relative(file, self.path)] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"path": str(self.path), "files": files, "sha256": digest}



def _relative(file: Path, root: Path) -> str:
    try:
        return file.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(file)


def folder_kind(path: str | os.PathLike) -> str:
    """``pipeline`` (model_index.json), ``converted`` (convert_report.json or <component>.safetensors) or
    ``released`` (any of convert.SOURCES' files); FileNotFoundError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.pretrained: {path} is not a folder (Hallo's pretrained_models/, the output "
                                f"of `singer convert`, or a save_pretrained folder)")
    if (path / "model_index.json").is_file():
        return "pipeline"
    components = {split_component(p)[0] for p in TARGET_PREFIX.values()}
    if (path / "convert_report.json").is_file() or any((path / f"{c}.safetensors").is_file() for c in components):
        return "converted"
    if any(default and resolve_weights(path / default) for _, default in SOURCES.values()):
        return "released"
    raise FileNotFoundError(f"model.pretrained: {path} holds no weights: none of Hallo's files "
                            f"({', '.join(d for _, d in SOURCES.values() if d)}), no `singer convert` output, "
                            f"no model_index.json")


# A plan: our name -> (source name, file, key in the file); the files are opened lazily.
Plan = dict[str, tuple[str, Path, str]]


def _plan(path: Path, kind: str, opened: dict[Path, Mapping]) -> tuple[Plan, dict[str, str], list[str]]:
    """(plan, skipped, unexpected source keys) for a folder."""
    plan: Plan = {}
    skipped: dict[str, str] = {}
    unexpected: list[str] = []

    def checkpoint(file: Path) -> Mapping:
        if file not in opened:
            opened[file] = open_checkpoint(file)
        return opened[file]

    if kind == "released":
        for source, (_, default) in SOURCES.items():
            file = resolve_weights(path / default) if default else None
            if file is None:
                continue
            for key in checkpoint(file):
                target = map_key(source, key)
                if target is not None:
                    plan[target] = (source, file, key)
                    continue
                reason = skip_reason(source, key) or "unmapped"
                if reason.startswith("unknown prefix"):
                    unexpected.append(f"{_relative(file, path)}:{key}")
                else:
                    skipped[f"{source}:{key}"] = reason
        return plan, skipped, unexpected
    if kind == "converted":
        files = {p.stem: p for p in sorted(path.glob("*.safetensors"))}
    else:  # pipeline: one folder per component (a parameter-free autoencoder has no weights file)
        index = json.loads((path / "model_index.json").read_text())
        files = {name: w for name in index if not name.startswith("_") and (path / name).is_dir()
                 and (w := resolve_weights(path / name)) is not None}
    for component, file in files.items():
        for key in checkpoint(file):
            plan[f"{component}.{key}"] = (kind, file, key)
    return plan, skipped, unexpected


def _new_reason(name: str) -> str | None:
    for prefix, why in NEW_BY_DESIGN.items():
        if name == prefix or name.startswith(prefix):
            return why
    return None


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load every tensor of ``path`` into ``model`` (a SingerModel) in place; returns the report (also set as
    ``model.pretrained_report``). Raises ``PretrainedMismatchError`` (before reading any data) when a tensor of
    the model has no source and is not new by design, or a file holds a tensor the model lacks or shapes it
    otherwise; FileNotFoundError when the folder holds no weights."""
    path = Path(path)
    kind = folder_kind(path)
    opened: dict[Path, Mapping] = {}
    try:
        plan, skipped, unexpected = _plan(path, kind, opened)
        own = model.state_dict(keep_vars=True)
        new = {name: why for name in own if name not in plan and (why := _new_reason(name)) is not None}
        missing = sorted(name for name in own if name not in plan and name not in new)
        unexpected = sorted(unexpected + [f"{_relative(plan[t][1], path)}:{plan[t][2]} -> {t}"
                                          for t in plan if t not in own])
        mismatched = []
        for target, (source, file, key) in plan.items():
            if target in own:
                shape = adapted_shape(source, target, tensor_shape(opened[file], key))
                if not shapes_fit(target, shape, tuple(own[target].shape)):
                    mismatched.append(f"{target}: {list(shape)} in {_relative(file, path)}, "
                                      f"{list(own[target].shape)} in the model")
        if missing or unexpected or mismatched:
            raise PretrainedMismatchError(path, missing, unexpected, sorted(mismatched))
        report = LoadReport(path=path, kind=kind, new=new, skipped=skipped)
        with torch.no_grad():
            for target, (source, file, key) in plan.items():
                mine = own[target]
                tensor = fit_tensor(target, adapt_tensor(source, key, target, opened[file][key]), mine)
                mine.copy_(tensor)
                report.loaded.append(target)
                rel = _relative(file, path)
                report.per_file[rel] = report.per_file.get(rel, 0) + 1
        report.files = sorted({file for _, file, _ in plan.values()})
    finally:
        opened.clear()  # drop the memory maps
    model.pretrained_report = report
    log.info("pretrained weights from %s (%s): %s", path, kind, report.summary())
    return report


def released_state_dicts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our composite state dict in the released files' key layout, the inverse of ``convert.map_key``:
    ``{"hallo_net": net.pth, "motion_module": mm_sd_v15_v2.ckpt, "sd_vae": the VAE, "wav2vec2": the CTC model's
    file}``. New-by-design tensors (MSM, SFM, wav2vec2's mask embedding) are left out, as no release holds them."""
    net_prefix = {v: k for k, v in TARGET_PREFIX.items() if k not in ("wav2vec2", "vae")}
    out: dict[str, dict[str, torch.Tensor]] = {"hallo_net": {}, "motion_module": {}, "sd_vae": {}, "wav2vec2": {}}
    for name, tensor in state_dict.items():
        if _new_reason(name) is not None:
            continue
        if name.startswith(TARGET_PREFIX["wav2vec2"]):
            key = name[len(TARGET_PREFIX["wav2vec2"]):]
            key = key.replace(".parametrizations.weight.original0", ".weight_g")
            key = key.replace(".parametrizations.weight.original1", ".weight_v")
            out["wav2vec2"]["wav2vec2." + key] = tensor
        elif name.startswith(TARGET_PREFIX["vae"]):
            out["sd_vae"][name[len(TARGET_PREFIX["vae"]):]] = tensor
        else:
            prefix = next((p for p in net_prefix if name.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"{name}: no released file holds this component")
            rest = name[len(prefix):]
            out["hallo_net"][f"{net_prefix[prefix]}.{rest}"] = tensor
            if prefix == TARGET_PREFIX["denoising_unet"] and ".motion_modules." in rest:
                out["motion_module"][rest] = tensor
    return out
