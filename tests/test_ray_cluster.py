"""Evaluation on a Ray cluster, the way a cluster runs it: a head started with `ray start --head` (no CPUs of its
own, the dashboard on) and two worker nodes joined with `ray start --address` (one CPU and a resource of their
own each), all on 127.0.0.1 with their own temp dir and ports.

- `singer evaluate` with `RAY_ADDRESS` pointing at the head: both nodes score clips (Ray's state API lists the
  evaluator's tasks by node, and they agree with timings.json's `clips_per_node`), and the per-clip values
  equal a serial run's (each clip is seeded by its index).
- `ray job submit` of the evaluation to the dashboard, with the entrypoint infra/ray/rayjob-evaluate.yaml gives
  KubeRay (`bash -c 'cd <checkout>; singer evaluate ...'`; Ray's job supervisor sets RAY_ADDRESS). One node's
  raylet is SIGKILLed while it holds a clip: the job still succeeds (its exit code and logs come back through
  `ray job submit`), every clip scored once; the lost clip went to the other node (timings.json:
  `workers_lost`, `resubmitted`, `clips_per_node`; the state API: the task that died with its node).
Every process the test starts is stopped, and no port stays bound.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

BIN = Path(sys.executable).parent
NODES = ("node_a", "node_b")
METRICS = ["ssim", "psnr", "lmd", "mouth_correlation"]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(args: list[str], env: dict) -> None:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _raylet(node: str) -> psutil.Process:
    """The raylet of the worker node with custom resource `node` (its resource list is on its command line)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "raylet" in (proc.info["name"] or "") and f"static_resource_list={node}," in cmd:
            return proc
    raise AssertionError(f"no raylet for {node}")


def _scoring(raylet: psutil.Process) -> bool:
    """Whether an actor of this raylet is inside `ClipEvaluator.evaluate` (Ray sets the process title)."""
    try:
        return any("ClipEvaluator.evaluate" in " ".join(c.cmdline()) for c in raylet.children(recursive=True))
    except psutil.Error:
        return False


@pytest.fixture
def cluster(monkeypatch):
    """(RAY_ADDRESS, the dashboard's URL, the environment for `ray` and `singer`): head + 2 worker nodes;
    stopped afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths must stay under 108 bytes
    # The auth mode is set, not left to Ray. With RAY_AUTH_MODE unset, `ray start --head` turns token auth on
    # when ~/.ray/auth_token exists (any local `ray.init()` writes it: another test, a user's evaluation), but
    # `ray start --address` does not look for the file, so the worker nodes were refused ("InvalidAuthToken"),
    # as in CI. Token auth itself is infra's (test_infra); here the mode is fixed for the `ray` and `singer`
    # processes and for this test's own clients (the state API, the job client).
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    before = {p.pid for p in psutil.process_iter()}
    gcs, dashboard, client_server, *ports = _free_ports(18)
    address, dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"

    def node_ports():
        a, b, c, d, e = ports.pop(), ports.pop(), ports.pop(), ports.pop(), ports.pop()
        return ["--dashboard-agent-listen-port", str(a), "--dashboard-agent-grpc-port", str(b),
                "--metrics-export-port", str(c), "--runtime-env-agent-port", str(d), "--node-manager-port", str(e)]

    try:
        _ray(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "0",
              "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
              "--ray-client-server-port", str(client_server), "--temp-dir", str(temp), "--disable-usage-stats",
              *node_ports()], env)
        for node in NODES:
            _ray(["start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                  "--resources", json.dumps({node: 1}), "--disable-usage-stats", *node_ports()[:8]], env)
        yield address, dashboard_url, env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        # this cluster's processes name its session folder (under `temp`) on their command line; a Ray another
        # test started meanwhile does not
        started = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                   and str(temp) in " ".join(p.info["cmdline"] or [])]
        for p in started:
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)
        assert not started, f"ray stop left {len(started)} processes: {[p.pid for p in started]}"
        for port in (gcs, dashboard, client_server):
            assert _bindable(port), f"the head's port {port} is still bound"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _evaluate_command(out: str, workers: int = 2) -> list[str]:
    return ["singer", "evaluate", "--no-progress", "-S", "evaluate.max_clips=null", "-S", "evaluate.inference_steps=1",
            "-S", "evaluate.identity_max_frames=2", "-S", "evaluate.cpbd_every=25", "-S", "evaluate.sample_videos=0",
            "-S", f"evaluate.out_dir={out}", "-S", f"evaluate.num_workers={workers}"]


def _evaluate(project: Path, env: dict, out: str, workers: int = 2, **extra: str) -> subprocess.Popen:
    return _popen(_evaluate_command(out, workers), project, {**env, **extra})


def _submit_evaluation(project: Path, dashboard: str, env: dict, out: str, submission_id: str) -> subprocess.Popen:
    """`ray job submit` as KubeRay's submitter runs it for infra/ray/rayjob-evaluate.yaml: the entrypoint enters
    the checkout and evaluates there, on the head, with RAY_ADDRESS set by Ray's job supervisor."""
    entrypoint = f"set -euo pipefail; cd {shlex.quote(str(project))}; {shlex.join(_evaluate_command(out))}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}}
    return _popen(["ray", "job", "submit", "--address", dashboard, "--submission-id", submission_id,
                   "--runtime-env-json", json.dumps(runtime_env), "--", "bash", "-c", entrypoint], project, env)


