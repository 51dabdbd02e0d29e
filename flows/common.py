"""What the flows share: the stage list, running a command, telling transient faults from real failures,
writing parameter overrides into params.yaml, and the pull step of the deployments.

    result = run_command(["dvc", "repro", "split"], cwd=repo, env=stage_env("local"), log=print)
    is_transient("botocore.exceptions.EndpointConnectionError: Could not connect ...")   # True: retry
    apply_overrides(repo / "params.yaml", {"train.steps": 20, "evaluate.max_clips": "1"})

Overrides work like `dvc exp run -S key=value`: string values are parsed as YAML ("20" -> 20, "null" -> None,
"[ssim, lmd]" -> a list), the file is edited in place with ruamel.yaml's round trip (comments, order and
layout stay), unknown keys are refused, and the result must load with `singer.config.load_config` before it
replaces params.yaml (so a bad value fails the flow before any stage runs, and params.yaml stays as it was).

Transient faults are S3 and network errors (connection refused, timeouts, 503 / SlowDown, the DVC repository
lock held by another process): the same command may well succeed a little later. Everything else (a Great
Expectations suite failing, a bad parameter, a missing bucket, wrong keys) is a real failure: retrying it
only delays the error, so the retry condition says no and the task fails at once with the stderr tail.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The DVC stages the pipeline flow knows, in pipeline order (`ablate` aggregates the `ablate-run@<variant>`
# stages, which `dvc repro ablate` runs first).
STAGES: tuple[str, ...] = ("ingest", "clip", "crop", "split", "train", "evaluate", "ablate")
TARGETS: tuple[str, ...] = ("local", "cluster")
# Prefect global concurrency limit (1 slot) held around every command that takes DVC's repository lock.
DVC_CONCURRENCY_LIMIT = "dvc-repo"
TAIL_LINES = 40
VENV_BIN = Path(sys.executable).parent

# Substrings / patterns of S3 and network faults that are worth a retry (botocore, urllib3, requests,
# SeaweedFS/AWS error codes, DVC's repository lock).
TRANSIENT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"Could not connect to the endpoint URL",
        r"EndpointConnectionError",
        r"Connection refused",
        r"ConnectionRefusedError",
        r"Connection reset by peer",
        r"ConnectionResetError",
        r"Connection aborted",
        r"RemoteDisconnected",
        r"ConnectTimeout",
        r"ConnectTimeoutError",
        r"ReadTimeout",
        r"ReadTimeoutError",
        r"timed out",
        r"Temporary failure in name resolution",
        r"\bSlowDown\b",
        r"\bServiceUnavailable\b",
        r"\bRequestTimeout\b",
        r"\bThrottling(Exception)?\b",
        r"\b50[234] (Service Unavailable|Bad Gateway|Gateway Time-?out)\b",
        r"An error occurred \(50[0234]\)",          # botocore ClientError with a bare status code
        r"\b(HTTP|status|status code)[ :=]+50[234]\b",
        r"Unable to acquire lock",                   # DVC: another dvc process holds the repository lock
    )
)
# Faults that look like network errors but never heal by waiting: they win over the transient patterns.
PERMANENT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"\bNoSuchBucket\b",
        r"\bNoSuchKey\b",
        r"\bInvalidAccessKeyId\b",
        r"\bSignatureDoesNotMatch\b",
        r"\bAccessDenied\b",
        r"\bInvalidBucketName\b",
        r"no S3 credentials",
    )
)


class FlowInputError(ValueError):
    """A flow parameter is wrong (unknown stage or parameter key, invalid value, missing RAY_ADDRESS)."""


# ----------------------------------------------------------------------------------- fault classification


def is_transient(text: str) -> bool:
    """Does this error output describe a transient S3/network fault (retry) rather than a real failure?"""
    if not text:
        return False
    if any(p.search(text) for p in PERMANENT_PATTERNS):
        return False
    return any(p.search(text) for p in TRANSIENT_PATTERNS)


def exception_is_transient(exc: BaseException | None) -> bool:
    """An exception's own verdict (`.transient`) when it has one, else its text and its causes' types."""
    if exc is None:
        return False
    verdict = getattr(exc, "transient", None)
    if isinstance(verdict, bool):
        return verdict
    parts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return is_transient("\n".join(parts))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient faults.

    Must stay a plain function: Prefect 3.8 calls the condition only when `inspect.isfunction` (or a
    coroutine function) says so; a `functools.partial` or a callable object is silently treated as "never
    retry"."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return exception_is_transient(data)
    return is_transient(getattr(state, "message", "") or "")


# ------------------------------------------------------------------------------------------- commands


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


# -------------------------------------------------------------------------------------------- stages


def resolve_repo(repo_dir: str | os.PathLike | None) -> Path:
    """The project folder (default: the working directory); it must hold dvc.yaml and params.yaml."""
    repo = Path(repo_dir or os.getcwd()).expanduser().resolve()
    missing = [name for name in ("dvc.yaml", "params.yaml") if not (repo / name).is_file()]
    if missing:
        raise FlowInputError(f"{repo} is not a SINGER project folder: no {' or '.join(missing)} "
                             "(pass repo_dir, or start the flow from the repository root)")
    return repo


def dvc_stage_names(repo: Path) -> set[str]:
    """The stage names declared in the project's dvc.yaml (`foreach`/`matrix` stages by their base name)."""
    import yaml

    spec = yaml.safe_load((repo / "dvc.yaml").read_text()) or {}
    return set((spec.get("stages") or {}).keys())


