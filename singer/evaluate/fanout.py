"""The Ray side of `singer evaluate` (`runner.run_clips` decides serial or this): start or join Ray, a pool of
`ClipEvaluator` actors (networks loaded once per worker), and the driver's own worker when the Ray is local
and ours; clips go to whichever worker is free. Start-up timings go into `stats` (benchmarks/evaluate.py).

A worker that dies (its process, or its node: a SIGKILLed raylet, a preempted machine) loses only the clip it
held: that clip goes back to the queue for the workers left (`stats["resubmitted"]`), and a clip's result is
kept only once, when a worker returns it. A clip whose own evaluation raises stops the run, as before.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from singer.config import Config

WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
NICENESS_VAR = "RAY_worker_niceness"  # RayConfig worker_niceness (Ray's default: 15)


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker process or node that went away (not for a clip that failed): its clip is
    given to another worker. An actor on a dead node raises ActorDiedError / ActorUnavailableError; a
    result held by that node, ObjectLostError (and its subclasses)."""
    from ray import exceptions

    names = ("RayActorError", "ActorUnavailableError", "ObjectLostError", "NodeDiedError", "WorkerCrashedError")
    return tuple(getattr(exceptions, n) for n in names if hasattr(exceptions, n))


def _init_ray(num_workers: int) -> bool:
    """Connect to Ray; True when this call started it (and must shut it down).

    A local Ray started here runs its workers at the driver's priority: Ray's default `worker_niceness` of 15
    makes them yield to every other process on the machine (measured: on 2 shared cores the 2 actors took
    3x longer per clip than the same work in-process at niceness 0), so the evaluation that asked for the
    machine would lose it to anything else. A cluster (`RAY_ADDRESS`) keeps its own setting."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", runtime_env=runtime_env, log_to_driver=False)
    else:
        with _env({NICENESS_VAR: os.environ.get(NICENESS_VAR, "0")}):  # the raylet it starts reads it
            ray.init(num_cpus=max(1, num_workers), include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=False)
    return True


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set environment variables for a `with` block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _WarmUp:
    """Compile (or load from its disk cache) librosa's numba beat tracker in a driver thread, once, not in N
    workers at once (`bas.warm_up`: a file lock keeps the compiles apart); `join()` re-raises its error."""

    def __init__(self, needed: bool):
        import threading

        self.seconds, self.error = 0.0, None
        self.thread = threading.Thread(target=self._run, daemon=True) if needed else None
        if self.thread is not None:
            self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            from singer.evaluate.metrics.bas import warm_up

            warm_up()
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self.error = exc
        self.seconds = time.perf_counter() - t0

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if self.error is not None:
                raise self.error


class _LocalWorker:
    """The driver's own share of the work when it starts a local Ray: a thread with a `ClipEvaluator` that
    takes clips from the shared queue like an actor, from the moment ray.init returns (while the actors start)."""

    def __init__(self, evaluator_cls, cfg: Config, threads: int | None, keep: set[int], take, bar):
        import threading

        self.evaluator_cls, self.cfg, self.threads = evaluator_cls, cfg, threads
        self.keep, self.take, self.bar = keep, take, bar
        self.rows: list[dict] = []
        self.error: BaseException | None = None
        self.startup: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, name="evaluate-driver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            evaluator = self.evaluator_cls(self.cfg, threads=self.threads)
            self.startup = evaluator.info()
            while (clip := self.take()) is not None:
                self.rows.append(evaluator.evaluate(clip, keep_frames=clip["index"] in self.keep))
                self.bar.update(1)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the driver's loop
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def run_ray(evaluator_cls, cfg: Config, clips: list[dict], keep: set[int], threads: int | None, workers: int,
            stats: dict, bar) -> list[dict]:
    """Score `clips` with `workers` processes (`runner.run_clips` says which); rows in completion order."""
    import threading

    import ray

    stats["mode"] = "ray"
    lost_worker = _lost_worker_errors()
    lock = threading.Lock()
    queue = list(clips)

    def take() -> dict | None:
        with lock:
            return queue.pop(0) if queue else None

    # the driver works too when the Ray is ours and local, and there is a second worker to share with
    driver_works = workers >= 2 and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    n_actors = min(workers - 1 if driver_works else workers, len(clips))
    local = None
    rows: list[dict] = []
    started, pool = False, []
    # the driver's own evaluator compiles librosa's beat tracker when it first needs it (under bas.warm_up's
    # file lock); without one, compile it here, once, alongside the actors' start. Both threads start after
    # ray.init: it forks Ray's processes with a `preexec_fn`, which Python documents as unsafe while other
    # threads run (a child can deadlock before its exec); a thread loading the networks during it stalled
    warm = _WarmUp(False)
    try:
        t0 = time.perf_counter()
        started = _init_ray(n_actors)
        stats["ray_init_seconds"] = time.perf_counter() - t0
        local = _LocalWorker(evaluator_cls, cfg, threads, keep, take, bar) if driver_works else None
        warm = _WarmUp("bas" in cfg.evaluate.metrics and local is None)
        t0 = time.perf_counter()
        actor_cls = ray.remote(num_cpus=1)(evaluator_cls)
        if not started:  # a session the caller started (or a cluster): our settings travel per actor
            actor_cls = actor_cls.options(runtime_env={"env_vars": dict(WORKER_ENV)})
        pool = [actor_cls.remote(cfg, str(Path.cwd()), threads) for _ in range(n_actors)]
        # an actor gets a clip once it is ready (its `info` answered), so the driver's worker takes the clips
        # that would otherwise wait behind an actor's start
        pending: dict[Any, Any] = {a.info.remote(): a for a in pool}
        starting = set(pending)
        clip_of: dict[Any, dict] = {}  # evaluate call -> its clip, to give it back when the worker is lost
        free: list = []
        stats["startup"], stats["resubmitted"], lost = [], [], 0
        # until every clip is scored: an actor still starting when nothing is left for it is not waited for
        while any(r not in starting for r in pending) or (queue and pending):
            if local is not None:
                local.check()
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                actor = pending.pop(ref)
                clip = clip_of.pop(ref, None)
                try:
                    value = ray.get(ref)  # the clip's own errors (RayTaskError) surface here, once
                except lost_worker as exc:  # its process or node died: the clip goes back, the actor is dropped
                    lost += 1
                    if clip is not None:
                        with lock:
                            queue.insert(0, clip)
                        stats["resubmitted"].append({"clip": clip["clip_id"], "error": type(exc).__name__})
                    continue
                if ref in starting:
                    stats["startup"].append(value)
                    if len(stats["startup"]) == len(pool):
                        stats["actors_ready_seconds"] = time.perf_counter() - t0
                        warm.join()
                        stats["warm_up_seconds"] = warm.seconds
                else:
                    rows.append(value)
                    bar.update(1)
                free.append(actor)
            while free and (clip := take()) is not None:
                actor = free.pop(0)
                ref = actor.evaluate.remote(clip, clip["index"] in keep)
                pending[ref], clip_of[ref] = actor, clip
        stats["workers_lost"] = lost
        if queue and local is None:
            raise RuntimeError(f"every Ray worker was lost ({lost}); {len(queue)} clip(s) not scored: "
                               f"{', '.join(c['clip_id'] for c in queue[:5])}")
        if local is not None:
            local.thread.join()
            local.check()
            rows += local.rows
            stats["driver_startup"], stats["driver_clips"] = local.startup, len(local.rows)
    finally:
        if local is not None and local.thread.is_alive():  # an error elsewhere: let its clip finish, take no more
            with lock:
                queue.clear()
            local.thread.join()
        if warm.thread is not None:
            warm.thread.join()
        for a in pool:
            ray.kill(a)
        if started:
            t0 = time.perf_counter()
            ray.shutdown()
            stats["ray_shutdown_seconds"] = time.perf_counter() - t0
    return rows