def _popen(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _evaluator_tasks(dashboard: str, job_id: str | None = None) -> list:
    """The `ClipEvaluator.evaluate` task attempts Ray's state API has recorded (all jobs, or one)."""
    from ray.util.state import list_tasks

    filters = [("name", "=", "ClipEvaluator.evaluate")] + ([("job_id", "=", job_id)] if job_id else [])
    return list_tasks(address=dashboard, filters=filters, limit=1000, raise_on_missing_output=False)


def _node_names(dashboard: str) -> dict[str, str]:
    """Ray node id -> the node's custom resource (node_a / node_b)."""
    from ray.util.state import list_nodes

    return {n.node_id: next((r for r in n.resources_total if r in NODES), "head")
            for n in list_nodes(address=dashboard, limit=100)}


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"singer evaluate did not finish in {timeout} s:\n{output[-3000:]}") from None
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.fixture
def project(tiny_project, tmp_path, model_dir):
    """The tiny project with an (untrained) model, every clip of the corpus in its test split (6 clips)."""
    dest = tmp_path / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    shutil.copytree(model_dir, dest / "models" / "full")
    split = dest / "data" / "split"
    clips = (split / "train.txt").read_text().split() + (split / "test.txt").read_text().split()
    (split / "test.txt").write_text("\n".join(clips) + "\n")
    return dest


def _per_clip(project: Path, out: str) -> pd.DataFrame:
    return pd.read_parquet(project / out / "per_clip.parquet").set_index("clip_id")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluation_spreads_over_the_nodes_and_survives_losing_one(cluster, project):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, dashboard, env = cluster
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    _finish(_evaluate(project, env, "eval-serial", workers=0))  # in this process, one clip after another
    serial = _per_clip(project, "eval-serial")[METRICS]
    on_cluster = _finish(_evaluate(project, env, "eval-cluster", RAY_ADDRESS=address))
    timings = json.loads((project / "eval-cluster" / "timings.json").read_text())
    assert timings["mode"] == "ray" and timings["workers_lost"] == 0, on_cluster[-2000:]
    nodes = timings["clips_per_node"]
    assert len(nodes) == 2 and sum(nodes.values()) == 6 and min(nodes.values()) >= 1, nodes  # both nodes worked
    pd.testing.assert_frame_equal(_per_clip(project, "eval-cluster")[METRICS], serial, rtol=1e-5)
    # Ray's own records say the same: the evaluator's tasks by node (they reach the state API a moment later)
    names = _node_names(dashboard)
    deadline = time.monotonic() + 60
    while len(finished := [t for t in _evaluator_tasks(dashboard) if t.state == "FINISHED"]) < 6 \
            and time.monotonic() < deadline:
        time.sleep(1.0)
    by_node = {names[t.node_id]: sum(u.node_id == t.node_id for u in finished) for t in finished}
    assert by_node == {names[n]: count for n, count in nodes.items()} and set(by_node) == set(NODES), by_node

    # the same as a Ray job, as KubeRay submits it, losing node_b while it holds a clip: the clip goes to
    # node_a, every clip is scored once, and the job succeeds
    submitted = _submit_evaluation(project, dashboard, env, "eval-lost", "singer-evaluate-lost-node")
    raylet = _raylet("node_b")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not _scoring(raylet):  # Ray titles a busy actor "ray::Class.method"
        time.sleep(0.2)
    assert _scoring(raylet), "node_b's evaluator never started a clip"
    time.sleep(1.0)
    raylet.send_signal(signal.SIGKILL)
    logs = _finish(submitted)  # `ray job submit` follows the job: its exit code is the job's
    job = JobSubmissionClient(dashboard).get_job_info("singer-evaluate-lost-node")
    assert job.status == JobStatus.SUCCEEDED and "eval-lost" in logs and "succeeded" in logs, logs[-3000:]
    timings = json.loads((project / "eval-lost" / "timings.json").read_text())
    df = _per_clip(project, "eval-lost")
    assert sorted(df.index) == sorted(serial.index) and df.index.is_unique
    assert timings["workers_lost"] >= 1 and len(timings["resubmitted"]) >= 1, logs[-2000:]
    assert sum(timings["clips_per_node"].values()) == 6
    pd.testing.assert_frame_equal(df[METRICS], serial, rtol=1e-5)
    # Ray's records of the job: the attempt that died with node_b, and six finished ones where timings.json
    # says the clips were scored
    job_id = job.driver_info.id if job.driver_info else None
    deadline = time.monotonic() + 60
    while True:
        attempts = _evaluator_tasks(dashboard, job_id)
        finished = [names[t.node_id] for t in attempts if t.state == "FINISHED"]
        lost = [t for t in attempts if t.state == "FAILED" and names.get(t.node_id) == "node_b"]
        if (len(finished) >= 6 and lost) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert sorted(finished) == sorted(names[n] for n, count in timings["clips_per_node"].items() for _ in range(count))
    assert lost and lost[0].error_type in ("ACTOR_UNAVAILABLE", "ACTOR_DIED", "NODE_DIED"), attempts
    states = {(names.get(t.node_id, "?"), t.state, t.error_type) for t in attempts}
    after = {names[n]: count for n, count in timings["clips_per_node"].items()}
    print(f"clips per node {by_node} (state API and timings.json); as a job after the kill {after}, workers lost "
          f"{timings['workers_lost']}, resubmitted {timings['resubmitted']}; task attempts {states}")
