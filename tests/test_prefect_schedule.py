"""A schedule that fires: `singer-retrain` deployed with a schedule a minute ahead retrains on its own.

The whole path a weekly retraining takes, with nothing started by hand after `prefect deploy`:
- a real Prefect server with its scheduler on, and a process worker (`prefect worker start --pool
  singer-process`) in another folder, which reaches the checkout through the deployment's pull step
  (`SINGER_REPO_DIR`), exactly as the README's one-machine commands set it up;
- `prefect deploy --name singer-retrain` from flows/prefect.yaml, plus `--interval` / `--anchor-date` for a
  schedule that fires 60 s after `prefect deploy` starts (the weekly cron stays), and `--params` for the test's bucket and
  a 2-step training;
- two new singers' videos on a real SeaweedFS bucket.
The scheduler creates the run, the worker runs it, and the test checks what the run left: a new version of
the registered model (challenger, trained on the new data.dvc), the flow's artifacts (the release outcome,
the subflow's MLflow link), the ledger. It then stops the worker and the server and checks that no process
talking to that server is left and its port is free. It prints when the run was due and when it started.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_harness import PrefectServer, client_env, kill_group, latest_artifact, run_cli, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "singer-process"
LEAD_S = 60  # the schedule's first run is due this long after `prefect deploy` starts
NEW_VIDEOS = ["subject_003/take_00", "subject_004/take_00"]
OVERRIDES = {"train.steps": 2, "train.batch_size": 1, "train.checkpoint_every": 2, "train.validate_every": 0,
             "evaluate.max_clips": 1, "evaluate.inference_steps": 2, "evaluate.num_workers": 0,
             "evaluate.sample_videos": 1}


def _flow_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50, offset=0)


def _processes_using(needle: str) -> list[str]:
    """Processes of this user whose command line or environment names `needle` (the server's address is in
    the environment of every worker and flow-run process the test started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle.encode() in text:
            command = text.split(b"\0\0")[0].replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {command[:200]}")
    return found


def _nothing_listens(port: int) -> bool:
    """True when the port could be served again: SO_REUSEADDR, as servers bind, so that the closed
    connections still in TIME_WAIT do not count."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def scheduling_server(tmp_path):
    """A Prefect server with its scheduler on, for this test alone; afterwards nothing that talks to it is
    left running and its port is free."""
    server = PrefectServer(tmp_path / "server-home", scheduler=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    deadline = time.monotonic() + 30
    while (left := _processes_using(server.api_url)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes still using the test's Prefect server: {left}"
    wait_for(lambda: _nothing_listens(server.port), timeout=30, what=f"port {server.port} to be free")


@pytest.mark.slow
def test_the_weekly_retrain_deployment_fires_on_its_schedule(retrain_repo, s3_env, s3_bucket, scheduling_server,
                                                              tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import ARTIFACT_KEYS
    from flows.retrain import RELEASE_ARTIFACT, read_ledger
    from singer.data.synth import synthesize_corpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    server = scheduling_server
    # two new singers arrive on S3: their videos and the sidecars ingest reads
    synthesize_corpus(tmp_path / "new", subjects=5, seconds=4.2, seed=0, size=192, fps=[25.0], progress=False)
    client = s3_env.client()
    uploaded = []
    for stem in NEW_VIDEOS:
        for suffix in (".mp4", ".truth.json", ".vocals.wav"):
            key = f"incoming/{stem}{suffix}"
            client.upload_file(str(tmp_path / "new" / f"{stem}{suffix}"), s3_bucket, key)
            uploaded.append(f"s3://{s3_bucket}/{key}")
    shutil.copytree(ROOT / "flows", retrain_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    data_dvc_before = (retrain_repo / "data.dvc").read_text()

    env = {**os.environ, **client_env(server, tmp_path / "prefect-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SINGER_REPO_DIR", None)  # unset at deploy time: each worker's environment decides (see prefect.yaml)
    run_cli(["work-pool", "create", POOL, "--type", "process"], retrain_repo, env)
    parameters = {"source": f"s3://{s3_bucket}/incoming", "overrides": OVERRIDES, "s3_retries": 1,
                  "s3_retry_delay_seconds": 1, "retries": 1, "retry_delay_seconds": 1}
    deploying = time.monotonic()
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=LEAD_S)).replace(microsecond=0)
    out = run_cli(["deploy", "--prefect-file", "flows/prefect.yaml", "--name", "singer-retrain",
                   "--interval", "86400", "--anchor-date", due.isoformat(), "--params", json.dumps(parameters)],
                  retrain_repo, env).stdout
    assert out.count("successfully created") == 1, out

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=tmp_path,
            env={**env, "SINGER_REPO_DIR": str(retrain_repo)}, stdout=log, stderr=log, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            with get_client(sync_client=True) as prefect:
                deployment = prefect.read_deployment_by_name("singer-retrain/singer-retrain")
            assert {s.schedule.interval.total_seconds() for s in deployment.schedules
                    if hasattr(s.schedule, "interval")} == {86400.0}
            assert any(getattr(s.schedule, "cron", None) == "0 3 * * 1" for s in deployment.schedules)  # kept

            def finished_scheduled_run():
                assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{worker_log.read_text()[-4000:]}"
                runs = [r for r in _flow_runs(deployment.id) if r.expected_start_time == due]
                if runs and runs[0].state and runs[0].state.is_final():
                    return runs[0]
                return None

            run = wait_for(finished_scheduled_run, timeout=LEAD_S + 540, interval=2,
                           what="the scheduled retrain run to finish")
            assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()[-6000:]}"
            assert run.auto_scheduled  # the scheduler created it, not a `prefect deployment run`
            fired = (run.start_time - run.expected_start_time).total_seconds()
            print(f"\nscheduled run: due {LEAD_S} s after `prefect deploy` started, started {fired:+.1f} s from due, "
                  f"ran {run.total_run_time.total_seconds():.0f} s; deploy to completion "
                  f"{time.monotonic() - deploying:.0f} s")

            # its artifacts: the release outcome on the run itself, the training run's link on its subflow
            release = latest_artifact(RELEASE_ARTIFACT)
            assert release["flow_run_id"] == str(run.id)
            assert "new data: 6 object(s)" in release["data"] and "registered: " in release["data"]
            mlflow_link = latest_artifact(ARTIFACT_KEYS["mlflow"])
            with get_client(sync_client=True) as prefect:
                subflow = prefect.read_flow_run(mlflow_link["flow_run_id"])
                assert prefect.read_task_run(subflow.parent_task_run_id).flow_run_id == run.id
    finally:
        kill_group(worker)

    # the new version in the registry, trained on the data the run pulled
    registry = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    version = registry.get_model_version_by_alias("singer", "challenger")
    assert str(version.version) == "1"
    training = registry.get_run(version.run_id)
    assert training.info.run_name == "train-full" and version.tags["data_hash"] == training.data.tags["data_hash"]
    assert (retrain_repo / "data.dvc").read_text() != data_dvc_before
    assert json.loads((retrain_repo / "metrics/ingest.json").read_text())["n_subjects"] == 5
    assert set(read_ledger(retrain_repo)) == set(uploaded)