def select_stages(requested: Sequence[str] | str | None, available: set[str] | None = None) -> list[str]:
    """The stages to run, in pipeline order. None means every known stage the project's dvc.yaml declares;
    an unknown name, or one dvc.yaml lacks, is an error (listing the choices)."""
    if requested is None:
        chosen = [s for s in STAGES if available is None or s in available]
        if not chosen:
            raise FlowInputError(f"dvc.yaml declares none of the stages {', '.join(STAGES)}")
        return chosen
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise FlowInputError(f"no stage given; choose from {', '.join(STAGES)} (or leave stages unset for all)")
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise FlowInputError(f"unknown stage(s) {', '.join(map(repr, unknown))}; choose from {', '.join(STAGES)}")
    if available is not None:
        absent = [s for s in names if s not in available]
        if absent:
            raise FlowInputError(f"stage(s) {', '.join(map(repr, absent))} not declared in dvc.yaml "
                                 f"(it has: {', '.join(sorted(available)) or 'nothing'})")
    return [s for s in STAGES if s in names]  # pipeline order, each once


def target_overrides(target: str, overrides: Mapping[str, Any] | None, stages: Sequence[str],
                     environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The overrides a target implies. `cluster`: training on the `multi_gpu` accelerate profile unless the
    overrides say otherwise, and evaluation on the Ray cluster of RAY_ADDRESS (required). `local`: as given."""
    environ = os.environ if environ is None else environ
    if target not in TARGETS:
        raise FlowInputError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    out = dict(overrides or {})
    if target == "cluster":
        out.setdefault("train.accelerate_profile", "multi_gpu")
        if {"evaluate", "ablate"} & set(stages) and not environ.get("RAY_ADDRESS"):
            raise FlowInputError("target 'cluster' evaluates on a Ray cluster: set RAY_ADDRESS for the worker "
                                 "(e.g. ray://<head-service>:10001), or use target 'local'")
    return out


# ------------------------------------------------------------------------------------------ overrides


def parse_value(value: Any) -> Any:
    """Strings are parsed as YAML, as `dvc exp run -S` and `singer -S` do; other values are kept."""
    if isinstance(value, str):
        import yaml

        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise FlowInputError(f"cannot parse {value!r} as a YAML value: {exc}") from None
    return value


def check_key(key: str) -> None:
    """Refuse a dotted key that names no parameter of `singer.config.Config` (typos fail loudly).

    `presets.<name>.…` and keys inside free-form mappings (`release.gate.<metric>`) are left to the full
    validation that follows."""
    from pydantic import BaseModel

    from singer.config import Config

    parts = key.split(".")
    if not key or not all(parts):
        raise FlowInputError(f"bad parameter key {key!r}: expected dotted names like train.steps")
    if parts[0] == "presets":
        if len(parts) < 3:
            raise FlowInputError(f"bad parameter key {key!r}: expected presets.<preset>.<section>.<name>")
        return
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        by_alias = {f.alias: name for name, f in fields.items() if f.alias}
        name = by_alias.get(part, part)
        where = ".".join(parts[:i]) or "params.yaml"
        if name not in fields:
            known = sorted(f.alias or n for n, f in fields.items())
            raise FlowInputError(f"unknown parameter {key!r}: {where} has no {part!r} (it has: {', '.join(known)})")
        annotation = fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if i < len(parts) - 1 and getattr(annotation, "__origin__", None) is not dict:
            raise FlowInputError(f"unknown parameter {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        return
    raise FlowInputError(f"parameter key {key!r} names a whole section; set its values one by one")


def _yaml_round_trip():
    from ruamel.yaml import YAML

    y = YAML()  # round trip: comments, key order, flow lists and quoting survive
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap long lines
    # ruamel writes None as an empty value; params.yaml spells it `null` (and a byte-identical round trip
    # of an untouched file depends on it)
    y.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _to_node(value: Any) -> Any:
    """Lists and dicts as flow-style ruamel nodes (`[a, b]`, `{k: v}`), the style params.yaml uses."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        node = CommentedSeq(_to_node(v) for v in value)
        node.fa.set_flow_style()
        return node
    if isinstance(value, dict):
        node = CommentedMap((k, _to_node(v)) for k, v in value.items())
        node.fa.set_flow_style()
        return node
    return value


def _append_key(mapping: Any, key: str, value: Any) -> None:
    """Add a key at the end of a mapping. The blank lines / comment lines that followed the old last key
    belong below the new one (else the new key would sit after the section's trailing blank line)."""
    keys = list(mapping)
    mapping[key] = value
    if not keys:
        return
    tokens = mapping.ca.items.get(keys[-1])
    token = tokens[2] if tokens and len(tokens) > 2 else None
    if token is None or not isinstance(getattr(token, "value", None), str):
        return
    head, _, rest = token.value.partition("\n")
    if not rest:
        return
    moved = copy.deepcopy(token)
    token.value = head + "\n"
    moved.value = "\n" + rest
    mapping.ca.items[key] = [None, None, moved, None]


def _set_dotted(tree: Any, key: str, value: Any) -> tuple[bool, Any]:
    """Set `a.b.c` in a ruamel tree; returns (existed, old value). Missing sections are created."""
    from ruamel.yaml.comments import CommentedMap

    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = CommentedMap()
            _append_key(node, part, child)
        elif not isinstance(child, dict):
            raise FlowInputError(f"parameter {key!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    existed = leaf in node
    old = node.get(leaf)
    if existed:
        node[leaf] = _to_node(value)
    else:
        _append_key(node, leaf, _to_node(value))
    return existed, old


def render_overrides(text: str, overrides: Mapping[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """params.yaml text with the overrides written in, and {key: {"old", "new"}} for the values changed."""
    y = _yaml_round_trip()
    tree = y.load(text)
    changes: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        check_key(key)
        value = parse_value(raw)
        existed, old = _set_dotted(tree, key, value)
        old_plain = _plain(old) if existed else "<unset>"
        if old_plain != value:
            changes[key] = {"old": old_plain, "new": value}
    buf = io.StringIO()
    y.dump(tree, buf)
    return buf.getvalue(), changes


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def validate_params_text(text: str, where: Path) -> None:
    """Load the text the way every stage will (`singer.config.load_config`); a clear error if it fails."""
    from pydantic import ValidationError

    from singer.config import load_config

    tmp = where.with_name(f".{where.name}.check-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text)
        load_config(tmp)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        raise FlowInputError(f"params.yaml would be invalid: {problems}") from None
    except (ValueError, TypeError) as exc:
        raise FlowInputError(f"params.yaml would be invalid: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def apply_overrides(params: str | os.PathLike, overrides: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Write the overrides into params.yaml (like `dvc exp run -S`) after checking the result loads.

    Without overrides the file is only validated. The file is replaced atomically and only when its text
    changes. Returns {key: {"old", "new"}} for every value that changed."""
    params = Path(params)
    text = params.read_text()
    new_text, changes = render_overrides(text, overrides or {})
    validate_params_text(new_text, params)
    if new_text != text:
        tmp = params.with_name(f".{params.name}.tmp-{os.getpid()}")
        tmp.write_text(new_text)
        os.chmod(tmp, params.stat().st_mode & 0o777)
        os.replace(tmp, params)
    return changes


# ------------------------------------------------------------------------------------------ deployments


def default_repo_dir() -> Path:
    """The checkout this package was installed from (editable install): the folder above `flows/`."""
    return Path(__file__).resolve().parents[1]


def set_repo_dir(directory: str | None = None) -> dict[str, str]:
    """Deployment pull step: enter the project folder before the flow is loaded.

    prefect.yaml passes `directory: "{{ $SINGER_REPO_DIR }}"`. Prefect's templating has no default value
    for environment variables: an unset one becomes "" at run time, and then this falls back to the
    checkout the `flows` package comes from."""
    path = Path(directory).expanduser() if directory and directory.strip() else default_repo_dir()
    path = path.resolve()
    if not (path / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{path} holds no dvc.yaml: set SINGER_REPO_DIR to the SINGER checkout "
                                "on the worker (or in the work pool's env job variable)")
    os.chdir(path)
    return {"directory": str(path)}


# -------------------------------------------------------------------------------------------- prefect


@contextlib.contextmanager
def dvc_repo_slot() -> Iterator[None]:
    """Hold the one slot of the `dvc-repo` global concurrency limit: two `dvc repro` in one repository
    would fight over DVC's lock. If the limit does not exist on the server, Prefect 3.8 logs a warning and
    lets the code run unguarded (strict=False), so a fresh temporary server still works."""
    from prefect.concurrency.sync import concurrency

    with concurrency(DVC_CONCURRENCY_LIMIT, occupy=1, strict=False):
        yield


def ensure_concurrency_limit(name: str = DVC_CONCURRENCY_LIMIT, limit: int = 1) -> str:
    """Create the global concurrency limit when the server lacks it (same as `prefect gcl create dvc-repo
    --limit 1`). Returns "exists", "created" or "unavailable: <reason>" (then runs are not serialised by
    Prefect, only by DVC's own lock)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
                return "exists"
            except ObjectNotFound:
                pass
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:  # another flow run created it meanwhile
                return "exists"
            return "created"
    except Exception as exc:  # a server that refuses (permissions) must not stop the pipeline
        return f"unavailable: {type(exc).__name__}: {exc}"


def parse_set_options(parser, items: list[str]) -> dict[str, str] | None:
    """`--set KEY=VALUE` options (the CLIs of both flows) -> {key: value}, None when there are none."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value
    return overrides or None
