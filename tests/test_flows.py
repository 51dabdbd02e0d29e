"""The `singer-pipeline` flow (flows/pipeline.py) and its helpers (flows/common.py, commands.py, faults.py,
overrides.py).

Fast: overrides written like `dvc exp run -S` (comments kept, unknown keys and bad values refused, params.yaml
untouched then), the transient-fault classifier, stage-name and target validation, command capture.
Slow (a real `prefect server start` per module, `dvc repro` for real):
- a stage failing with an S3 connection error is retried and recovers; a real failure fails at once with the
  tail of stderr, and a bad override fails before any stage runs;
- the whole pipeline on the tiny synthetic corpus (ingest .. evaluate, and ablate on one variant), with its
  artifacts read back from the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import prefect_harness
import pytest
import yaml
from prefect_harness import artifacts, finished_task_runs

from flows.commands import CommandFailed, CommandResult, run_command, stage_env
from flows.common import STAGES, FlowInputError, select_stages, set_repo_dir, target_overrides
from flows.faults import is_transient, retry_if_transient
from flows.overrides import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# fixtures: a real `prefect server start` for this module, and this test's client settings pointing at it
prefect_server = prefect_harness.prefect_server
prefect_api = prefect_harness.prefect_api


# ------------------------------------------------------------------------------------------- overrides


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_untouched_params_round_trip_byte_for_byte(params):
    before = params.read_text()
    assert apply_overrides(params, {}) == {}
    assert params.read_text() == before


def test_overrides_are_written_like_dvc_exp_run_and_keep_comments(params):
    from singer.config import load_config

    before = params.read_text()
    changes = apply_overrides(params, {"train.steps": 2, "evaluate.max_clips": "1", "crop.scale": 0.9,
                                       "evaluate.metrics": "[ssim, psnr]", "release.gate.lmd": 0.5})
    assert changes["train.steps"] == {"old": "<unset>", "new": 2}  # the preset's value is not in the section
    assert changes["evaluate.max_clips"] == {"old": None, "new": 1}  # strings are parsed as YAML, like -S
    after = params.read_text()
    for line in before.splitlines():  # every comment survives
        if "#" in line:
            assert line.split("#", 1)[1] in after
    assert "  max_clips: 1               # null: every test clip" in after  # value replaced, comment aligned
    assert "metrics: [ssim, psnr]" in after  # flow style, as written before
    cfg = load_config(params)
    assert (cfg.train.steps, cfg.evaluate.max_clips, cfg.crop.scale) == (2, 1, 0.9)
    assert cfg.evaluate.metrics == ["ssim", "psnr"] and cfg.release.gate["lmd"] == 0.5
    # the new key sits inside its section, before the blank line that ends it
    train_block = after.split("\ntrain:\n", 1)[1].split("\n\n", 1)[0]
    assert "  steps: 2" in train_block.splitlines()
    assert apply_overrides(params, {"train.steps": 2}) == {}  # already set: nothing changes


@pytest.mark.parametrize("overrides, message", [
    ({"train.stpes": 2}, "unknown parameter 'train.stpes': train has no 'stpes'"),
    ({"trian.steps": 2}, "params.yaml has no 'trian'"),
    ({"train.steps.x": 2}, "train.steps is a value, not a section"),
    ({"train": 2}, "names a whole section"),
    ({"train.steps": "many"}, "train.steps: Input should be a valid integer"),
    ({"train.steps": 0}, "greater than or equal to 1"),
    ({"presets.tiny.train.typo": 1}, "Extra inputs are not permitted"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
])
def test_bad_overrides_are_refused_and_leave_params_alone(params, overrides, message):
    before = params.read_text()
    with pytest.raises(FlowInputError, match=None) as err:
        apply_overrides(params, overrides)
    assert message in str(err.value)
    assert params.read_text() == before
    assert [p.name for p in params.parent.iterdir()] == ["params.yaml"]  # no temporary file left


# ------------------------------------------------------------------------------- transient faults


@pytest.mark.parametrize("text", [
    "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: \"http://127.0.0.1:8333/singer\"",
    "urllib3.exceptions.NewConnectionError: Failed to establish a new connection: [Errno 111] Connection refused",
    "botocore.exceptions.ConnectTimeoutError: Connect timeout on endpoint URL",
    "botocore.exceptions.ReadTimeoutError: Read timeout on endpoint URL",
    "An error occurred (SlowDown) when calling the PutObject operation: Please reduce your request rate.",
    "An error occurred (503) when calling the HeadObject operation: Service Unavailable",
    # what a restarted SeaweedFS answers until its volume server is back (S3 says: try again)
    "An error occurred (InternalError) when calling the PutObject operation: We encountered an internal error",
    "downloading s3://singer/raw/a.mp4 failed: InternalError: We encountered an internal error. Please try again.",
    "ERROR: failed to push data to the cloud - 503 Service Unavailable",
    "ERROR: Unable to acquire lock. Most likely another DVC process is running",
])
def test_transient_faults_are_recognised(text):
    assert is_transient(text)


@pytest.mark.parametrize("text", [
    "An error occurred (NoSuchBucket) when calling the ListObjectsV2 operation: The specified bucket does not exist",
    # a missing bucket stays missing even if the message also mentions a connection problem earlier
    "Connection refused (retrying)\nAn error occurred (NoSuchBucket) when calling the ListObjectsV2 operation",
    "An error occurred (InvalidAccessKeyId) when calling the ListBuckets operation",
    "error: ingest: Great Expectations suite failed: expect_column_values_to_be_between (fps)",
    "error: params.yaml: train.steps: Input should be greater than or equal to 1",
    "train done: final_loss=0.503 samples_per_second=0.503",  # numbers that look like status codes
    "ERROR: failed to reproduce 'evaluate': output 'eval/samples' does not exist",
    "",
])
def test_real_failures_are_not_transient(text):
    assert not is_transient(text)


def _failed(stderr: str, code: int = 1) -> CommandFailed:
    return CommandFailed("dvc repro ingest", CommandResult(["dvc"], code, 1.0, ["..."], stderr.splitlines()))


def test_retry_condition_uses_the_exception_of_the_failed_state():
    from prefect.states import Failed

    assert retry_if_transient(None, None, Failed(data=_failed("EndpointConnectionError: Could not connect")))
    assert not retry_if_transient(None, None, Failed(data=_failed("Great Expectations suite failed")))
    assert not retry_if_transient(None, None, Failed(data=ValueError("bad value")))
    # a state without the exception: its message decides
    assert retry_if_transient(None, None, Failed(message="ConnectionRefusedError: [Errno 111] Connection refused"))


def test_command_failed_says_what_and_ends_with_the_stderr_tail():
    err = _failed("\n".join(f"line {i}" for i in range(100)) + "\nERROR: the last word", code=255)
    text = str(err)
    assert text.startswith("dvc repro ingest failed with exit code 255") and "not transient" in text
    assert text.endswith("ERROR: the last word") and "line 99" in text and "line 10\n" not in text


def test_run_command_streams_lines_and_keeps_tails(tmp_path):
    script = "import sys\nprint('out 1'); print('err 1', file=sys.stderr); print(\"Running stage 'x':\"); sys.exit(3)"
    seen: list[str] = []
    import re

    result = run_command([sys.executable, "-c", script], cwd=tmp_path, env=stage_env(), log=seen.append,
                         watch=re.compile("Running stage"))
    assert result.returncode == 3 and not result.ok
    assert result.stdout_tail == ["out 1", "Running stage 'x':"] and result.stderr_tail == ["err 1"]
    assert sorted(seen) == sorted(["out 1", "err 1", "Running stage 'x':"]) and result.matched == ["Running stage 'x':"]


def test_stage_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("PATH", "/usr/bin")
    local, cluster = stage_env("local"), stage_env("cluster")
    assert "RAY_ADDRESS" not in local and cluster["RAY_ADDRESS"] == "ray://head:10001"
    for env in (local, cluster):
        assert env["DVC_NO_ANALYTICS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
        assert env["PATH"].split(os.pathsep)[0] == str(BIN)
        assert (env["MLFLOW_TRACKING_URI"], env["MLFLOW_RUN_ID"]) == ("http://mlflow:5000", "abc")


# ----------------------------------------------------------------------------------- stages, targets


def test_stage_selection_validates_and_orders():
    declared = set(STAGES)
    assert select_stages(None, declared) == list(STAGES)
    assert select_stages(None, {"ingest", "split", "ablate-run"}) == ["ingest", "split"]  # what dvc.yaml has
    assert select_stages(["evaluate", "split", "split"], declared) == ["split", "evaluate"]
    assert select_stages("train", declared) == ["train"]
    with pytest.raises(FlowInputError, match="unknown stage.*'trian'.*choose from ingest, clip"):
        select_stages(["trian"], declared)
    with pytest.raises(FlowInputError, match="'ablate' not declared in dvc.yaml"):
        select_stages(["ablate"], {"ingest", "train"})
    with pytest.raises(FlowInputError, match="no stage given"):
        select_stages([], declared)


def test_targets():
    assert target_overrides("local", {"train.steps": 3}, ["train"], environ={}) == {"train.steps": 3}
    assert target_overrides("cluster", None, ["train"], environ={}) == {"train.accelerate_profile": "multi_gpu"}
    assert target_overrides("cluster", {"train.accelerate_profile": "multi_node"}, ["train", "evaluate"],
                            environ={"RAY_ADDRESS": "ray://h:10001"}) == {"train.accelerate_profile": "multi_node"}
    with pytest.raises(FlowInputError, match="set RAY_ADDRESS"):
        target_overrides("cluster", None, ["train", "evaluate"], environ={})
    with pytest.raises(FlowInputError, match="unknown target 'gpu'"):
        target_overrides("gpu", None, ["train"], environ={})


def test_the_flow_stage_list_matches_dvc_yaml():
    declared = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert set(STAGES) - {"ablate"} <= declared  # ablate joins when the ablation stages are in dvc.yaml


def test_pull_step_enters_the_repo_or_falls_back_to_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert set_repo_dir(str(tmp_path)) == {"directory": str(tmp_path.resolve())}
    assert Path.cwd() == tmp_path.resolve()
    assert set_repo_dir("") == {"directory": str(ROOT)}  # `{{ $SINGER_REPO_DIR }}` unset renders as ""
    with pytest.raises(FileNotFoundError, match="set SINGER_REPO_DIR"):
        set_repo_dir(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ against a real server


def _git_dvc_init(repo: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)


@pytest.fixture
def toy_repo(tmp_path) -> Path:
    """A DVC project whose `ingest` stage fails like a dropped S3 connection for its first two runs, and whose
    `split` stage fails like a Great Expectations suite (never transient)."""
    repo = tmp_path / "toy"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "flaky.py").write_text(textwrap.dedent("""\
        import pathlib, sys
        count = pathlib.Path("attempts.txt")
        n = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(n))
        if n <= 2:
            print("botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: "
                  '"http://127.0.0.1:1/singer"', file=sys.stderr)
            sys.exit(1)
        pathlib.Path("out").mkdir(exist_ok=True)
        pathlib.Path("out/ok.txt").write_text("ok")
    """))
    (repo / "suite.py").write_text(
        "import sys\nprint('error: split: Great Expectations suite failed: "
        "expect_column_pair_values_to_be_unique', file=sys.stderr)\nsys.exit(1)\n")
    (repo / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          ingest:
            cmd: {sys.executable} flaky.py
            deps: [flaky.py]
            outs: [out]
          split:
            cmd: {sys.executable} suite.py
    """))
    _git_dvc_init(repo)
    return repo


