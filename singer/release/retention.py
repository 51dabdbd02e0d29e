"""`tracking.checkpoint_retention`: keep only the newest N checkpoint artifacts of an MLflow run.

    log_checkpoint(path, step, retention=3)      # singer.release.tracking: logs, then prune_checkpoints(3)

MLflow keeps every checkpoint by default (the mission: every checkpoint goes to MLflow). With N set, after each
logged checkpoint the run's older `checkpoints/step-*` folders beyond the newest N are deleted through the run's
artifact repository. Stores that cannot delete (the base repository's `delete_artifacts` does nothing) keep every
checkpoint and say so once: a user who asked for retention would rather pay for storage than lose the checkpoint
a resume needs, and MLflow has no other way to drop artifacts of a live run.
"""

from __future__ import annotations

import logging
import re
import warnings

log = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(r"^checkpoints/step-(\d+)$")
_warned: set[str] = set()


def deletes(repo) -> bool:
    """Whether an artifact repository implements deletion (the base class's `delete_artifacts` does nothing)."""
    from mlflow.store.artifact.artifact_repo import ArtifactRepository

    return type(repo).delete_artifacts is not ArtifactRepository.delete_artifacts


def prune_checkpoints(retention: int) -> list[str]:
    """Delete the active run's checkpoint artifacts but the newest `retention` (by step); returns what went.

    Through the run's artifact repository (local folders, S3, the tracking server's proxied store and others that
    implement deletion). Where the store cannot delete, nothing is deleted: every checkpoint is kept, and a warning
    (once) says so; a checkpoint is never dropped unlogged, because the newest one is the one a resume needs."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if retention < 1:
        raise ValueError(f"tracking.checkpoint_retention must be at least 1, got {retention}")
    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    logged = []
    for info in client.list_artifacts(run.info.run_id, "checkpoints"):
        match = _CHECKPOINT_DIR.match(info.path)
        if info.is_dir and match:
            logged.append((int(match.group(1)), info.path))
    doomed = [path for _, path in sorted(logged)[:-retention]]
    if not doomed:
        return []
    repo = get_artifact_repository(run.info.artifact_uri)
    if not deletes(repo):
        if repo.artifact_uri not in _warned:
            _warned.add(repo.artifact_uri)
            message = (f"tracking.checkpoint_retention={retention}: the artifact store {type(repo).__name__} cannot "
                       f"delete, so MLflow keeps every checkpoint of this run")
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return []
    for path in doomed:
        repo.delete_artifacts(path)
    return doomed
