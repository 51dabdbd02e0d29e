"""One line from data to release, walked through MlflowClient after a tiny `dvc repro train evaluate` +
`singer register` + `singer release`: the champion's version -> its logged model -> the training run (loss plot,
a checkpoint, a sample video a person can see, data hash, named `train-full`), with the evaluation's metrics
attached to that logged model by the run `evaluate-full`; the version's description and tags say where it came
from and leave unmeasured metrics out (their reasons in one tag)."""

from __future__ import annotations

import json

import pytest
from dvc_project import make_project, run


@pytest.fixture(scope="module")
def released(tiny_project, tmp_path_factory):
    """A git + DVC copy of the project whose train and evaluate stages ran, then register and release."""
    repo = make_project(tiny_project, tmp_path_factory.mktemp("lineage") / "repo", {
        "train": {"steps": 2, "batch_size": 1, "checkpoint_every": 2, "validate_every": 2, "validate_frames": 8,
                  "validate_inference_steps": 1},
        "evaluate": {"max_clips": 1, "inference_steps": 1, "identity_max_frames": 2, "cpbd_every": 10,
                     "num_workers": 0, "sample_videos": 1},
        # two steps draw no face yet, so lmd / mouth_correlation are unavailable: the release gate may not
        # require them here (that refusal is tests/test_registry.py's)
        "release": {"require_metrics": []}})
    ignored = ("data", "mlflow.db", "mlartifacts", "checkpoints", ".dvc-site-cache")  # at the repository's root
    (repo / ".gitignore").write_text("".join(f"/{name}\n" for name in ignored))
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "the code the model is trained with"], repo)
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    run(["dvc", "repro", "train", "evaluate"], repo)
    done = run(["singer", "register"], repo)
    registered = done.stdout + done.stderr  # the console writes to stderr
    run(["singer", "release"], repo)
    return repo, commit, registered


@pytest.mark.slow
def test_registry_to_training_run_is_one_click_each(released, tmp_path):
    import mlflow

    from singer.media import probe

    repo, commit, registered = released
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    trained = json.loads((repo / "metrics" / "train.json").read_text())
    evaluated = json.loads((repo / "metrics" / "eval.json").read_text())

    # registry -> version -> logged model -> training run
    version = client.get_model_version_by_alias("singer", "champion")
    assert version.source == f"models:/{trained['mlflow_model_id']}"
    logged = client.get_logged_model(trained["mlflow_model_id"])
    assert logged.source_run_id == version.run_id == trained["mlflow_run_id"]
    train_run = client.get_run(logged.source_run_id)
    assert train_run.info.run_name == "train-full" and train_run.data.tags["stage"] == "train"
    assert train_run.data.tags["registered_version"] == f"singer/{version.version}"
    assert train_run.data.tags["released_as"] == f"singer/{version.version} champion"
    assert logged.tags["variant"] == "full" and logged.tags["data_hash"] == train_run.data.tags["data_hash"]

    # the training run has its loss plot, a checkpoint and a sample video a person can see, with its mouth plot
    def files(run_id: str, path: str = "") -> set[str]:
        out = set()
        for item in client.list_artifacts(run_id, path or None):
            out |= files(run_id, item.path) if item.is_dir else {item.path}
        return out

    artifacts = files(train_run.info.run_id)
    assert {"plots/loss.png", "samples/sample-step-000002.mp4", "samples/sample-step-000002.png"} <= artifacts
    assert any(p.startswith("checkpoints/step-000002/") for p in artifacts)
    video = probe(client.download_artifacts(train_run.info.run_id, "samples/sample-step-000002.mp4", str(tmp_path)))
    assert (video.width, video.height, video.n_frames, video.has_audio) == (3 * 256, 256, 8, True)  # ref|gt|gen
    assert "loss" in train_run.data.metrics and "data_hash" in train_run.data.tags

    # the evaluation's metrics are attached to that logged model, from the run evaluate-full
    on_model = {m.key: m for m in logged.metrics}
    assert on_model["ssim"].value == pytest.approx(evaluated["ssim"])
    assert on_model["psnr"].value == pytest.approx(evaluated["psnr"])
    assert set(on_model) >= {k for k, v in evaluated.items() if isinstance(v, float)}
    eval_run = client.get_run(on_model["ssim"].run_id)
    assert eval_run.info.run_name == "evaluate-full" and eval_run.data.tags["stage"] == "evaluate"
    assert eval_run.data.tags["model_id"] == logged.model_id
    eval_files = files(eval_run.info.run_id, "samples")
    assert {p.rsplit(".", 1)[1] for p in eval_files} == {"mp4", "png"}

    # the version says where it came from; what was not measured is absent, its reason in one tag
    tags = version.tags
    assert "null" not in tags.values() and not {"metric.notes", "metric.unavailable", "metric.n_clips"} & set(tags)
    assert float(tags["metric.ssim"]) == pytest.approx(evaluated["ssim"])
    for name, reason in evaluated["unavailable"].items():  # e.g. LSE-C: no SyncNet weights given ...
        key = name.lower().replace("-", "_")
        assert f"metric.{key}" not in tags and f"{key}: {reason}" in tags["unavailable"]
    assert tags["git_commit"] == commit and tags["data_hash"] == train_run.data.tags["data_hash"]
    text = version.description
    assert train_run.data.tags["data_hash"][:12] in text and commit[:12] in text and "`full`" in text
    assert f"ssim {evaluated['ssim']:.4g}" in text and "lse_c (" in text

    # the experiment is model training, and the CLI says where the version is in the UI
    experiment = client.get_experiment(train_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # (in the UI's model-training mode: MLflow 3.17's UI opens in GenAI mode whatever the experiment's kind)
    assert (f"http://127.0.0.1:5000/#/models/singer/versions/{version.version}?workflowType=machine_learning"
            in registered)


@pytest.mark.slow
def test_flow_artifact_links_point_at_the_version_run_and_model(released):
    from flows.pipeline import links_markdown, mlflow_links

    repo, _, _ = released
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    trained = json.loads((repo / "metrics" / "train.json").read_text())
    links = dict((text.split(" ")[0], url) for text, url in mlflow_links(uri, model="singer", version="1"))
    mode = "?workflowType=machine_learning"
    assert links["registered"] == f"http://127.0.0.1:5000/#/models/singer/versions/1{mode}"
    assert links["train"].endswith(f"/runs/{trained['mlflow_run_id']}{mode}")
    assert links["logged"].endswith(f"/models/{trained['mlflow_model_id']}{mode}")
    assert "mlflow ui --backend-store-uri" in links_markdown(uri, list(links.items()))
