"""MLflow tracking (singer.release.tracking, lineage) against a real SQLite store in tmp, and the training media
(singer.media.sample_video, singer.train.media_log)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from singer.config import Config, TrackingConfig
from singer.release import lineage, tracking

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An initialised MLflow SQLite database (creating one runs migrations for ~5 s; copying is instant)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def ml(tmp_path, monkeypatch, mlflow_template_db):
    """A fresh tracking store in tmp_path; yields a Config whose artifacts go to tmp_path/mlartifacts."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    tracking._reset_failures()
    cfg = Config(tracking=TrackingConfig(artifact_location=str(tmp_path / "mlartifacts"), experiment="test"))
    yield cfg
    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking._reset_failures()


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _artifacts(run_id: str, path: str = "") -> list[str]:
    out = []
    for item in _client().list_artifacts(run_id, path or None):
        out.extend(_artifacts(run_id, item.path) if item.is_dir else [item.path])
    return out


# ------------------------------------------------------------------------------------------ setup, params


def test_setup_resolves_uri_and_artifact_location(ml, tmp_path, monkeypatch):
    experiment_id = tracking.setup_mlflow(ml.tracking)
    experiment = _client().get_experiment(experiment_id)
    assert experiment.name == "test"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert tracking.setup_mlflow(ml.tracking) == experiment_id  # idempotent
    env = tracking.child_env("0123abc", environ={})
    assert env == {"MLFLOW_RUN_ID": "0123abc", "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri(TrackingConfig())
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # absolute: workers elsewhere find it
    assert tracking.resolve_artifact_location("s3://bucket/mlflow") == "s3://bucket/mlflow"
    assert tracking.resolve_artifact_location("./a").startswith("file:///")
    assert tracking.experiment_artifact_location("http://mlflow:5000", "./mlartifacts") is None
    assert tracking.experiment_artifact_location("http://mlflow:5000", "s3://b/p") == "s3://b/p"


def test_bad_store_fails_clearly(ml, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:hunter2@127.0.0.1:9")
    with pytest.raises(tracking.TrackingError) as err:
        tracking.setup_mlflow(ml.tracking)
    assert "not reachable" in str(err.value) and "hunter2" not in str(err.value)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/afile/sub/mlflow.db")
    with (
        pytest.raises(tracking.TrackingError, match="cannot use MLflow tracking store"),
        tracking.start_run(ml, "train"),
    ):
        pass


def test_start_run_logs_flattened_params_and_tags(ml, tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"abc")
    with tracking.start_run(ml, "train", data_paths=[data], tags={"variant": "full"}) as run:
        run_id = run.info.run_id
    stored = _client().get_run(run_id)
    params = stored.data.params
    assert params["train.lr"] == str(ml.train.lr)
    assert params["train.keep_last"] == "3"  # not mistaken for a secret
    assert params["model.block_out_channels"] == "[32, 64, 64]"
    assert params["validate.max_fps_error"] == "0.01"  # the alias, as in params.yaml
    assert params["preset"] == "tiny"
    assert len(params) == len(lineage.config_params(ml))
    tags = stored.data.tags
    assert tags["stage"] == "train" and tags["variant"] == "full"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    assert tags["git_dirty"] in ("true", "false", "unknown")
    assert tags["data_hash"] == lineage.data_hash([data])
    assert stored.info.status == "FINISHED"
    assert stored.info.experiment_id == tracking.setup_mlflow(ml.tracking)


def test_failed_block_marks_run_failed(ml):
    with pytest.raises(ValueError), tracking.start_run(ml, "train") as run:
        run_id = run.info.run_id
        raise ValueError("boom")
    assert _client().get_run(run_id).info.status == "FAILED"


def test_secrets_are_scrubbed(ml, monkeypatch):
    params = lineage.scrub_params(
        {
            "s3.secret_key": "s3cr3t",
            "db.PASSWORD": "pw",
            "hf.token": "hf_abc",
            "aws_access_key_id": "AKIA",
            "gcp.credentials_file": "/x.json",
            "openai.api_key": "sk-1",
            "train.keep_last": 3,
            "train.lr": 0.1,
            "tracking.tracking_uri": "postgresql://mlflow:hunter2@db:5432/mlflow",
            "s3.endpoint_url": "http://127.0.0.1:8333",
        }
    )
    assert params["s3.secret_key"] == params["db.PASSWORD"] == params["hf.token"] == lineage.REDACTED
    assert (
        params["aws_access_key_id"]
        == params["gcp.credentials_file"]
        == params["openai.api_key"]
        == lineage.REDACTED
    )
    assert params["train.keep_last"] == 3 and params["train.lr"] == 0.1
    assert params["tracking.tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert params["s3.endpoint_url"] == "http://127.0.0.1:8333"

    # end to end: a credential in the config is masked, and nothing from the environment is logged
    secret = "env-secret-" + os.urandom(4).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("SINGER_TEST_TOKEN", secret)
    cfg = ml.model_copy(
        update={
            "tracking": ml.tracking.model_copy(
                update={"tracking_uri": f"postgresql://mlflow:{secret}@db/mlflow"}
            )
        }
    )
    with tracking.start_run(cfg, "train") as run:
        run_id = run.info.run_id
    stored = _client().get_run(run_id).data
    assert stored.params["tracking.tracking_uri"] == "postgresql://mlflow:***@db/mlflow"
    everything = list(stored.params.items()) + list(stored.tags.items())
    assert not [kv for kv in everything if secret in kv[0] or secret in kv[1]]


def test_long_values_and_odd_keys(ml):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    cfg = ml.model_copy(
        update={"ingest": ml.ingest.model_copy(update={"sources": [f"/d/{i:05d}" for i in range(2000)]})}
    )
    params = lineage.config_params(cfg)
    assert len(params["ingest.sources"]) == MAX_PARAM_VAL_LENGTH and params["ingest.sources"].endswith("...")
    with tracking.start_run(cfg, "ingest") as run:
        run_id = run.info.run_id
    assert _client().get_run(run_id).data.params["ingest.sources"] == params["ingest.sources"]


# --------------------------------------------------------------------------------------- resume, nesting


def test_resume_run_by_id_and_env(ml, monkeypatch):
    with tracking.start_run(ml, "train") as run:
        run_id = run.info.run_id
        tracking.log_step({"loss": 1.0}, 1)
    # explicit id: same run, params not re-logged, a changed one reported in a tag
    changed = ml.model_copy(update={"train": ml.train.model_copy(update={"steps": 999})})
    with (
        pytest.warns(UserWarning, match="train.steps"),
        tracking.start_run(changed, "train", run_id=run_id) as again,
    ):
        assert again.info.run_id == run_id
        tracking.log_step({"loss": 0.5}, 2)
    stored = _client().get_run(run_id)
    assert stored.data.params["train.steps"] == str(ml.train.steps)
    assert stored.data.tags["params_changed_on_resume"] == "train.steps"
    # from the environment, as accelerate workers and flows get it; the variable stays set
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with tracking.start_run(ml, "train") as third:
        assert third.info.run_id == run_id
        tracking.log_step({"loss": 0.25}, 3)
    assert os.environ["MLFLOW_RUN_ID"] == run_id
    history = _client().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert len(_client().search_runs([tracking.setup_mlflow(ml.tracking)])) == 1


def test_nested_runs(ml, monkeypatch):
    with (
        tracking.start_run(ml, "ablate") as parent,
        tracking.start_run(ml, "train", nested=True, tags={"variant": "no_msm"}) as child,
    ):
        assert child.info.run_id != parent.info.run_id
        child_id = child.info.run_id
    assert _client().get_run(child_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    # in another process: the parent comes from MLFLOW_RUN_ID
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    with tracking.start_run(ml, "train", nested=True) as child2:
        assert child2.info.run_id not in (parent.info.run_id, child_id)
    assert _client().get_run(child2.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_non_main_process_does_nothing(ml, monkeypatch):
    monkeypatch.setattr(tracking, "is_main_process", lambda: False)
    with tracking.start_run(ml, "train") as run:
        assert run is None
        assert tracking.log_step({"loss": 1.0}, 1) is False
    monkeypatch.undo()
    assert tracking.log_step({"loss": 1.0}, 1) is False  # no active run: a no-op, no error


# ------------------------------------------------------------------------------------------- artifacts


def test_every_checkpoint_logged_while_local_keeps_last(ml, tmp_path):
    import mlflow
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from singer.train import checkpoint as ckpt

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    with tracking.start_run(ml, "train") as run:
        for step in (5, 10, 15):
            with torch.no_grad():  # "training": the weights at step s are all s
                model.weight.fill_(float(step))
                model.bias.fill_(-float(step))
            path = ckpt.save_checkpoint(
                accelerator, tmp_path / "ckpt", step, extra={"mlflow_run_id": run.info.run_id}, keep_last=1
            )
            assert tracking.log_checkpoint(path, step)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000015"]
    files = _artifacts(run.info.run_id)
    for step in (5, 10, 15):
        assert f"checkpoints/step-{step:06d}/COMPLETE" in files
        # each logged checkpoint is the one of its step, not the folder as it was later (or earlier)
        got = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                       artifact_path=f"checkpoints/step-{step:06d}",
                                                       dst_path=str(tmp_path / f"dl-{step}")))
        weights = load_file(got / "model.safetensors")
        assert torch.equal(weights["weight"], torch.full((2, 2), float(step)))
        assert torch.equal(weights["bias"], torch.full((2,), -float(step)))
        state = json.loads((got / ckpt.TRAINER_STATE).read_text())
        assert state["step"] == step and state["mlflow_run_id"] == run.info.run_id
    assert tracking.failures() == {}


def test_video_figure_table_and_model_artifacts(ml, tmp_path):
    from matplotlib.figure import Figure

    from singer.media.sample_video import write_sample_video
    from singer.media.video import probe
    from singer.train.media_log import loss_plot

    rng = np.random.default_rng(0)
    gt = rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    video = write_sample_video(
        tmp_path / "sample.mp4",
        gt,
        255 - gt,
        fps=25,
        audio=0.1 * np.sin(np.linspace(0, 500, 6400)).astype(np.float32),
        sample_rate=16000,
    )
    plot = loss_plot([(i, 1.0 / i) for i in range(1, 30)], tmp_path / "loss.png")
    fig = Figure()
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    import pandas as pd

    with tracking.start_run(ml, "evaluate") as run:
        assert tracking.log_video(video)
        assert tracking.log_figure(fig, "plots/curve.png")
        assert tracking.log_figure(plot, "plots/loss.png")
        assert tracking.log_table(pd.DataFrame({"clip": ["a", "b"], "ssim": [0.5, 0.6]}), "per_clip.json")
        assert tracking.log_table({"ssim": 0.55, "psnr": 20.0}, "summary.json")
    files = set(_artifacts(run.info.run_id))
    assert {
        "samples/sample.mp4",
        "plots/curve.png",
        "plots/loss.png",
        "per_clip.json",
        "summary.json",
    } <= files
    local = _client().download_artifacts(run.info.run_id, "samples/sample.mp4", str(tmp_path / "dl"))
    info = probe(local)
    # 32^2 panels scaled x8 to 256^2, ground truth | generated
    assert (info.width, info.height, info.n_frames, info.has_audio) == (512, 256, 10, True)


def test_failing_artifact_store_warns_once_and_training_continues(ml, tmp_path):
    (tmp_path / "blocker").write_text("a file where the artifact folder should be")
    cfg = ml.model_copy(
        update={
            "tracking": ml.tracking.model_copy(
                update={"artifact_location": str(tmp_path / "blocker" / "artifacts"), "experiment": "broken"}
            )
        }
    )
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"123")
    with tracking.start_run(cfg, "train") as run:
        with pytest.warns(RuntimeWarning, match="checkpoint logging failed"):
            assert tracking.log_checkpoint(folder, 5) is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second failure of the same kind does not warn again
            assert tracking.log_checkpoint(folder, 10) is False
        with pytest.warns(RuntimeWarning, match="video logging failed"):
            assert tracking.log_video(folder / "model.safetensors") is False
        assert tracking.log_step({"loss": 0.5}, 1)  # metrics go to the database, which works
    assert tracking.failures() == {"checkpoint": 2, "video": 1}
    assert _client().get_run(run.info.run_id).data.metrics["loss"] == 0.5


def test_failing_metrics_warn_and_cool_down(ml, monkeypatch):
    import mlflow

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("server down")

    with tracking.start_run(ml, "train") as run:
        with monkeypatch.context() as patched:
            patched.setattr(mlflow, "log_metrics", broken)
            with pytest.warns(RuntimeWarning, match="metrics logging failed"):
                assert tracking.log_step({"loss": 1.0}, 1) is False
            assert tracking.log_step({"loss": 1.0}, 2) is False  # skipped: cooling down, no second call
            assert len(calls) == 1
        monkeypatch.setattr(tracking, "METRICS_COOLDOWN_S", 0.0)
        tracking._cooldown_until.clear()  # the server is back
        assert tracking.log_step({"loss": 1.0, "bad": "not a number"}, 3) is False  # still no exception
        assert tracking.log_step({"loss": 1.0}, 4) is True
    assert tracking.failures()["metrics"] == 3
    assert [m.step for m in _client().get_metric_history(run.info.run_id, "loss")] == [4]


# ------------------------------------------------------------------------------------------ data hash


def test_data_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "f.bin").write_bytes(b"x")
    h1 = lineage.data_hash(["d", "f.bin"])
    assert h1 == lineage.data_hash(["f.bin", "d"])  # order does not matter
    (tmp_path / "d" / "a.txt").write_text("b")
    h2 = lineage.data_hash(["d", "f.bin"])
    assert h2 != h1
    assert lineage.data_hash(["missing"]) != lineage.data_hash(["f.bin"])
    # with a dvc.lock entry the recorded md5 is used, not the content
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  split:\n    cmd: x\n    outs:\n    - path: d\n      md5: abc.dir\n      size: 1\n"
    )
    h3 = lineage.data_hash(["d", "f.bin"])
    (tmp_path / "d" / "a.txt").write_text("c")
    assert lineage.data_hash(["d", "f.bin"]) == h3
    assert lineage.data_hash(["d", "f.bin"], dvc_lock=None) != h3


