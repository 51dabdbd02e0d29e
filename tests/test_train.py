"""Training end to end on a tiny synthetic corpus: through `python -m singer.train` and `accelerate launch`,
resumed after a kill, logged to a real MLflow store."""

import json
import math
import os
import re
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
    from singer.train.checkpoint import list_checkpoints

    args = [sys.executable, "-m", "singer.train", "-S", "train.steps=6", "-S", "train.checkpoint_every=2", *FAST]
    log = project_copy.parent / "killed.log"  # a file, not a pipe: a full pipe would stall the trainer
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=project_copy, env=env_for(project_copy), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        checkpoints = project_copy / "checkpoints"
        deadline = time.time() + 300
        seen: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            seen = list(checkpoints.glob("full-*/step-000004"))  # two whole checkpoints, two steps to go
            if seen:
                break
            time.sleep(0.1)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the state it was killed in: mid-run, two whole checkpoints, none of the last step, no model
    assert seen, "no checkpoint step-000004 within 300 s:\n" + log.read_text()[-3000:]
    assert alive, "training ended before it could be killed:\n" + log.read_text()[-3000:]
    run_dir = seen[0].parent
    whole = [int(p.name.removeprefix("step-")) for p in list_checkpoints(run_dir)]
    assert whole == [2, 4], whole
    killed_at = 4  # the newest whole checkpoint: resuming from step 2 would redo work (and pass a weaker test)
    assert not (project_copy / "models/full").exists()
    assert not (project_copy / "metrics/train.json").exists()

    done = subprocess.run(args, cwd=project_copy, env=env_for(project_copy), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"resumed from \S*{run_dir.name}/step-{killed_at:06d} at step {killed_at}\b",
                     done.stdout + done.stderr), done.stdout + done.stderr
    metrics = json.loads((project_copy / "metrics/train.json").read_text())
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == killed_at
    assert metrics["run_key"] == run_dir.name and metrics["model_dir"] == "models/full"
    assert [int(p.name.removeprefix("step-")) for p in list_checkpoints(run_dir)] == [2, 4, 6]
    index = json.loads((project_copy / "models/full/model_index.json").read_text())
    assert index["_class_name"] == "SingerPipeline"
    assert {"vae", "reference_unet", "denoising_unet", "face_locator", "face_encoder", "audio_encoder",
            "scheduler"} <= set(index)
    # the resumed run logs into the same MLflow run as the killed one
    import mlflow

    # an explicit client: an earlier in-process test may have set mlflow's global tracking URI
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("singer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == metrics["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(m.value) and m.value > 0 for m in history)
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoints")}
    assert logged == {"checkpoints/step-000002", "checkpoints/step-000004", "checkpoints/step-000006"}


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
    from singer.config import load_config
    from singer.release.lineage import data_hash

    cfg = load_config()
    assert run.data.params["model.msm"] == "True" and run.data.params["train.steps"] == "4"
    tags = run.data.tags
    assert tags["stage"] == "train" and tags["variant"] == "full" and tags["run_key"] == metrics["run_key"]
    # compute.dtype as written (auto) in the params, what it resolved to on this machine in the tags
    from singer.compute import dtype_name, resolve_dtype

    assert run.data.params["compute.dtype"] == cfg.compute.dtype and run.data.params["compute.compile"] == "False"
    assert tags["compute_dtype"] == dtype_name(resolve_dtype(cfg.compute.dtype, "cpu", training=True))
    assert tags["data_hash"] == data_hash([cfg.paths.crops, cfg.paths.split])  # this data, hashed now
    assert tags["data_hash"] != data_hash([project_copy / "no-crops", project_copy / "no-split"])
    # the metrics' latest values are the last step's
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert run.data.metrics["loss"] == pytest.approx(max(loss, key=lambda m: m.step).value)
    assert run.data.metrics["final_loss"] == pytest.approx(metrics["final_loss"], abs=1e-6)
    assert metrics["final_loss"] == pytest.approx(sum(m.value for m in loss) / 4, abs=1e-5)
    assert run.data.metrics["lr"] == pytest.approx(cfg.train.lr)
    assert math.isfinite(run.data.metrics["grad_norm"]) and run.data.metrics["grad_norm"] > 0
    assert run.data.metrics["samples_per_second"] > 0
    assert run.info.run_name == "train-full"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"checkpoints", "samples", "plots"}
    steps = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert steps == {"checkpoints/step-000002", "checkpoints/step-000004"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss.png"]
    # the model is the run's logged model (MLflow 3): the served pyfunc around the save_pretrained folder
    model = client.get_logged_model(metrics["mlflow_model_id"])
    assert model.source_run_id == run.info.run_id and model.tags["variant"] == "full"
    assert model.tags["data_hash"] == tags["data_hash"]
    local_model = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}", dst_path=str(project_copy / "m"),
                                                           tracking_uri=client.tracking_uri))
    logged_index = next(local_model.rglob("model_index.json"))
    assert logged_index.read_text() == (project_copy / "models/full/model_index.json").read_text()
    assert (local_model / "input_example.json").is_file() and (local_model / "code" / "singer").is_dir()
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    # validate_every=4 of 4 steps: one sample, and its mouth-opening plot
    assert samples == ["samples/sample-step-000004.mp4", "samples/sample-step-000004.png"]
    local = client.download_artifacts(run.info.run_id, samples[0], str(project_copy))
    from singer.media import probe

    info = probe(local)  # reference | ground truth | generated, 64^2 each shown at 256^2
    assert info.n_frames == 8 and (info.width, info.height) == (3 * 256, 256) and info.has_audio


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


