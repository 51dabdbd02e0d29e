"""The detached server of `singer s3 up | down | status`, found again through its `state.json`.

    info = start_server(".singer/s3")                     # `singer s3 up`: detached, survives the CLI
    server_status(".singer/s3")                           # `singer s3 status`
    client_env(".singer/s3")                              # `singer s3 env`: the variables that point clients at it
    stop_server(".singer/s3")                             # `singer s3 down`
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from singer.storage.server import S3Server, probe
from singer.storage.server_state import (
    DEFAULT_PORT,
    STOP_TIMEOUT,
    _clear_state,
    _is_our_weed,
    _pid_alive,
    _remove_sockets,
    read_credentials,
    read_state,
)

log = logging.getLogger(__name__)


def start_server(
    data_dir: str | os.PathLike,
    port: int = DEFAULT_PORT,
    access_key: str | None = None,
    secret_key: str | None = None,
    background: bool = True,
    ready_timeout: float = 30.0,
    buckets: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Start a server for `data_dir` and return its info (as in `state.json`; no secret).

    `background=True` (`singer s3 up`): the server is detached and keeps running after this process exits;
    `stop_server(data_dir)` stops it. If one already runs for `data_dir`, its info is returned unchanged
    (`info["already_running"] = True`).
    `background=False`: blocks, serving until SIGINT/SIGTERM, then stops the server and returns.
    `buckets` are created once it answers (`dvc push` does not create its bucket: pass the remote's).
    """
    data_dir = Path(data_dir).resolve()
    state = read_state(data_dir)
    if state and _pid_alive(state["pid"]) and _is_our_weed(state["pid"], data_dir):
        return {**state, "already_running": True}
    if state:
        _remove_sockets(state.get("ports", {}))
        _clear_state(data_dir)
    server = S3Server(data_dir, port, access_key, secret_key, ready_timeout=ready_timeout, buckets=buckets)
    info = server.start(background=background).to_dict()
    if background:
        server.process = None  # detached: nothing of ours to reap; stop_server finds it by state.json
        return {**info, "already_running": False}

    stop = {"flag": False}

    def _handler(signum, frame):
        stop["flag"] = True

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop["flag"] and server.running():
            time.sleep(0.2)
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return {**info, "already_running": False}


def stop_server(data_dir: str | os.PathLike, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the server recorded in `data_dir/.s3/state.json`. True if one was running."""
    data_dir = Path(data_dir).resolve()
    state = read_state(data_dir)
    if not state:
        return False
    pid, ports = int(state["pid"]), state.get("ports", {})
    was_running = _pid_alive(pid) and _is_our_weed(pid, data_dir)
    if was_running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _pid_alive(pid):
            log.info("S3 server pid %d still stopping after %.0f s; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                _reap(pid)
                if not _pid_alive(pid):
                    break
                time.sleep(0.1)
    _remove_sockets(ports)
    _clear_state(data_dir)
    return was_running


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def server_status(data_dir: str | os.PathLike) -> dict[str, Any]:
    """`{"running": bool, "ready": bool, ...state}` for the server of `data_dir` (never the secret)."""
    from botocore.exceptions import BotoCoreError, ClientError

    data_dir = Path(data_dir).resolve()
    state = read_state(data_dir)
    if not state:
        return {"running": False, "ready": False, "data_dir": str(data_dir)}
    running = _pid_alive(state["pid"]) and _is_our_weed(state["pid"], data_dir)
    ready = False
    error = None
    if running:
        creds = None
        env_ak, env_sk = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if env_ak == state.get("access_key") and env_sk:
            creds = (env_ak, env_sk)
        else:
            creds = read_credentials(data_dir)
        if creds:
            try:
                probe(state["endpoint_url"], *creds)
                ready = True
            except (BotoCoreError, ClientError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        else:
            error = "no credentials at hand to probe it (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    out = {**state, "running": running, "ready": ready}
    if error:
        out["error"] = error
    return out


def client_env(data_dir: str | os.PathLike) -> dict[str, str] | None:
    """The variables that point boto3, DVC, MLflow and singer at the server recorded in `data_dir` (its keys
    too when they are stored there), for `singer s3 env`; None when no server state is there."""
    data_dir = Path(data_dir).resolve()
    state = read_state(data_dir)
    if not state:
        return None
    env = {"SINGER_S3_ENDPOINT_URL": state["endpoint_url"], "AWS_ENDPOINT_URL_S3": state["endpoint_url"],
           "MLFLOW_S3_ENDPOINT_URL": state["endpoint_url"], "AWS_DEFAULT_REGION": "us-east-1"}
    creds = read_credentials(data_dir)
    if creds:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = creds
    return env