# ------------------------------------------------------------------------------------------------ media


def test_side_by_side_and_loss_plot(tmp_path):
    from singer.media.sample_video import side_by_side
    from singer.train.media_log import loss_plot

    rng = np.random.default_rng(0)
    gt = rng.integers(0, 255, (3, 64, 48, 3), dtype=np.uint8)
    gen = 255 - gt
    reference = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    both = side_by_side(gt, gen, reference=reference)  # 64 px tall: x4 to 256
    assert both.shape == (3, 256, 3 * 4 * 48, 3) and both.dtype == np.uint8
    panels = both.reshape(3, 256, 3, 4 * 48, 3)
    for i, want in enumerate((np.broadcast_to(reference, gt.shape), gt, gen)):  # nearest neighbour: exact
        assert np.array_equal(panels[:, ::4, i, ::4], want) and np.array_equal(panels[:, 3::4, i, 3::4], want)
    assert side_by_side(gt, gen, min_panel=64).shape == (3, 64, 96, 3)  # tall enough already: as it is
    assert side_by_side(gt[:, :50], gen[:, :50], min_panel=256).shape[1] == 300  # a whole factor: ceil(256/50)
    with pytest.raises(ValueError):
        side_by_side(gt, gen[:2])
    with pytest.raises(ValueError):
        side_by_side(gt.astype(np.float32), gen)
    with pytest.raises(ValueError, match="reference"):
        side_by_side(gt, gen, reference=reference[:32])
    path = loss_plot([(s, float(np.exp(-s / 20))) for s in range(100)], tmp_path / "plots" / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loss_plot([], tmp_path / "empty.png").exists()
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_s3_artifact_store_and_outage(ml, tmp_path, s3_bucket, s3_env):
    """Artifacts on S3 (SeaweedFS, via MLFLOW_S3_ENDPOINT_URL); while the server is down, logging warns,
    returns False and training goes on; afterwards it works again."""
    import time

    cfg = ml.model_copy(
        update={
            "tracking": ml.tracking.model_copy(
                update={"artifact_location": f"s3://{s3_bucket}/mlflow", "experiment": "s3"}
            )
        }
    )
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    with tracking.start_run(cfg, "train") as run:
        assert run.info.artifact_uri.startswith(f"s3://{s3_bucket}/mlflow/")
        assert tracking.log_checkpoint(folder, 5)
        with s3_env.stopped():
            t0 = time.perf_counter()
            with pytest.warns(RuntimeWarning, match="checkpoint logging failed"):
                assert tracking.log_checkpoint(folder, 10) is False
            outage_s = time.perf_counter() - t0
            assert tracking.log_step({"loss": 1.0}, 10)  # the SQLite store is unaffected
        s3_env.wait_serving(s3_bucket)  # back, but reads and writes work only once its volume is back too
        assert tracking.log_checkpoint(folder, 15)
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.endswith("checkpoints/step-000005/model.safetensors") for k in keys)
    assert any(k.endswith("checkpoints/step-000015/model.safetensors") for k in keys)
    assert not any("step-000010" in k for k in keys)
    assert tracking.failures() == {"checkpoint": 1}
    print(f"one failed checkpoint upload while S3 was down took {outage_s:.1f} s")