@pytest.mark.slow
def test_transient_stage_failure_is_retried_and_recovers(toy_repo, prefect_api):
    from flows.pipeline import pipeline

    state = pipeline(stages=["ingest"], repo_dir=str(toy_repo), retries=3, retry_delay_seconds=0.2,
                     return_state=True)
    assert state.is_completed(), state.message
    assert (toy_repo / "attempts.txt").read_text() == "3" and (toy_repo / "out/ok.txt").exists()
    runs = finished_task_runs(state.state_details.flow_run_id, {"dvc-repro-ingest"})
    assert runs["dvc-repro-ingest"].run_count == 3 and runs["dvc-repro-ingest"].state.is_completed()


@pytest.mark.slow
def test_real_stage_failure_fails_at_once_with_the_stderr_tail(toy_repo, prefect_api):
    from flows.pipeline import pipeline

    state = pipeline(stages=["split"], repo_dir=str(toy_repo), retries=3, retry_delay_seconds=0.2,
                     return_state=True)
    assert state.is_failed()
    assert "dvc repro split failed with exit code" in state.message and "not transient" in state.message
    assert "Great Expectations suite failed" in state.message
    runs = finished_task_runs(state.state_details.flow_run_id, {"dvc-repro-split"})
    assert runs["dvc-repro-split"].run_count == 1 and runs["dvc-repro-split"].state.is_failed()


