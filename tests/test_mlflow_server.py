"""A real `mlflow server` (the deployment of infra/mlflow/, with SQLite instead of Postgres): SQL backend,
artifacts proxied by the server into S3 (the SeaweedFS test server), Host-header check configured as in
docker-compose.yaml / values.yaml.

- A run logged over HTTP (params, a metric, an artifact) lands in the bucket, although the client has no S3
  keys at all: the bytes went through the server (--serve-artifacts).
- `singer.release.tracking.start_run` works against the server URI (the experiment takes the server's proxied
  artifact root; the checkpoint and params arrive).
- MLflow 3's Host check: an API call with a Host header that --allowed-hosts does not list gets 403 while
  /health still answers 200 (why the infra files list the Service names).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# the Host patterns of infra/mlflow/docker-compose.yaml (tests/test_infra.py checks that file)
ALLOWED_HOSTS = "localhost:*,127.0.0.1:*,mlflow:*"
START_TIMEOUT_S = 180  # generous: 60 s was not enough with 4 busy processes on the 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str | None = None, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    """One `mlflow server` for the module (it takes 15-25 s to start on 2 busy cores) on a free 127.0.0.1
    port, artifacts into a fresh bucket; yields (url, bucket). Only the server gets the S3 keys."""
    from singer.storage import ensure_bucket

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    ensure_bucket(bucket, client=s3_server.client())
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, **s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{bucket}/mlflow",
        "--serve-artifacts",
        "--allowed-hosts", ALLOWED_HOSTS,
        "--workers", "1",
    ]
    log_path = tmp / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    t0 = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while _get_health(url) != 200:
            if proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"mlflow server did not come up ({proc.poll()=}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        print(f"mlflow server healthy after {time.monotonic() - t0:.1f} s")
        yield url, bucket
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def mlflow_server(server, s3_server, monkeypatch):
    """The module's server as this test's tracking URI; this process keeps no S3 keys, so it can reach S3
    only through the server."""
    import mlflow

    if not s3_server.running():  # a test elsewhere stopped it and failed before starting it again
        s3_server.start()
    url, _ = server
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield server
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _get_health(url: str) -> int | None:
    try:
        return _get(f"{url}/health", timeout=1.0)
    except OSError:
        return None


def _bucket_keys(s3_server, bucket: str) -> dict[str, bytes]:
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_run_logged_over_http_lands_in_s3(mlflow_server, s3_server, tmp_path):
    import mlflow

    url, bucket = mlflow_server
    mlflow.set_tracking_uri(url)
    experiment_id = mlflow.create_experiment("server-test")
    note = tmp_path / "note.txt"
    note.write_text("sung through the proxy\n")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"model.msm": True, "train.lr": 1e-4})
        mlflow.log_metric("loss", 0.25, step=3)
        mlflow.log_artifact(str(note), artifact_path="notes")
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied, not s3://

    got = mlflow.MlflowClient().get_run(run_id)
    assert got.data.params == {"model.msm": "True", "train.lr": "0.0001"}
    assert got.data.metrics == {"loss": 0.25}
    objects = _bucket_keys(s3_server, bucket)
    key = f"mlflow/{experiment_id}/{run_id}/artifacts/notes/note.txt"
    assert objects.get(key) == b"sung through the proxy\n", sorted(objects)
    # and back through the server
    back = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="notes/note.txt", dst_path=str(tmp_path / "dl"))
    assert Path(back).read_text() == "sung through the proxy\n"


def test_singer_start_run_against_the_server(mlflow_server, s3_server, tmp_path, monkeypatch):
    import mlflow

    from singer.config import Config, TrackingConfig
    from singer.release import tracking

    url, bucket = mlflow_server
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    tracking._reset_failures()
    # the project's default artifact_location (a local folder) means nothing to a remote server:
    # the experiment must get the server's proxied root instead
    cfg = Config(tracking=TrackingConfig(artifact_location="./mlartifacts", experiment="singer-server"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"w" * 2048)
    with tracking.start_run(cfg, "train") as run:
        assert tracking.log_step({"loss": 0.5, "lr": 1e-4}, 1)
        assert tracking.log_checkpoint(ckpt, 50)
    assert tracking.failures() == {}
    assert mlflow.get_tracking_uri() == url
    client = mlflow.MlflowClient()
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["stage"] == "train"
    assert got.data.params["train.variant"] == "full" and "tracking.experiment" in got.data.params
    experiment = client.get_experiment(got.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    objects = _bucket_keys(s3_server, bucket)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/checkpoints/step-000050/model.safetensors") for k in objects), (
        sorted(objects)
    )


def test_host_header_check(mlflow_server):
    url, _ = mlflow_server
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api) == 200  # Host 127.0.0.1:<port>
    assert _get(api, host="mlflow:5000") == 200  # another container of the compose file
    assert _get(api, host="mlflow.singer.svc.cluster.local:5000") == 403  # not listed here: refused...
    assert _get(f"{url}/health", host="mlflow.singer.svc.cluster.local:5000") == 200  # ...while /health says fine
