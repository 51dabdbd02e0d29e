"""The accelerate profiles in infra/accelerate/, and a real 2-process data-parallel run on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "infra" / "accelerate"
TOY = ROOT / "tests" / "toy_train.py"


def _launch_args(*argv: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*argv, str(TOY)])
    return _validate_launch_command(args)


@pytest.mark.parametrize("name", ["cpu", "multi_cpu", "multi_gpu", "multi_node"])
def test_profile_is_a_valid_accelerate_config_with_usage_header(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = PROFILES / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file infra/accelerate/" in text
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys would fail here
    raw = yaml.safe_load(text)
    assert config.num_processes == raw["num_processes"]


def test_profile_settings():
    from accelerate.utils import DistributedType

    cpu, _, _ = _launch_args("--config_file", str(PROFILES / "cpu.yaml"))
    assert (cpu.num_processes, cpu.multi_gpu, cpu.use_cpu, cpu.mixed_precision) == (1, False, True, "no")

    # multi_cpu goes through the torchrun launcher (multi_gpu=True): 2 processes really start
    mcpu, defaults, _ = _launch_args("--config_file", str(PROFILES / "multi_cpu.yaml"))
    assert defaults.distributed_type == DistributedType.MULTI_GPU
    assert (mcpu.num_processes, mcpu.num_machines, mcpu.multi_gpu, mcpu.mixed_precision) == (2, 1, True, "no")
    assert mcpu.main_process_port == 0  # a free port is picked

    gpu, _, _ = _launch_args("--config_file", str(PROFILES / "multi_gpu.yaml"))
    assert (gpu.num_processes, gpu.num_machines, gpu.multi_gpu, gpu.mixed_precision) == (4, 1, True, "bf16")


def test_multi_node_profile_with_rank_override():
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _launch_args(
        "--config_file",
        str(PROFILES / "multi_node.yaml"),
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.1.2.3",
    )
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (8, 2, "bf16")
    env = prepare_multi_gpu_env(args)  # rank 1 does not check the port locally
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("4", "2", 1)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.1.2.3:29500")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    raw = yaml.safe_load((PROFILES / "multi_node.yaml").read_text())
    assert "PLACEHOLDER" in raw["main_process_ip"]  # never silently a real address


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def _env(tmp_path: Path, db: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "MLFLOW_RUN_ID",
            "WORLD_SIZE",
            "RANK",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "ACCELERATE_USE_CPU",
            "OMP_NUM_THREADS",
        )
        and not k.startswith("TOY_")
    }
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
            "TOY_ARTIFACTS": str(tmp_path / "mlartifacts"),
            "GIT_PYTHON_REFRESH": "quiet",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def _launch(profile: str, out: Path, env: dict[str, str], *script_args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(PROFILES / f"{profile}.yaml"),
        str(TOY),
        "--out",
        str(out),
        *script_args,
    ]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


def _parent_run(db: Path, tmp_path: Path) -> str:
    """The run a flow (or `singer train`) creates before launching the workers."""
    from singer.config import Config, TrackingConfig
    from singer.release import tracking

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    try:
        cfg = Config(
            tracking=TrackingConfig(artifact_location=str(tmp_path / "mlartifacts"), experiment="toy")
        )
        experiment_id = tracking.setup_mlflow(cfg.tracking)
        import mlflow

        return mlflow.MlflowClient().create_run(experiment_id, tags={"created_by": "test"}).info.run_id
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


@pytest.mark.slow
def test_two_cpu_processes_sync_gradients_and_log_once(tmp_path, template_db):
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    run_id = _parent_run(db, tmp_path)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = _launch("multi_cpu", out, _env(tmp_path, db, MLFLOW_RUN_ID=run_id), "--mlflow", "--steps", "10")
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    ranks = [json.loads((out / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    # DDP averaged the gradients: both ranks hold the same weights (their data and dropout differ)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # only rank 0 talked to MLflow, into the run it was handed
    assert ranks[0]["mlflow_run_id"] == run_id and ranks[1]["mlflow_run_id"] is None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))  # once per step, not once per rank
    stored = client.get_run(run_id)
    assert stored.data.tags["created_by"] == "test" and stored.data.tags["stage"] == "toy"
    assert stored.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert artifacts == {"checkpoints/step-000005", "checkpoints/step-000010"}
    saved = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoints/step-000010")}
    assert {"random_states_0.pkl", "random_states_1.pkl", "COMPLETE", "model.safetensors"} <= saved
    marker = json.loads((out / "checkpoints" / "step-000010" / "COMPLETE").read_text())
    assert marker["num_processes"] == 2
    print(f"2-process launch, 10 steps, 2 checkpoints, MLflow: {elapsed:.1f} s")


@pytest.mark.slow
def test_two_cpu_processes_crash_and_resume(tmp_path, template_db):
    """Both ranks die in step 7; the relaunch resumes from step 5 (each rank's own RNG state) and ends
    with the weights of an uninterrupted 2-process run."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    env = _env(tmp_path, db)
    ref = _launch("multi_cpu", tmp_path / "ref", env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = _launch("multi_cpu", tmp_path / "out", {**env, "TOY_CRASH_AT": "7"})
    assert crashed.returncode != 0
    t0 = time.perf_counter()
    resumed = _launch("multi_cpu", tmp_path / "out", env)
    elapsed = time.perf_counter() - t0
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "rank-0.json").read_text())["weights_sha256"]
    for rank in (0, 1):
        info = json.loads((tmp_path / "out" / f"rank-{rank}.json").read_text())
        assert info["start_step"] == 5 and info["weights_sha256"] == expected
    print(f"2-process resume run: {elapsed:.1f} s")


@pytest.mark.slow
def test_cpu_profile_runs_one_process(tmp_path, template_db):
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    res = _launch("cpu", tmp_path / "out", _env(tmp_path, db), "--steps", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "rank-0.json").read_text())
    assert (info["world"], info["distributed_type"]) == (1, "DistributedType.NO")
    assert not (tmp_path / "out" / "rank-1.json").exists()
