"""What the flows share about the project they run in: the stage list and targets, the repository folder
(and the deployments' pull step that enters it), and the Prefect concurrency slot around DVC's lock.

    repo = resolve_repo(None)                        # the working directory, if it holds dvc.yaml + params.yaml
    select_stages(["train", "split"], dvc_stage_names(repo))     # ["split", "train"]: pipeline order
    with dvc_repo_slot():                            # one `dvc repro` at a time per repository
        ...

Running commands is `flows.commands`, telling transient faults from real failures `flows.faults`, writing
parameter overrides into params.yaml `flows.overrides`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# The DVC stages the pipeline flow knows, in pipeline order (`ablate` aggregates the `ablate-run@<variant>`
# stages, which `dvc repro ablate` runs first).
STAGES: tuple[str, ...] = ("ingest", "clip", "crop", "split", "train", "evaluate", "ablate")
TARGETS: tuple[str, ...] = ("local", "cluster")
# Prefect global concurrency limit (1 slot) held around every command that takes DVC's repository lock.
DVC_CONCURRENCY_LIMIT = "dvc-repo"


class FlowInputError(ValueError):
    """A flow parameter is wrong (unknown stage or parameter key, invalid value, missing RAY_ADDRESS)."""


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
