"""The paper path end to end at shrunk widths (benchmarks/paper_rehearsal.py --shrink): a fabricated
pretrained_models/ in the released key layout -> `singer convert` -> `singer train -S preset=paper` with
model.pretrained (slim checkpoints) -> `singer generate` from the trained model and from the release alone.
The full-width run is the benchmark itself (README "Benchmarks")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_shrunk_paper_rehearsal(tiny_project, tmp_path):
    out = tmp_path / "rehearsal.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/paper_rehearsal.py"), "--shrink", "--resolution", "64",
                           "--frames", "4", "--steps", "2", "--inference-steps", "1", "--corpus", str(tiny_project),
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    tensors = result["tensors"]
    assert tensors["missing"] == 0 and tensors["loaded"] > 1000
    assert "msm 5" in tensors["new_groups"] and "sfm 5" in tensors["new_groups"]
    ck = result["checkpoint"]
    # the checkpoint holds the trainable tensors (all fp32), no frozen UNet
    assert ck["saved_bytes"] == ck["trainable_bytes"] and ck["frozen_from_pretrained"] > 1000
    assert ck["trainable_bytes"] <= ck["model_safetensors_bytes"] < ck["trainable_bytes"] + 100_000
    # Adam: two moments per trainable parameter, plus the pickle's bookkeeping
    assert 2 * ck["trainable_bytes"] <= ck["optimizer_bytes"] < 2 * ck["trainable_bytes"] + 200_000
    assert set(result["commands"]) >= {"fabricate", "convert", "train", "generate", "generate_pretrained"}
    assert all(c["peak_rss_gib"] < 4 for c in result["commands"].values() if "peak_rss_gib" in c)
    assert result["seconds_per_step"] > 0 and result["final_loss"] > 0
    work = tmp_path / "work"
    assert (work / "trained.mp4").stat().st_size > 0 and (work / "pretrained.mp4").stat().st_size > 0
    # the fabricated UNet files went once converted: one copy of the weights on disk
    assert not (work / "pretrained_models/hallo/net.pth").exists()
