"""Typed configuration read from `params.yaml`, the one source of truth for parameters.

    cfg = load_config()                      # ./params.yaml, preset from the file
    cfg = load_config("params.yaml", preset="paper", overrides=["crop.scale=0.9"])
    cfg.crop.resolution                      # -> 64 with the tiny preset

Resolution order, lowest first: the preset block (`presets.<name>`), then the sections written in the file,
then `overrides` (dotted `key=value`, values parsed as YAML, as `dvc exp run -S` does).
Unknown keys are errors, so a typo in params.yaml fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PARAMS = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    raw: Path = Path("data/raw")
    ingested: Path = Path("data/ingested")
    clips: Path = Path("data/clips")
    crops: Path = Path("data/crops")
    split: Path = Path("data/split")
    metrics: Path = Path("metrics")
    reports: Path = Path("reports")


class SynthConfig(Section):
    subjects: int = Field(5, ge=1)
    seconds: float = Field(6.0, gt=0)
    seed: int = 0
    size: int = Field(256, ge=64)
    fps: list[float] = [25.0]
    takes_per_subject: int = Field(1, ge=1)
    music_level: float = Field(0.35, ge=0)
    sample_rate: int = 44100


class IngestConfig(Section):
    sources: list[str] = []
    extensions: list[str] = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
    min_fps: float = 15.0
    min_duration_s: float = 2.0
    max_bytes: int = 4_000_000_000


class ClipConfig(Section):
    seconds: float = Field(2.0, gt=0)
    fps: int = Field(25, gt=0)
    sample_rate: int = 16000
    hop_seconds: float = Field(2.0, gt=0)
    min_luma: float = 25.0
    min_motion: float = 0.15
    scene_cut_threshold: float = 0.5
    crf: int = Field(12, ge=0, le=51)
    max_side: int = Field(1024, ge=64)

    @property
    def frames_per_clip(self) -> int:
        return int(round(self.seconds * self.fps))


class CropConfig(Section):
    resolution: int = Field(64, ge=16)
    scale: float = Field(0.8, gt=0, le=1.0)
    detect_max_side: int = 320
    min_face_score: float = 0.3
    second_face_ratio: float = 0.5
    max_missing_fraction: float = Field(0.2, ge=0, le=1)
    max_jitter: float = 0.08
    smooth_sigma: float = 2.0
    crf: int = Field(12, ge=0, le=51)
    redetect_every: int = Field(10, ge=1)
    detect_face_px: int = Field(100, ge=80)
    max_multi_face_fraction: float = Field(0.2, ge=0, le=1)
    workers: int = Field(0, ge=0)


class SplitConfig(Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class ValidateConfig(Section):
    max_fps_error: float = 0.01


class S3Config(Section):
    endpoint_url: str | None = Field("http://127.0.0.1:8333", validate_default=True)
    bucket: str = "singer"
    region: str = "us-east-1"

    @field_validator("endpoint_url")
    @classmethod
    def _env_overrides(cls, v: str | None) -> str | None:
        # A deployment points at its own S3 without editing params (which DVC tracks).
        return os.environ.get("SINGER_S3_ENDPOINT_URL", v)


class Config(Section):
    preset: str = "tiny"
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    clip: ClipConfig = ClipConfig()
    crop: CropConfig = CropConfig()
    split: SplitConfig = SplitConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    s3: S3Config = S3Config()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge `update` into a copy of `base` (dicts merge, everything else is replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(tree: dict, override: str) -> dict:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict, in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key.path=value")
    dotted, raw = override.split("=", 1)
    node = tree
    *parents, leaf = dotted.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)
    return tree


def resolve_params(raw: dict, preset: str | None = None, overrides: list[str] | None = None) -> dict:
    """The effective parameter tree: preset block, then file sections, then overrides."""
    raw = copy.deepcopy(raw or {})
    presets = raw.pop("presets", {}) or {}
    for override in overrides or []:
        apply_override(raw, override)
    name = preset or raw.get("preset", "tiny")
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; params.yaml defines {sorted(presets) or 'none'}")
    merged = deep_merge(presets[name], raw)
    merged["preset"] = name
    return merged


def load_config(
    path: str | os.PathLike = DEFAULT_PARAMS,
    preset: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read params.yaml into a `Config`. A missing file gives the built-in defaults of the tiny preset."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        raw = yaml.safe_load(path.read_text()) or {}
    elif path.name != DEFAULT_PARAMS or path.parent != Path("."):
        raise FileNotFoundError(f"parameter file {path} does not exist")
    raw.setdefault("presets", {}).setdefault("tiny", {})
    return Config.model_validate(resolve_params(raw, preset, overrides))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to log parameters."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
