"""Code tests: parameters load into typed config, presets and overrides resolve in the right order."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from singer.config import flatten, load_config, resolve_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_with_both_presets():
    tiny = load_config(ROOT / "params.yaml", preset="tiny")
    paper = load_config(ROOT / "params.yaml", preset="paper")
    assert tiny.preset == "tiny" and tiny.crop.resolution == 64
    assert paper.preset == "paper" and paper.crop.resolution == 512
    assert tiny.clip.frames_per_clip == 50  # 2 s at 25 fps, the paper's clips


def test_section_value_beats_preset_and_override_beats_both(tmp_path):
    raw = {"preset": "tiny", "crop": {"resolution": 96}, "presets": {"tiny": {"crop": {"resolution": 64}}}}
    assert resolve_params(raw)["crop"]["resolution"] == 96
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p, overrides=["crop.resolution=128", "clip.fps=30"])
    assert cfg.crop.resolution == 128 and cfg.clip.fps == 30


def test_unknown_keys_and_presets_fail_loudly(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"crop": {"resolutoin": 64}, "presets": {"tiny": {}}}))
    with pytest.raises(ValidationError):
        load_config(p)
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(ROOT / "params.yaml", preset="huge")
    with pytest.raises(ValueError, match="key.path=value"):
        load_config(ROOT / "params.yaml", overrides=["crop.resolution"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1], "e": "x"}
