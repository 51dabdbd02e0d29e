"""Training end to end on a tiny synthetic corpus: through `python -m singer.train` and `accelerate launch`,
resumed after a kill, logged to a real MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
FAST = ["-S", "train.validate_every=0", "-S", "train.log_every=1"]


def env_for(project: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(project_copy):
    args = [sys.executable, "-m", "singer.train", "-S", "train.steps=6", "-S", "train.checkpoint_every=2", *FAST]
    proc = subprocess.Popen(args, cwd=project_copy, env=env_for(project_copy), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpoints = project_copy / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("full-*/step-000002")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (project_copy / "models/full").exists()

    done = subprocess.run(args, cwd=project_copy, env=env_for(project_copy), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout + done.stderr
    metrics = json.loads((project_copy / "metrics/train.json").read_text())
    assert metrics["steps"] == 6
    assert (project_copy / "models/full/model_index.json").exists()
    # the resumed run logs into the same MLflow run as the killed one
    import mlflow

    # an explicit client: an earlier in-process test may have set mlflow's global tracking URI
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("singer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == metrics["mlflow_run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_training_logs_params_checkpoints_samples_and_the_model(project_copy):
    from typer.testing import CliRunner

    from singer.cli import app

    result = CliRunner().invoke(app, ["train", "--no-launch", "-S", "train.steps=4", "-S", "train.checkpoint_every=2",
                                      "-S", "train.validate_every=4", "-S", "train.validate_frames=8",
                                      "-S", "train.validate_inference_steps=2"])
    assert result.exit_code == 0, result.output
    import mlflow

    metrics = json.loads((project_copy / "metrics/train.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.params["model.msm"] == "True" and run.data.params["train.steps"] == "4"
    assert run.data.tags["stage"] == "train" and "data_hash" in run.data.tags
    assert {"loss", "lr", "grad_norm", "samples_per_second"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "samples", "model", "plots"} <= artifacts
    steps = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert steps == {"checkpoints/step-000002", "checkpoints/step-000004"}
    sample = client.list_artifacts(run.info.run_id, "samples")[0].path
    local = client.download_artifacts(run.info.run_id, sample, str(project_copy))
    from singer.media import probe

    info = probe(local)
    assert info.n_frames == 8 and info.width == 2 * 64 and info.has_audio


@pytest.mark.slow
def test_two_process_accelerate_launch(project_copy):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "infra/accelerate/multi_cpu.yaml"),
           "-m", "singer.train", "-S", "train.steps=2", "-S", "train.checkpoint_every=2", "-S", "train.batch_size=1",
           *FAST]
    done = subprocess.run(cmd, cwd=project_copy, env=env_for(project_copy), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads(next((project_copy / "checkpoints").glob("full-*/step-000002/trainer_state.json")).read_text())
    assert state["num_processes"] == 2
    assert json.loads((project_copy / "metrics/train.json").read_text())["steps"] == 2