@pytest.mark.slow
def test_bad_override_fails_before_any_stage(toy_repo, prefect_api):
    from flows.pipeline import pipeline

    before = (toy_repo / "params.yaml").read_text()
    state = pipeline(stages=["ingest"], overrides={"train.stpes": 5}, repo_dir=str(toy_repo), return_state=True)
    assert state.is_failed() and "unknown parameter 'train.stpes'" in state.message
    assert (toy_repo / "params.yaml").read_text() == before
    assert not (toy_repo / "attempts.txt").exists() and not (toy_repo / "dvc.lock").exists()
    state = pipeline(stages=["ingest", "tarin"], repo_dir=str(toy_repo), return_state=True)
    assert state.is_failed() and "unknown stage(s) 'tarin'" in state.message


# ------------------------------------------------------------------------------------------ end to end


E2E_OVERRIDES = {
    "train.steps": 2, "train.batch_size": 1, "train.checkpoint_every": 2, "train.validate_every": 0,
    "evaluate.max_clips": 1, "evaluate.inference_steps": 2, "evaluate.num_workers": 0, "evaluate.sample_videos": 1,
    # the cheap metrics (landmark-based ones find no face on a 2-step model anyway); lse: unavailable, with a note
    "evaluate.metrics": "[ssim, psnr, lse]",
}


