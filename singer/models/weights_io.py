"""Reading weight files: ``.safetensors``, torch files (``weights_only=True``) and diffusers / transformers model
folders, whole (``load_checkpoint``) or lazily (``open_checkpoint``: a tensor at a time, nothing read twice).

    state = load_checkpoint("pretrained_models/hallo/net.pth")          # {key: tensor}, all in memory
    lazy = open_checkpoint("pretrained_models/sd-vae-ft-mse")           # the folder's weights file, lazily
    tensor_shape(lazy, "encoder.conv_in.weight")                       # (128, 3, 3, 3), no data read
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["LazySafetensors", "load_checkpoint", "open_checkpoint", "resolve_weights", "tensor_shape"]


_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def resolve_weights(path: Path) -> Path | None:
    """The weights file at ``path`` (a file, or the first known weights file name in a folder), or None."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in _WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
    return None


class LazySafetensors(Mapping):
    """The tensors of a ``.safetensors`` file, each read from disk when it is asked for (with ``pread`` where
    safetensors has it, so nothing of the file stays mapped into memory). ``shape(key)`` reads no data."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors < 0.8: memory-mapped
            self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._index = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._index:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def tensor_shape(checkpoint: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of ``checkpoint[key]`` without reading its data where the mapping can tell."""
    if isinstance(checkpoint, LazySafetensors):
        return checkpoint.shape(key)
    return tuple(checkpoint[key].shape)


def _unwrap(obj, where: Path) -> dict:
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} does not hold a state dict ({type(obj).__name__})")
    return dict(obj)


def open_checkpoint(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Like ``load_checkpoint``, without reading every tensor into memory first: a ``LazySafetensors`` for a
    ``.safetensors`` file, a memory-mapped state dict for a torch zip file (``torch.load(mmap=True,
    weights_only=True)``; a legacy-format file is read whole)."""
    path = Path(path)
    resolved = resolve_weights(path)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if resolved.suffix == ".safetensors":
        return LazySafetensors(resolved)
    try:
        obj = torch.load(resolved, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # saved with _use_new_zipfile_serialization=False: no mmap
        if "mmap" not in str(exc):
            raise
        obj = torch.load(resolved, map_location="cpu", weights_only=True)
    return _unwrap(obj, resolved)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file, a torch file (``weights_only=True``), or a diffusers /
    transformers model folder. Wrappers ``{"state_dict": ...}`` / ``{"module": ...}`` are unwrapped."""
    path = Path(path)
    resolved = resolve_weights(path)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if resolved.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(resolved), device="cpu"))
    obj = torch.load(resolved, map_location="cpu", weights_only=True)
    return _unwrap(obj, resolved)
