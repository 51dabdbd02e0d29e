"""DVC with the project's S3 remote layout, against the real SeaweedFS server of the `s3_server` fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from singer.storage import configure_dvc_remote, ensure_bucket, list_objects

pytestmark = pytest.mark.slow


def dvc_exe() -> list[str]:
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, check=False, cwd=cwd, env=env or os.environ.copy(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))  # not /var/tmp/dvc
    monkeypatch.setenv("GIT_AUTHOR_NAME", "test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.com")
    run(repo, "git", "init", "-q")
    run(repo, *dvc_exe(), "init", "-q")
    raw = repo / "data" / "raw"
    for rel, data in {
        "s1/take1.mp4": os.urandom(200_000),
        "s1/take2.mp4": os.urandom(1000),
        "s2/take1.mp4": b"same bytes twice",
        "s2/copy.mp4": b"same bytes twice",
    }.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(data)
    return repo


def test_push_delete_pull_round_trip(s3_env, dvc_repo, monkeypatch):
    """Credentials from the environment only: `.dvc/config` gets the URL and the endpoint, nothing secret."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # the endpoint must come from .dvc/config
    repo = dvc_repo
    raw = repo / "data" / "raw"
    before = snapshot(raw)
    run(repo, *dvc_exe(), "add", "data/raw")

    url = configure_dvc_remote(repo, s3_env.endpoint_url, "singer", prefix="dvcstore")
    assert url == "s3://singer/dvcstore"
    config = (repo / ".dvc" / "config").read_text()
    assert "url = s3://singer/dvcstore" in config and f"endpointurl = {s3_env.endpoint_url}" in config
    assert "remote = s3" in config
    assert s3_env.secret_key not in config and s3_env.access_key not in config
    assert not (repo / ".dvc" / "config.local").exists()

    # `dvc push` does not create its bucket (DVC 3.67 lists it first and stops at NoSuchBucket):
    # `singer s3 up` / ensure_bucket does.
    ensure_bucket("singer", client=s3_env.client())
    run(repo, *dvc_exe(), "push")
    keys = [o["key"] for o in list_objects("s3://singer/dvcstore/")]
    assert keys and all(k.startswith("dvcstore/files/md5/") for k in keys)

    # Lose the workspace copy and the cache; get both back from S3.
    shutil.rmtree(raw)
    shutil.rmtree(repo / ".dvc" / "cache")
    run(repo, *dvc_exe(), "pull")
    assert snapshot(raw) == before
    status = run(repo, *dvc_exe(), "status", "--cloud").stdout
    assert "up to date" in status.lower() or "in sync" in status.lower(), status


def test_local_credentials_go_to_config_local_only(s3_env, dvc_repo, monkeypatch):
    """With keys passed to configure_dvc_remote they land in the git-ignored .dvc/config.local."""
    repo = dvc_repo
    bucket = "dvc-local-creds"
    ensure_bucket(bucket, client=s3_env.client())
    run(repo, *dvc_exe(), "add", "data/raw")
    configure_dvc_remote(
        repo, s3_env.endpoint_url, bucket, access_key=s3_env.access_key, secret_key=s3_env.secret_key
    )
    assert s3_env.secret_key not in (repo / ".dvc" / "config").read_text()
    assert s3_env.secret_key in (repo / ".dvc" / "config.local").read_text()
    ignored = run(repo, "git", "check-ignore", ".dvc/config.local").stdout.strip()
    assert ignored == ".dvc/config.local"

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(repo / "no-aws-config")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    run(repo, *dvc_exe(), "push", env=env)
    assert list_objects(f"s3://{bucket}/dvcstore/")
