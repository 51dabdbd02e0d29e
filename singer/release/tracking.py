"""MLflow tracking: one run per stage execution, logged from the main process only.

    with start_run(cfg, stage="train", data_paths=[cfg.paths.split, cfg.paths.crops]) as run:
        log_step({"loss": 0.1, "lr": 1e-4}, step)           # per-step metrics
        log_checkpoint(ckpt_path, step)                     # -> artifacts checkpoints/step-000050/
        log_video("sample.mp4")                             # -> artifacts samples/sample.mp4
        log_figure(fig, "plots/loss.png"); log_table(df, "per_clip.json")
        model_id = log_model("models/full")                 # an MLflow 3 logged model, source run = this run

- Tracking URI: `MLFLOW_TRACKING_URI` when set, else `cfg.tracking.tracking_uri`; a relative SQLite path is
  made absolute, so processes started elsewhere (accelerate workers, flows) find the same database.
- Experiment `cfg.tracking.experiment`, created with `artifact_location` = the config's value as an
  absolute `file://` URI (`./mlartifacts` -> `file:///.../mlartifacts`), or as given when it has a scheme
  (`s3://bucket/prefix`: MLflow then uses `MLFLOW_S3_ENDPOINT_URL` and the AWS variables). With an
  http(s) tracking server a local folder is not used: the server's own artifact store is. An existing
  experiment keeps the location it was created with.
- One run for many processes: a run id passed as `run_id`, or in `MLFLOW_RUN_ID`, is resumed instead of
  a new run being created; hand it to workers with `child_env(run_id)`.
- Only the main process (accelerate's, else `RANK == 0`) talks to MLflow; on the others `start_run`
  yields None and every `log_*` is a no-op.
- Params: the flattened, scrubbed config (`singer.release.lineage.config_params`), never the environment.
  On a resumed run only the params it does not have yet are logged; a changed value is not re-logged
  (MLflow forbids it) but listed in the tag `params_changed_on_resume`.
- Tags: `stage`, `git_commit` (and `mlflow.source.git.commit`), `git_dirty`, `data_hash` (with data_paths),
  from `singer.release.lineage`. Runs are named for what they are (`train-full`, `evaluate-full`, `ablation`,
  `ablate-no_msm-s0`, `register`); the experiment is tagged as model training (`mlflow.experimentKind`).
- Robustness: `setup_mlflow` fails clearly on a store it cannot reach. After that, a failing `log_*`
  call warns once per kind and returns False; training goes on. After a failure, metrics are skipped for
  `METRICS_COOLDOWN_S` seconds so that a dead server does not stall every step. `failures()` counts them.
  (With a remote server, `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `MLFLOW_HTTP_REQUEST_TIMEOUT` bound how long
  one failing call can block.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from singer.release.lineage import _BAD_KEY_CHARS, config_params, data_hash, git_info, redact_url
from singer.urls import server_unreachable

if TYPE_CHECKING:
    from singer.config import Config, TrackingConfig

log = logging.getLogger(__name__)

METRICS_COOLDOWN_S = 30.0
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (at start); the message names the URI without credentials."""


# ------------------------------------------------------------------------------------------- helpers


