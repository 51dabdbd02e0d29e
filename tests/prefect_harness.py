"""A real, temporary Prefect server for the flow tests, and the client settings that point at it.

    server = PrefectServer(tmp / "server-home"); server.start()      # `prefect server start` on a free port
    with use_prefect_server(server, tmp / "client-home", monkeypatch):  # this process and its subprocesses
        my_flow()
    server.stop()

Fixtures (make them visible in a test module: `prefect_api = prefect_harness.prefect_api`, the same for
`prefect_server`):
- `prefect_server` (module): one server per test module (each start costs 5-15 s on 2 busy cores), with its
  own PREFECT_HOME and SQLite database, killed at the end.
- `prefect_api` (function): this test's PREFECT_HOME under tmp_path, PREFECT_API_URL at the server, for the
  test process (settings context) and the CLI/worker subprocesses it starts (environment).

Prefect 3.8 reads its settings from the environment once, at import, into a process-wide settings
context; changing os.environ afterwards is not seen. So the settings are also applied with
`temporary_settings` and made the global context, as `prefect.testing.utilities.prefect_test_harness` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """`prefect server start` on 127.0.0.1 in its own process group, without the UI and the late-runs
    service (they cost CPU), and without the scheduler unless a test's schedule must fire (`scheduler=True`)."""

    def __init__(self, home: Path, port: int | None = None, scheduler: bool = False):
        self.home = Path(home)
        self.port = port or free_port()
        self.scheduler = scheduler
        self.process: subprocess.Popen | None = None
        self.log = self.home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **QUIET, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
               "--no-ui", "--scheduler" if self.scheduler else "--no-scheduler", "--no-late-runs"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        kill_group(self.process)
        self.process = None


def kill_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group a test started (start_new_session=True), SIGKILL after `grace`."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def client_env(server: PrefectServer, home: Path) -> dict[str, str]:
    return {**QUIET, "PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(home)}


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued in this process before the server goes (no errors at exit)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    with contextlib.suppress(Exception):
        run_coro_as_sync(drain())


@contextlib.contextmanager
def use_prefect_server(server: PrefectServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import prefect.context
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home.mkdir(parents=True, exist_ok=True)
    for key, value in client_env(server, home).items():
        monkeypatch.setenv(key, value)
    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: home}))
        global_context = getattr(prefect.context, "_temporary_global_settings_context", None)
        if global_context is not None:  # threads started without a copied context see these settings too
            stack.enter_context(global_context(prefect.context.get_settings_context()))
        try:
            yield
        finally:
            _drain_prefect_workers()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefect_api(prefect_server, tmp_path, monkeypatch) -> Iterator[PrefectServer]:
    with use_prefect_server(prefect_server, tmp_path / "prefect-home", monkeypatch):
        yield prefect_server


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """A Prefect CLI command (never interactive); raises with its output when it fails."""
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.5, what: str = "condition"):
    """Poll until `predicate()` returns something truthy (the server records task runs from events, a
    moment after they happen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# Read helpers. Every filter argument is given explicitly: with FastAPI >= 0.151 the Prefect 3.8.8 server
# answers 422 to the `null` that the client sends for an omitted limit / offset / sort.


def task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0)


def finished_task_runs(flow_run_id, names: set[str], timeout: float = 60) -> dict:
    """Task runs by name, once the server has recorded each of `names` in a final state (task runs reach the
    server as events, a moment after they happen)."""
    def ready():
        runs = {r.name: r for r in task_runs(flow_run_id)}
        if names <= set(runs) and all(runs[n].state and runs[n].state.is_final() for n in names):
            return runs
        return None

    return wait_for(ready, timeout=timeout, what=f"task runs {sorted(names)}")


def artifacts(flow_run_id) -> dict:
    """The flow run's artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, FlowRunFilterId, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=100, offset=0)
    return {a.key: a for a in found}


def latest_artifact(key: str) -> dict:
    """The newest artifact with this key, as the API returns it. The filter endpoint cannot find artifacts
    created in the flow itself (no task run) on FastAPI >= 0.151: it refuses `"task_runs": null`, and any
    task-run filter joins task runs, which drops those artifacts."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request("GET", "/artifacts/{key}/latest", path_params={"key": key})
        return response.json()
