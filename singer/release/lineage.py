"""What a run records about where it came from: the parameters (scrubbed of secrets), the git commit and
the data it read.

    config_params(cfg)           # the flattened config as MLflow params; secrets masked
    git_info()                   # {"git_commit": sha, "git_dirty": "true"|"false"} (or "unknown")
    data_hash(["data/split"])    # sha256 over the paths (DVC's recorded md5 when dvc.lock has one)
    training_record(cfg, "models/full")  # metrics/train.json about that folder: its run and logged model ids

Params are the flattened config (`flatten(cfg.model_dump(mode="json", by_alias=True))`), never the
environment. A key matching `SECRET_KEY_PATTERN` gets the value `***`; credentials inside URLs
(`scheme://user:pass@host`) are masked.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from singer.config import flatten
from singer.urls import REDACTED, redact_url

if TYPE_CHECKING:
    from singer.config import Config

SECRET_KEY_PATTERN = re.compile(
    r"(secret|password|passwd|token|access_key|credential|api_key|apikey|private_key)", re.IGNORECASE
)
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def scrub_params(params: dict[str, Any]) -> dict[str, Any]:
    """Mask the values of secret-looking keys and credentials inside URLs."""
    out = {}
    for key, value in params.items():
        if SECRET_KEY_PATTERN.search(str(key)):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = redact_url(value)
        else:
            out[key] = value
    return out


def _param_value(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else ("None" if value is None else str(value))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened, scrubbed config as MLflow params (keys made valid, values cut to MLflow's limit)."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    flat = flatten(cfg.model_dump(mode="json", by_alias=True))
    out: dict[str, str] = {}
    for key, value in scrub_params(flat).items():
        name = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_ENTITY_KEY_LENGTH]
        out[name] = _param_value(value, MAX_PARAM_VAL_LENGTH)
    return out


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_info() -> dict[str, str]:
    """{'git_commit': sha or 'unknown', 'git_dirty': 'true'|'false'|'unknown'} of the current directory."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else ("true" if status else "false")
    return {"git_commit": commit, "git_dirty": dirty}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _dvc_lock_md5s(lock: Path) -> dict[str, str]:
    """path -> md5 of every out and dep recorded in dvc.lock (outs win: they are what a stage produced)."""
    import yaml

    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    found: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for kind in ("deps", "outs"):
            for entry in stage.get(kind) or []:
                if not (isinstance(entry, dict) and entry.get("path") and entry.get("md5")):
                    continue
                key = os.path.normpath(entry["path"])
                if kind == "outs" or key not in found:
                    found[key] = str(entry["md5"])
    return found


def data_hash(paths: Iterable[str | os.PathLike], dvc_lock: str | os.PathLike | None = "dvc.lock") -> str:
    """A sha256 over the given data paths: the md5 DVC recorded for a path in `dvc_lock` when it has one
    (cheap; paths relative to the lock's folder), else the sha256 of the file or of every file under
    the folder (relative names included). Missing paths count as 'missing'."""
    lock = Path(dvc_lock) if dvc_lock else None
    recorded = _dvc_lock_md5s(lock) if lock is not None and lock.is_file() else {}
    root = lock.parent.resolve() if lock is not None else Path.cwd()
    h = hashlib.sha256()
    for raw in sorted(str(p) for p in paths):
        path = Path(raw)
        try:
            rel = os.path.normpath(os.path.relpath(path.resolve(), root))
        except ValueError:
            rel = os.path.normpath(raw)
        h.update(f"path:{rel}\n".encode())
        if rel in recorded:
            h.update(f"dvc-md5:{recorded[rel]}\n".encode())
        elif path.is_file():
            h.update(f"sha256:{_sha256_file(path)}\n".encode())
        elif path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path).as_posix()}:{_sha256_file(f)}\n".encode())
        else:
            h.update(b"missing\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- stage records


def stage_json(cfg: Config, stage: str) -> Path:
    """`metrics/<stage>.json` (`metrics/<variant>-<stage>.json` for an ablation variant): the one naming rule
    for what train and evaluate write, so each stage finds the other's."""
    variant = cfg.train.variant
    return Path(cfg.paths.metrics) / (f"{stage}.json" if variant == "full" else f"{variant}-{stage}.json")


def training_record(cfg: Config, model_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """`metrics/train.json` when it describes `model_dir` (None: whichever folder it names): the training
    run (`mlflow_run_id`) and the model it logged (`mlflow_model_id`). None when there is no record, or when it
    is about another folder (a model trained elsewhere has no training run here)."""
    import json

    try:
        record = json.loads(stage_json(cfg, "train").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if model_dir is not None and Path(str(record.get("model_dir", ""))).resolve() != Path(model_dir).resolve():
        return None
    return record
