"""Atomic, resumable checkpoints (singer.train.checkpoint) and crash recovery of a real training script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from singer.train import check_world_size, want_cpu
from singer.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "toy_train.py"


def _load_toy():
    spec = importlib.util.spec_from_file_location("toy_train", TOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = _load_toy()


class Counter:
    """A custom object with state, registered for checkpointing."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _accelerator_with_model(seed: int = 0):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _step(model, optimizer):
    loss = model(torch.ones(4, 3)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_writes_marker_state_and_prunes(tmp_path):
    accelerator, model, optimizer = _accelerator_with_model()
    for step in range(1, 6):
        _step(model, optimizer)
        path = ckpt.save_checkpoint(
            accelerator, tmp_path, step, extra={"epoch": 0, "samples_seen": 4 * step}, keep_last=2
        )
        assert path == tmp_path / f"step-{step:06d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]
    last = tmp_path / "step-000005"
    marker = json.loads((last / "COMPLETE").read_text())
    assert marker["step"] == 5 and marker["num_processes"] == 1
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(
        marker["files"]
    )
    assert all(len(meta["sha256"]) == 64 for meta in marker["files"].values())
    assert ckpt.is_complete(last, verify="sha256")
    state = json.loads((last / "trainer_state.json").read_text())
    assert state == {"step": 5, "epoch": 0, "samples_seen": 20, "num_processes": 1}
    assert ckpt.latest_checkpoint(tmp_path) == last
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "step-000004", last]


def test_keep_all_and_resave_same_step(tmp_path):
    accelerator, model, optimizer = _accelerator_with_model()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(accelerator, tmp_path, step, keep_last=None)
    assert len(ckpt.list_checkpoints(tmp_path)) == 3
    _step(model, optimizer)
    ckpt.save_checkpoint(accelerator, tmp_path, 3, extra={"again": True}, keep_last=None)
    assert ckpt.read_trainer_state(tmp_path / "step-000003")["again"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_latest_ignores_incomplete_and_tmp(tmp_path, caplog):
    accelerator, model, optimizer = _accelerator_with_model()
    ckpt.save_checkpoint(accelerator, tmp_path, 5)
    ckpt.save_checkpoint(accelerator, tmp_path, 6)
    # step 6 whole once, truncated since: its marker no longer matches
    weights = tmp_path / "step-000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    # step 7: no marker, a truncated file (a copy interrupted half-way)
    (tmp_path / "step-000007").mkdir()
    (tmp_path / "step-000007" / "model.safetensors").write_bytes(b"\x00" * 5)
    # step 8: a marker that is not JSON
    (tmp_path / "step-000008").mkdir()
    (tmp_path / "step-000008" / "COMPLETE").write_text("{trunc")
    # an interrupted save
    (tmp_path / ".tmp-step-000009").mkdir()
    (tmp_path / ".tmp-step-000009" / "optimizer.bin").write_bytes(b"half")
    # a file that merely looks like a checkpoint
    (tmp_path / "step-000010").write_text("not a folder")

    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-000005"
    assert "skipping incomplete checkpoint" in caplog.text
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "step-000005"]
    # only whole checkpoints are ever pruned
    assert ckpt.prune(tmp_path, keep_last=1) == []
    state = ckpt.resume(accelerator, tmp_path)
    assert state["step"] == 5 and state["checkpoint"] == str(tmp_path / "step-000005")
    assert not (tmp_path / ".tmp-step-000009").exists()  # stale tmp removed on start
    with pytest.raises(FileNotFoundError):
        ckpt.resume(accelerator, tmp_path, path=tmp_path / "step-000007")


def test_resume_nothing(tmp_path):
    accelerator, _, _ = _accelerator_with_model()
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.resume(accelerator, tmp_path / "missing") is None
    assert ckpt.resume(accelerator, tmp_path) is None


def test_resume_restores_model_optimizer_rng_and_registered_objects(tmp_path):
    accelerator, model, optimizer = _accelerator_with_model(seed=0)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    _step(model, optimizer)
    counter.n = 41
    ckpt.save_checkpoint(accelerator, tmp_path, 1)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_opt = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    expected_draw = torch.rand(3)  # the RNG stream right after the save

    other, model2, optimizer2 = _accelerator_with_model(seed=99)
    counter2 = Counter()
    other.register_for_checkpointing(counter2)
    torch.rand(100)
    state = ckpt.resume(other, tmp_path)
    assert state["step"] == 1
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in expected_weights.items())
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], expected_opt)
    assert counter2.n == 41
    assert torch.equal(torch.rand(3), expected_draw)


def test_straight_equals_crash_and_resume_in_process(tmp_path, monkeypatch):
    straight = toy.train(tmp_path / "straight", steps=10, checkpoint_every=5, keep_last=2, seed=0)

    monkeypatch.setenv("TOY_CRASH_MODE", "raise")
    with pytest.raises(toy.Crash):
        toy.train(tmp_path / "resumed", steps=10, checkpoint_every=5, keep_last=2, seed=0, crash_at=7)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step-000005"]
    # another seed: other initial weights and RNG stream, all of which the checkpoint must overwrite
    resumed = toy.train(tmp_path / "resumed", steps=10, checkpoint_every=5, keep_last=2, seed=123)
    assert resumed["start_step"] == 5
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key

    # the comparison can fail: a different seed from scratch gives different weights
    other = toy.train(tmp_path / "other", steps=10, checkpoint_every=5, keep_last=2, seed=123)
    assert other["weights_sha256"] != straight["weights_sha256"]


def test_want_cpu_and_world_size_guard(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert want_cpu() is True

    class Lone:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="want_cpu"):
        check_world_size(Lone())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world_size(Lone())


def _run_toy(out: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for key in ("TOY_CRASH_AT", "TOY_CRASH_IN_SAVE", "TOY_CRASH_MODE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if key not in (env_extra or {}):
            env.pop(key, None)
    return subprocess.run(
        [
            sys.executable,
            str(TOY),
            "--out",
            str(out),
            "--steps",
            "15",
            "--checkpoint-every",
            "5",
            "--keep-last",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_crash_then_resume_subprocess(tmp_path):
    """A process that dies (os._exit) in step 7, then dies while saving step 10, finishes on the third
    run with the weights of an uninterrupted run."""
    ref = _run_toy(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    ref_info = json.loads((tmp_path / "ref" / "rank-0.json").read_text())

    out = tmp_path / "crashy"
    t0 = time.perf_counter()
    first = _run_toy(out, {"TOY_CRASH_AT": "7"})
    assert first.returncode == 1
    assert not (out / "rank-0.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000005"]

    second = _run_toy(out, {"TOY_CRASH_IN_SAVE": "10"})
    assert second.returncode == 1
    # the step-10 save was complete in .tmp-step-000010 but never renamed: not a checkpoint
    assert (out / "checkpoints" / ".tmp-step-000010" / "COMPLETE").exists()
    assert ckpt.latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-000005"

    third = _run_toy(out)
    assert third.returncode == 0, third.stderr
    info = json.loads((out / "rank-0.json").read_text())
    assert info["start_step"] == 5
    assert info["resumed_from"].endswith("step-000005")
    assert info["weights_sha256"] == ref_info["weights_sha256"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000010", "step-000015"]
    a = torch.load(out / "weights-rank0.pt")
    b = torch.load(tmp_path / "ref" / "weights-rank0.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    print(f"crash/resume cycle of 3 runs: {time.perf_counter() - t0:.1f} s")
