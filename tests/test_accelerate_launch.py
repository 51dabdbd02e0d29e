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


# --------------------------------------------------------------------------------- two machines, one host


def _two_machine_profile(tmp_path: Path) -> Path:
    """infra/accelerate/multi_node.yaml as two CPU "machines" on this host: the main node's address and port
    overridden, one process per machine (num_processes is the total), CPU instead of GPUs."""
    import socket

    profile = yaml.safe_load((PROFILES / "multi_node.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile.update(main_process_ip="127.0.0.1", main_process_port=port, num_processes=2, use_cpu=True,
                   mixed_precision="no")
    profile.pop("gpu_ids", None)
    assert profile["num_machines"] == 2 and profile["rdzv_backend"] == "static"
    path = tmp_path / "two_machines.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def _launch_machines(profile: Path, out: Path, env: dict[str, str], rank_env: dict[int, dict[str, str]] | None = None,
                     *script_args: str, timeout: float = 300) -> list[tuple[int, float, str]]:
    """`accelerate launch --machine_rank r` for r = 0, 1 at once (each as its own machine would run it);
    [(exit code, seconds until it exited, output)] per machine."""
    procs, t0 = [], time.perf_counter()
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(profile), "--machine_rank",
               str(rank), str(TOY), "--out", str(out), *script_args]
        procs.append(subprocess.Popen(cmd, env={**env, **(rank_env or {}).get(rank, {})}, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            raise AssertionError(f"machine {procs.index(proc)} did not exit in {timeout} s:\n{output[-3000:]}") from None
        results.append((proc.returncode, time.perf_counter() - t0, output))
    return results


@pytest.mark.slow
def test_two_machines_sync_log_once_and_resume_after_losing_one(tmp_path, template_db):
    """The multi-node profile on two "machines" (two `accelerate launch --machine_rank` process groups on
    127.0.0.1): gradients synchronised (both ranks end with the weights of the one-machine 2-process run, and,
    without dropout, with those of one process taking the doubled batch), only rank 0 logs to MLflow; rank 1 dying in step 7 stops both machines (non-zero, within seconds) and a
    relaunch resumes from the step-5 checkpoint to the same weights."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    run_id = _parent_run(db, tmp_path)
    env = _env(tmp_path, db, MLFLOW_RUN_ID=run_id)  # every node gets the same run (multi_node.yaml says so)
    profile = _two_machine_profile(tmp_path)

    reference = _launch("multi_cpu", tmp_path / "one-machine", _env(tmp_path, db))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "one-machine" / "rank-0.json").read_text())["weights_sha256"]

    machines = _launch_machines(profile, tmp_path / "two", env, None, "--mlflow", "--steps", "10")
    assert [code for code, _, _ in machines] == [0, 0], machines[0][2][-2000:] + machines[1][2][-2000:]
    ranks = [json.loads((tmp_path / "two" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert all(r["world"] == 2 and r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] == expected
    a, b = (torch_load(tmp_path / "two" / f"weights-rank{i}.pt") for i in (0, 1))
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert difference == 0.0
    assert ranks[0]["mlflow_run_id"] == run_id and ranks[1]["mlflow_run_id"] is None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 11))

    # without dropout a step depends on the batch alone: 4 rows on each machine, averaged by the all-reduce,
    # is the step one process takes on the 8 rows (the sums differ in order only). With a constant lr, as
    # singer.train has: accelerate steps a prepared scheduler once per process, so a decay would run twice
    # as fast on two machines
    plain = ("--dropout", "0", "--constant-lr")
    machines = _launch_machines(profile, tmp_path / "two-no-dropout", _env(tmp_path, db), None, *plain)
    assert [code for code, _, _ in machines] == [0, 0], machines[0][2][-2000:] + machines[1][2][-2000:]
    single = subprocess.run([sys.executable, str(TOY), "--out", str(tmp_path / "one-process"), *plain],
                            env=_env(tmp_path, db), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads((tmp_path / "one-process" / "rank-0.json").read_text())["world"] == 1
    c, d = (torch_load(tmp_path / "two-no-dropout" / f"weights-rank{i}.pt") for i in (0, 1))
    one = torch_load(tmp_path / "one-process" / "weights-rank0.pt")
    assert max(float((c[k] - d[k]).abs().max()) for k in c) == 0.0
    doubled_batch = max(float((c[k] - one[k]).abs().max()) for k in c)
    assert doubled_batch < 1e-5, doubled_batch
    assert max(float((c[k] - a[k]).abs().max()) for k in c) > 1e-3  # dropout did change the other runs

    crashed = _launch_machines(profile, tmp_path / "lost", _env(tmp_path, db), {1: {"TOY_CRASH_AT": "7"}})
    assert [code != 0 for code, _, _ in crashed] == [True, True]
    stopped_within = max(seconds for _, seconds, _ in crashed)
    resumed = _launch_machines(profile, tmp_path / "lost", _env(tmp_path, db))
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][2][-2000:]
    for rank in (0, 1):
        info = json.loads((tmp_path / "lost" / f"rank-{rank}.json").read_text())
        assert info["start_step"] == 5 and info["weights_sha256"] == expected
    print(f"two machines: max parameter difference between ranks {difference}, against one process with the "
          f"doubled batch (no dropout, constant lr) {doubled_batch:.1e}; losing rank 1 in step 7 stopped "
          f"both after {stopped_within:.1f} s; the relaunch resumed from step 5")


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)