# ------------------------------------------------------------- checkpoint retention (singer.release.retention)


def _log_steps(ml, tmp_path, steps, retention):
    folder = tmp_path / "one"
    folder.mkdir(exist_ok=True)
    with tracking.start_run(ml, "train") as run:
        for step in steps:
            (folder / "weights.bin").write_bytes(bytes([step]))
            assert tracking.log_checkpoint(folder, step, retention=retention)
    return run.info.run_id


def test_retention_keeps_the_newest_n_checkpoints(ml, tmp_path):
    run_id = _log_steps(ml, tmp_path, [5, 10, 15, 20], retention=2)
    logged = sorted(a.path for a in _client().list_artifacts(run_id, "checkpoints"))
    assert logged == ["checkpoints/step-000015", "checkpoints/step-000020"]
    assert tracking.failures() == {}


def test_no_retention_keeps_every_checkpoint(ml, tmp_path):
    run_id = _log_steps(ml, tmp_path, [5, 10, 15], retention=None)
    assert len(_client().list_artifacts(run_id, "checkpoints")) == 3


def test_a_store_that_cannot_delete_keeps_everything_and_says_so(ml, tmp_path, monkeypatch):
    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    monkeypatch.setattr(LocalArtifactRepository, "delete_artifacts", ArtifactRepository.delete_artifacts)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = _log_steps(ml, tmp_path, [5, 10, 15], retention=1)
    assert len(_client().list_artifacts(run_id, "checkpoints")) == 3
    said = [str(w.message) for w in caught if "checkpoint_retention" in str(w.message)]
    assert len(said) == 1 and "keeps every checkpoint" in said[0]


def test_retention_is_a_positive_count():
    from pydantic import ValidationError

    from singer.config import load_config

    with pytest.raises(ValidationError):
        load_config(overrides=["tracking.checkpoint_retention=0"])
    assert load_config().tracking.checkpoint_retention is None