@pytest.mark.slow
def test_paper_protocol_stage_two_trains_only_the_audio_path_and_the_arm(project_copy):
    """benchmarks/protocols.py's stage 2: a no_both model as the release (`model.pretrained`), the full arm with
    only the audio encoder, the audio projection, MSM and SFM trainable. The UNets, the face encoder and the
    face locator come out bit-equal to the base; the trainable groups moved; MSM and SFM left their identity."""
    import torch

    from singer.pipeline import SingerPipeline

    def train(*overrides):
        done = subprocess.run([sys.executable, "-m", "singer.train", "-S", "train.steps=2", *FAST, *overrides],
                              cwd=project_copy, env=env_for(project_copy), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    train("-S", "train.variant=no_both")
    base_dir = project_copy / "models/no_both"
    train("-S", "train.variant=full", "-S", f"model.pretrained={base_dir}", "-S", "train.lr=1e-2",
          "-S", "train.trainable=[audio_encoder,audio_projection,msm,sfm]", "-S", "train.models_dir=stage2")
    base = SingerPipeline.from_pretrained(base_dir).to_model().state_dict()
    tuned = SingerPipeline.from_pretrained(project_copy / "stage2/full").to_model().state_dict()
    report = json.loads((project_copy / "metrics/train.json").read_text())

    frozen = ("reference_unet.", "denoising_unet.", "face_encoder.", "face_locator.")
    compared = [k for k in tuned if k.startswith(frozen) and not k.startswith("denoising_unet.sfm.")]
    assert len(compared) > 100 and all(torch.equal(tuned[k], base[k]) for k in compared)
    for group in ("audio_encoder.wav2vec2.", "audio_encoder.projection."):
        moved = [k for k in base if k.startswith(group) and not torch.equal(tuned[k], base[k])]
        assert moved, group
    new = [k for k in tuned if k.startswith(("msm.", "denoising_unet.sfm."))]
    assert new and not any(k in base for k in new)
    fresh = SingerPipeline.from_model(_fresh_full_model(project_copy), 64).to_model().state_dict()
    assert any(not torch.equal(tuned[k], fresh[k]) for k in new if k.startswith("msm."))
    assert any(not torch.equal(tuned[k], fresh[k]) for k in new if k.startswith("denoising_unet.sfm."))
    n_audio = sum(v.numel() for k, v in tuned.items() if k.startswith("audio_encoder.") and "masked_spec" not in k)
    assert report["trainable_parameters"] <= n_audio + sum(tuned[k].numel() for k in new)


def _fresh_full_model(project: Path):
    """A fresh full model of the project's parameters: MSM and SFM at their identity initialisation."""
    from singer.config import load_config
    from singer.models.singer import SingerModel

    cfg = load_config(project / "params.yaml", overrides=["train.variant=full"])
    return SingerModel.build(cfg.model, cfg.crop.resolution)