@pytest.fixture
def pipeline_repo(project_copy) -> Path:
    """The tiny synthetic project (3 subjects) as a git + DVC repository with the pipeline's code."""
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project_copy / name)
    shutil.copytree(ROOT / "singer", project_copy / "singer", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    shutil.copytree(ROOT / "infra" / "accelerate", project_copy / "infra" / "accelerate", dirs_exist_ok=True)
    _git_dvc_init(project_copy)
    return project_copy


@pytest.mark.slow
def test_pipeline_end_to_end_with_artifacts(pipeline_repo, prefect_api, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.common import dvc_stage_names
    from flows.pipeline import ARTIFACT_KEYS, pipeline

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = dict(E2E_OVERRIDES)
    with_ablate = "ablate" in dvc_stage_names(pipeline_repo)
    if with_ablate:
        overrides["ablate.variants"] = "[no_both]"  # one variant keeps the test within its time
    stages = None  # every stage dvc.yaml declares
    state = pipeline(stages=stages, overrides=overrides, repo_dir=str(pipeline_repo), retries=1,
                     retry_delay_seconds=1, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    expected = [s for s in STAGES if s != "ablate" or with_ablate]
    assert summary["stages"] == expected
    assert summary["ran"]["ingest"] == ["ingest"] and summary["ran"]["train"] == ["train"]
    assert summary["params_changed"]["train.steps"]["new"] == 2

    # DVC: every stage locked, outputs in place
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())["stages"]
    assert {"ingest", "clip", "crop", "split", "train", "evaluate"} <= set(lock)
    assert (pipeline_repo / "models/full").is_dir() and (pipeline_repo / "data/split/test.txt").is_file()
    evaluation = json.loads((pipeline_repo / "metrics/eval.json").read_text())
    assert evaluation["n_clips"] == 1 and summary["metrics"]["eval"]["ssim"] == pytest.approx(evaluation["ssim"], abs=1e-4)
    train = json.loads((pipeline_repo / "metrics/train.json").read_text())
    assert summary["mlflow_run_id"] == train["mlflow_run_id"]

    # the server has the run, its tasks and its artifacts
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_completed()
    by_key = artifacts(flow_run_id)
    wanted = {ARTIFACT_KEYS["data"], ARTIFACT_KEYS["eval"], ARTIFACT_KEYS["mlflow"]} | (
        {ARTIFACT_KEYS["ablation"]} if with_ablate else set())
    assert wanted <= set(by_key), sorted(by_key)
    data_rows = json.loads(by_key[ARTIFACT_KEYS["data"]].data)
    assert [r["stage"] for r in data_rows] == ["ingest", "clip", "crop", "split"]
    assert data_rows[0]["kept"] == 3 and data_rows[3]["kept"] == 6  # 3 videos; 6 clips split
    metric_rows = {r["metric"]: r for r in json.loads(by_key[ARTIFACT_KEYS["eval"]].data)}
    assert metric_rows["ssim"]["clips scored"] == 1 and "SyncNet" in metric_rows["LSE-D"]["note"]
    mlflow_md = by_key[ARTIFACT_KEYS["mlflow"]]
    assert mlflow_md.type == "markdown" and train["mlflow_run_id"] in mlflow_md.data and "mlflow ui" in mlflow_md.data
    if with_ablate:
        assert "without both" in by_key[ARTIFACT_KEYS["ablation"]].data
    runs = finished_task_runs(flow_run_id, {f"dvc-repro-{s}" for s in expected})
    assert all(runs[f"dvc-repro-{s}"].state.is_completed() for s in expected)
    if not with_ablate:
        pytest.skip("dvc.yaml has no `ablate` stage yet: ran ingest .. evaluate only")
