"""Shared pytest fixtures.

- `s3_server` (session): a real SeaweedFS S3 server on free 127.0.0.1 ports, with test credentials.
  `s3_server.endpoint_url`, `.access_key`, `.secret_key`, `.client()`, `.env()`; `.stop()` / `.start()`
  (same ports, same data) or `with s3_server.stopped(): ...` to take it away for a while. After a restart,
  `s3_server.wait_serving(bucket)` before using it again: `start()` returns once ListBuckets answers, but a
  restarted SeaweedFS refuses reads and writes (InternalError) until its volume server has registered
  again, which took over 30 s on a loaded machine.
- `s3_env` (function): the environment pointed at that server (AWS keys, region, SINGER_S3_ENDPOINT_URL,
  AWS_ENDPOINT_URL_S3, MLFLOW_S3_ENDPOINT_URL); yields the server, which has served a put and a get since
  it was last started (an earlier test may have restarted it).
- `s3_bucket` (function): a fresh, empty bucket on it; yields its name.
- `model_dir` (module): an untrained tiny model folder, saved as `singer train` saves one.
- `tiny_project` (session), `project_copy`, `retrain_repo`: the tiny synthetic corpus through split; a private
  copy as the working directory with its own MLflow store; that copy as a git + DVC repository (data.dvc).
- Telemetry and network look-ups of the stack are turned off for the whole session (see `QUIET_ENV`).
- Ray's token (`ray_token_in_env`, session): a fresh one in RAY_AUTH_TOKEN, so no test writes ~/.ray/auth_token.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid

import pytest

from singer.storage import STOP_TIMEOUT, S3Server

# Before anything imports torch: spinning OpenMP threads make torch 10-40x slower when the two xdist
# workers share the 2 cores; sleeping threads cost nothing measurable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Harmless everywhere: no usage reports, no online look-ups (the machines have no internet).
QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "DVC_STUDIO_OFFLINE": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# Set at import, before test modules import the libraries that read them once.
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

TEST_ACCESS_KEY = "singer-test"
TEST_SECRET_KEY = "singer-test-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="session", autouse=True)
def quiet_env():
    """Keep the telemetry switches set for the whole session (restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in QUIET_ENV.items():
            mp.setenv(key, os.environ.get(key, value))
        yield


@pytest.fixture(scope="session", autouse=True)
def ray_token_in_env():
    """A session token for every local Ray the tests start (in-process, `singer evaluate`, Ray's workers).

    Ray 2.60 turns token auth on for a new local cluster and, when it finds no token, writes one to
    ~/.ray/auth_token, in the real HOME. That file outlives the tests and changes later Ray commands on the
    machine: `ray start --head` with RAY_AUTH_MODE unset then turns token auth on. With RAY_AUTH_TOKEN set,
    Ray uses it and writes nothing; auth stays on, as users get it. A user's own token is kept."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_TOKEN", os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32))
        yield


# How long a (re)started server may take to serve a put and a get. Seen: over 30 s of InternalError on 2 cores
# shared with two other test runs; an idle machine needs well under a second.
S3_SERVING_TIMEOUT_S = 180.0


class SessionS3Server(S3Server):
    """The library's server, plus `wait_serving`: the tests' way to know it works again after a restart."""

    PROBE_BUCKET = "singer-test-probe"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.serving = False  # a put and a get have worked since the last start

    def start(self, background: bool = False):
        was_running = self.running()
        info = super().start(background)
        if not was_running:
            self.serving = False
        return info

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self.serving = False
        super().stop(timeout)

    def wait_serving(self, bucket: str | None = None, timeout: float = S3_SERVING_TIMEOUT_S,
                     interval: float = 0.25) -> int:
        """Put a probe object into `bucket` (default: a bucket of its own), read it back, delete it; repeat
        until all three work or `timeout` has passed (then fail with the last error and the server's log).
        Each try makes one request per call, with short timeouts (no boto3 retries). Returns the tries."""
        from botocore.exceptions import BotoCoreError, ClientError

        from singer.storage import StorageError, ensure_bucket

        client = self.client(max_attempts=1, connect_timeout=2.0, read_timeout=10.0)
        key = f"_serving-probe/{uuid.uuid4().hex}"
        body = uuid.uuid4().bytes
        deadline = time.monotonic() + timeout
        tries, last = 0, None
        while True:
            tries += 1
            if not self.running():
                raise AssertionError(f"the S3 server at {self.endpoint_url} is not running (exit code "
                                     f"{self.process.returncode if self.process else None}); log:\n{self._log()}")
            try:
                if bucket is None:
                    ensure_bucket(self.PROBE_BUCKET, client=client)
                target = bucket or self.PROBE_BUCKET
                client.put_object(Bucket=target, Key=key, Body=body)
                got = client.get_object(Bucket=target, Key=key)["Body"].read()
                if got != body:
                    raise AssertionError(f"read back {got!r} instead of {body!r}")
                client.delete_object(Bucket=target, Key=key)
                self.serving = True
                return tries
            except (BotoCoreError, ClientError, StorageError, OSError, AssertionError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise AssertionError(f"the S3 server at {self.endpoint_url} did not serve a put and a get within "
                                     f"{timeout:.0f} s ({tries} tries; last: {type(last).__name__}: {last}); "
                                     f"log:\n{self._log()}")
            time.sleep(interval)

    def _log(self) -> str:
        from singer.storage.server_state import _log_tail

        return _log_tail(self.log_file)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for the session, stopped (and its /tmp sockets removed) at the end."""
    server = SessionS3Server(
        tmp_path_factory.mktemp("s3data"),
        port=0,
        access_key=TEST_ACCESS_KEY,
        secret_key=TEST_SECRET_KEY,
        die_with_parent=True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3, DVC, MLflow and singer at the test server for one test."""
    if not s3_server.running():  # a test that stopped it failed before starting it again
        s3_server.start()
    if not s3_server.serving:  # first use, or (re)started since: wait until it reads and writes
        s3_server.wait_serving()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    yield s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A new, empty bucket on the test server, named uniquely per test."""
    from singer.storage import ensure_bucket

    name = f"t-{uuid.uuid4().hex[:12]}"
    ensure_bucket(name, client=s3_env.client())
    yield name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model saved like `singer train` saves one (for tests where weights don't matter)."""
    from singer.config import load_config
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    cfg = load_config()
    out = tmp_path_factory.mktemp("model") / "full"
    SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A project folder with the repository's params.yaml and a small synthetic corpus taken through
    ingest -> clip -> crop -> split (3 subjects, two 2-s clips each). Tests must not modify it; copy it."""
    import shutil
    from pathlib import Path

    from singer.config import load_config
    from singer.data.clip import run_clip
    from singer.data.crop import run_crop
    from singer.data.ingest import run_ingest
    from singer.data.split import run_split
    from singer.data.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("tiny_project")
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", root / "params.yaml")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config()
        synthesize_corpus(cfg.paths.raw, subjects=3, seconds=4.2, seed=0, size=192, fps=[25.0], progress=False)
        for stage in (run_ingest, run_clip, run_crop, run_split):
            stage(cfg, progress=False)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project_copy(tiny_project, tmp_path, monkeypatch):
    """A private copy of `tiny_project`, as the working directory, with its own MLflow store."""
    import shutil

    dest = tmp_path / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    monkeypatch.chdir(dest)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{dest / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return dest


@pytest.fixture
def retrain_repo(project_copy):
    """`project_copy` as a git + DVC repository whose data/raw is tracked by data.dvc (as in this repository),
    with the code its stages run (singer/, infra/accelerate/)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dvc = Path(sys.executable).parent / "dvc"
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(root / name, project_copy / name)
    shutil.copytree(root / "singer", project_copy / "singer", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    shutil.copytree(root / "infra" / "accelerate", project_copy / "infra" / "accelerate", dirs_exist_ok=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [str(dvc), "init", "-q"], [str(dvc), "add", "-q", "data/raw"]):
        subprocess.run(cmd, cwd=project_copy, env=env, check=True, capture_output=True)
    # the tracking file at the root, like the repository's
    raw_dvc = (project_copy / "data/raw.dvc").read_text().replace("path: raw", "path: data/raw")
    (project_copy / "data.dvc").write_text(raw_dvc)
    (project_copy / "data/raw.dvc").unlink()
    return project_copy