def is_main_process() -> bool:
    """accelerate's main process when its state exists, else `RANK` (torchrun, MPI) == 0."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return bool(PartialState().is_main_process)
    except Exception:  # accelerate missing or not initialised
        pass
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var]) == 0
    return True


# --------------------------------------------------------------------------------------------- setup


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the config's; `sqlite:///rel.db` becomes `sqlite:////abs/rel.db`,
    a bare path becomes a `file://` URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///") :]
        if rest and rest != ":memory:":
            uri = "sqlite:///" + str(Path(rest).expanduser().resolve())
    elif not _SCHEME.match(uri) and not uri.startswith("databricks"):
        uri = Path(uri).expanduser().resolve().as_uri()
    return uri


def resolve_artifact_location(location: str) -> str:
    """`./mlartifacts` -> `file:///abs/mlartifacts`; a URI with a scheme (s3://, file://, ...) is kept."""
    if _SCHEME.match(location):
        return location
    return Path(location).expanduser().resolve().as_uri()


def experiment_artifact_location(tracking_uri: str, location: str) -> str | None:
    """The artifact location to create the experiment with. A local folder is meaningless to a remote
    tracking server (it would be a path on this machine): there the server's default (its proxied
    artifact store) is used (None), unless the config names a URI such as s3://."""
    if tracking_uri.startswith(("http://", "https://")) and not _SCHEME.match(location):
        return None
    return resolve_artifact_location(location)


def _check_http(uri: str, timeout: float = 5.0) -> None:
    exc = server_unreachable(uri, timeout)
    if exc is not None:
        raise TrackingError(f"MLflow server {redact_url(uri)} is not reachable: {exc}") from exc


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"  # "model training"


def setup_mlflow(cfg: TrackingConfig) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists. Returns its id.

    Raises TrackingError (with the URI, credentials masked) when the store cannot be reached or used.
    """
    import mlflow
    from mlflow.entities import LifecycleStage

    uri = resolve_tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _check_http(uri)
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    cfg.experiment, artifact_location=experiment_artifact_location(uri, cfg.artifact_location)
                )
            except Exception:  # created meanwhile by another process
                experiment = client.get_experiment_by_name(cfg.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == LifecycleStage.DELETED:
                client.restore_experiment(experiment_id)
        if EXPERIMENT_KIND_TAG not in (getattr(experiment, "tags", None) or {}):
            # without it MLflow 3's UI guesses, and an experiment of custom pyfunc models opens as GenAI
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(
            f"cannot use MLflow tracking store {redact_url(uri)}: {type(exc).__name__}: {exc}"
        ) from exc
    return experiment_id


def child_env(run_id: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess (e.g. `accelerate launch`) that must log into `run_id`."""
    import mlflow

    env = dict(os.environ if environ is None else environ)
    env["MLFLOW_RUN_ID"] = run_id
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    return env


# ------------------------------------------------------------------------------------------------ runs


def _log_params_once(client, run_id: str, params: dict[str, str]) -> list[str]:
    """Log the params the run does not have yet; return the keys whose existing value differs."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = {k: v for k, v in params.items() if k not in existing}
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    return changed


@contextlib.contextmanager
def start_run(
    cfg: Config,
    stage: str,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, Any] | None = None,
    data_paths: Iterable[str | os.PathLike] | None = None,
    run_name: str | None = None,
) -> Iterator[Any]:
    """A run for one stage execution; yields mlflow's ActiveRun on the main process, None elsewhere.

    run_id (else `MLFLOW_RUN_ID`, when not nested): resume that run. nested: a child run of the active
    run, or of the run named by `MLFLOW_RUN_ID` (as the ablation variants under one ablate run).
    The run ends FINISHED, FAILED when the block raises, KILLED on Ctrl-C (a resumed run is set RUNNING
    again).
    """
    if not is_main_process():
        yield None
        return
    import mlflow

    experiment_id = setup_mlflow(cfg.tracking)
    env_run = os.environ.get("MLFLOW_RUN_ID") or None
    resume_id = run_id or (None if nested else env_run)
    parent_id = None
    if nested and not resume_id and mlflow.active_run() is None and env_run:
        parent_id = env_run
    all_tags = {"stage": stage, **git_info(), **{k: str(v) for k, v in (tags or {}).items()}}
    if all_tags["git_commit"] != "unknown":
        all_tags["mlflow.source.git.commit"] = all_tags["git_commit"]
    if data_paths is not None:
        all_tags["data_hash"] = data_hash(data_paths)
    os.environ.pop("MLFLOW_RUN_ID", None)  # decided above; mlflow must not read (and delete) it itself
    try:
        if resume_id:
            active = mlflow.start_run(run_id=resume_id, nested=nested or mlflow.active_run() is not None)
        else:
            active = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=run_name,
                nested=nested,
                parent_run_id=parent_id,
            )
    except Exception as exc:
        if env_run is not None:
            os.environ["MLFLOW_RUN_ID"] = env_run
        raise TrackingError(f"cannot start or resume MLflow run {resume_id or ''}: {exc}") from exc
    client = mlflow.MlflowClient()
    rid = active.info.run_id
    try:
        changed = _log_params_once(client, rid, config_params(cfg))
        if changed:
            warnings.warn(
                f"run {rid} already has different values for params {changed}; kept the old ones",
                stacklevel=3,
            )
            all_tags["params_changed_on_resume"] = ",".join(changed)[:5000]
        mlflow.set_tags({k: str(v)[:5000] for k, v in all_tags.items()})
    except Exception as exc:
        mlflow.end_run("FAILED")
        if env_run is not None:
            os.environ["MLFLOW_RUN_ID"] = env_run
        raise TrackingError(f"cannot log params/tags to MLflow run {rid}: {exc}") from exc
    status = "FINISHED"
    try:
        yield active
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status)
        if env_run is not None:  # mlflow.end_run unsets MLFLOW_RUN_ID; later runs of this process need it
            os.environ["MLFLOW_RUN_ID"] = env_run


# ----------------------------------------------------------------------------------------- logging


_warned: set[str] = set()
_failures: Counter = Counter()
_cooldown_until: dict[str, float] = {}


def failures() -> dict[str, int]:
    """How many logging calls failed (or were skipped after a failure), per kind."""
    return dict(_failures)


def _reset_failures() -> None:
    _warned.clear()
    _failures.clear()
    _cooldown_until.clear()


def _active() -> bool:
    if not is_main_process():
        return False
    import mlflow

    return mlflow.active_run() is not None


def _guarded(kind: str, fn, *args, cooldown: float = 0.0, **kwargs) -> bool:
    """Run a logging call; on failure warn once per kind, count it, and return False."""
    if not _active():
        return False
    now = time.monotonic()
    if _cooldown_until.get(kind, 0.0) > now:
        _failures[kind] += 1
        return False
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        _failures[kind] += 1
        if cooldown:
            _cooldown_until[kind] = now + cooldown
        if kind not in _warned:
            _warned.add(kind)
            message = f"MLflow {kind} logging failed, training continues: {type(exc).__name__}: {redact_url(str(exc))[:500]}"
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return False
    _cooldown_until.pop(kind, None)
    return True


def _scalar(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def log_step(metrics: dict[str, Any], step: int, model_id: str | None = None) -> bool:
    """Per-step metrics (floats, 0-d tensors or numpy scalars); with `model_id`, recorded against that logged
    model too (MLflow 3: they show on the model's page, with this run as their source)."""
    import mlflow

    def _log() -> None:
        values = {_BAD_KEY_CHARS.sub("_", str(k)): _scalar(v) for k, v in metrics.items() if v is not None}
        mlflow.log_metrics(values, step=int(step), model_id=model_id)

    return _guarded("metrics", _log, cooldown=METRICS_COOLDOWN_S)


def log_checkpoint(path: str | os.PathLike, step: int, retention: int | None = None) -> bool:
    """A checkpoint folder as artifacts under `checkpoints/step-<step>/` (the name the training loop gives its local
    folders, `singer.train.checkpoint.step_dir_name`, written out here so that tracking does not import the
    training package that imports it). Every one is kept in MLflow, unless `retention` (tracking.
    checkpoint_retention) is set: then all but the newest `retention` are deleted from the run (`prune_checkpoints`)."""
    import mlflow

    logged = _guarded("checkpoint", mlflow.log_artifacts, str(path), f"checkpoints/step-{int(step):06d}")
    if logged and retention:
        from singer.release.retention import prune_checkpoints

        _guarded("checkpoint retention", prune_checkpoints, int(retention))
    return logged


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None, kind: str = "artifact") -> bool:
    import mlflow

    return _guarded(kind, mlflow.log_artifact, str(path), artifact_path)


def log_video(path: str | os.PathLike, artifact_path: str = "samples") -> bool:
    return log_artifact(path, artifact_path, kind="video")


def log_figure(figure: Any, artifact_file: str) -> bool:
    """A matplotlib figure (or the path of an image file) as `artifact_file` (e.g. 'plots/loss.png')."""
    import mlflow

    if isinstance(figure, (str, os.PathLike)):
        parent = str(Path(artifact_file).parent)
        return log_artifact(figure, None if parent == "." else parent, kind="figure")
    return _guarded("figure", mlflow.log_figure, figure, artifact_file)


def log_table(data: Any, artifact_file: str) -> bool:
    """A pandas DataFrame or a dict of equal-length columns as an MLflow table; any other dict as JSON."""
    import mlflow

    if isinstance(data, dict) and not all(isinstance(v, (list, tuple)) for v in data.values()):
        return _guarded("table", mlflow.log_dict, data, artifact_file)
    return _guarded("table", mlflow.log_table, data, artifact_file)


def log_tags(tags: dict[str, Any]) -> bool:
    """Tags on the active run."""
    import mlflow

    return _guarded("tags", mlflow.set_tags, tags)


def log_model(path: str | os.PathLike, max_seconds: float | None = None, tags: dict[str, Any] | None = None,
              name: str = "model") -> str | None:
    """A `save_pretrained` folder as an MLflow 3 logged model of the active run: the served pyfunc
    (`singer.release.pyfunc.log_pyfunc`) with its signature and input example. The run's `variant`, `stage`,
    `data_hash` and `git_commit` tags go on the logged model too. Returns its model id (what `singer register`
    registers and evaluation logs its metrics against), None when logging failed (warned once, as for any
    logging)."""
    import mlflow

    from singer.release.pyfunc import log_pyfunc

    info: list[Any] = []

    def _log() -> None:
        run_tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags  # as now, not as at the start
        inherited = {k: v for k, v in run_tags.items() if k in ("variant", "stage", "data_hash", "git_commit",
                                                                  "run_key")}
        info.append(log_pyfunc(path, name=name, max_seconds=max_seconds,
                               tags={**inherited, **{k: str(v) for k, v in (tags or {}).items()}}))

    return info[0].model_id if _guarded("model", _log) and info else None
