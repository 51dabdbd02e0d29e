"""The DVC remote on S3: `configure_dvc_remote(repo, endpoint, bucket)` writes it into `.dvc/config`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from singer.storage.s3 import StorageError, parse_s3_uri


def _dvc_command() -> list[str]:
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _dvc(repo_dir: Path, *args: str, secret: str | None = None) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        [*_dvc_command(), *args], cwd=repo_dir, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        shown = " ".join("***" if secret and a == secret else a for a in args)
        message = (result.stderr or result.stdout).strip()
        if secret:
            message = message.replace(secret, "***")
        raise StorageError(f"`dvc {shown}` in {repo_dir} failed ({result.returncode}): {message}")


def configure_dvc_remote(
    repo_dir: str | os.PathLike,
    endpoint_url: str | None,
    bucket: str,
    prefix: str = "dvcstore",
    name: str = "s3",
    *,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
) -> str:
    """Make `s3://bucket/prefix` the default DVC remote `name` of the repo; return its URL.

    Writes the URL and endpoint to `.dvc/config` (committed). Credentials are never written there:
    DVC takes them from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or, when passed here, they go to
    `.dvc/config.local` (git-ignored) via `dvc remote modify --local`.
    """
    repo_dir = Path(repo_dir)
    url = f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"
    parse_s3_uri(url)
    _dvc(repo_dir, "remote", "add", "--default", "--force", name, url)
    if endpoint_url:
        _dvc(repo_dir, "remote", "modify", name, "endpointurl", endpoint_url)
    else:
        _dvc(repo_dir, "remote", "modify", "--unset", name, "endpointurl")
    if region:
        _dvc(repo_dir, "remote", "modify", name, "region", region)
    if access_key or secret_key:
        if not (access_key and secret_key):
            raise StorageError("configure_dvc_remote: give both access_key and secret_key, or neither")
        _dvc(repo_dir, "remote", "modify", "--local", name, "access_key_id", access_key)
        _dvc(
            repo_dir, "remote", "modify", "--local", name, "secret_access_key", secret_key, secret=secret_key
        )
    return url
