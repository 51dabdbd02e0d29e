"""Running a stage's command: its environment, its output streamed to the flow's log, its process group.

    result = run_command(["dvc", "repro", "split"], cwd=repo, env=stage_env("local"), log=print)
    if not result.ok:
        raise CommandFailed("dvc repro split", result)       # .transient: may a retry help?
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flows.faults import is_transient

TAIL_LINES = 40
VENV_BIN = Path(sys.executable).parent


@dataclass
class CommandResult:
    cmd: list[str]
    returncode: int
    seconds: float
    stdout_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)   # stdout/stderr lines that matched `watch`

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of stderr (where DVC and the stages report errors), else of stdout."""
        chosen = self.stderr_tail or self.stdout_tail
        return "\n".join(chosen[-lines:])


class CommandFailed(RuntimeError):
    """A command exited non-zero. `.transient` says whether a retry may help; the message ends with the
    tail of its stderr."""

    def __init__(self, what: str, result: CommandResult):
        self.result = result
        # only the end of the output: an early, harmless warning must not make a real failure "transient"
        combined = "\n".join([*result.stderr_tail[-TAIL_LINES:], *result.stdout_tail[-TAIL_LINES:]])
        self.transient = is_transient(combined)
        kind = "transient fault, will be retried if retries are left" if self.transient else "not transient"
        super().__init__(
            f"{what} failed with exit code {result.returncode} after {result.seconds:.1f} s ({kind}). "
            f"Last lines of its output:\n{result.tail()}"
        )


def tool(name: str) -> str:
    """The venv's copy of a console script (dvc, singer, accelerate) when there is one."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


def stage_env(target: str = "local", base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage command: the caller's (MLFLOW_TRACKING_URI / MLFLOW_RUN_ID and the AWS
    variables pass through untouched) plus quiet DVC, sleeping OpenMP threads, the venv's bin first on PATH.
    `local` drops RAY_ADDRESS so evaluation starts its own Ray; `cluster` keeps it."""
    env = dict(os.environ if base is None else base)
    env["DVC_NO_ANALYTICS"] = "1"
    # spin-waiting OpenMP threads made torch 10-40x slower on shared cores (README); an explicit choice wins
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("PYTHONUNBUFFERED", "1")  # stage output reaches the flow's log as it is written
    path = env.get("PATH", "")
    if str(VENV_BIN) not in path.split(os.pathsep):
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{path}" if path else str(VENV_BIN)
    if target == "local":
        env.pop("RAY_ADDRESS", None)
    return env


def _pump(stream, sink: collections.deque, log: Callable[[str], None] | None, watch: re.Pattern | None,
          matched: list[str]) -> None:
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        sink.append(line)
        if watch is not None and watch.search(line):
            matched.append(line)
        if log is not None:
            log(line)
    stream.close()


def run_command(
    cmd: Sequence[str],
    cwd: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    *,
    log: Callable[[str], None] | None = None,
    watch: re.Pattern | None = None,
    tail_lines: int = TAIL_LINES * 5,
    timeout: float | None = None,
) -> CommandResult:
    """Run `cmd`, passing each output line to `log` as it comes, and keep the last lines of each stream.

    The command gets its own process group: if the caller is interrupted (the flow run is cancelled, a
    timeout fires) the whole group is killed, so no `accelerate launch` keeps training in the background
    while holding DVC's lock."""
    cmd = [str(c) for c in cmd]
    out: collections.deque[str] = collections.deque(maxlen=tail_lines)
    err: collections.deque[str] = collections.deque(maxlen=tail_lines)
    matched: list[str] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=str(cwd), env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
        start_new_session=True,
    )
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, log, watch, matched), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err, log, watch, matched), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        returncode = proc.wait(timeout=timeout)
    except BaseException:
        _kill_group(proc)
        raise
    for pump in pumps:
        pump.join(timeout=10)
    return CommandResult(cmd, returncode, time.monotonic() - t0, list(out), list(err), matched)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
