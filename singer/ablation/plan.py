"""The plan of an ablation: which runs (variant x seed), where each lands, the key that says whether a run
on disk is current, and the MLflow runs they log into.

    planned_runs(cfg)                 # [AblationRun("full", 0), AblationRun("no_msm", 0), ...]
    run_dir(cfg, run)                 # <ablate.out_dir>/<variant>-s<seed>/
    run_overrides(cfg, run, root)     # the `-S` overrides that make the project's config this run's

MLflow: one parent run per ablation (found again by its `ablation_key` tag: the hash of the ablate, model,
train and evaluate parameters and the data), one nested child run per variant x seed that holds both its
training and its evaluation (the run id is handed to `accelerate launch` through `MLFLOW_RUN_ID`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from singer.config import Config

RUN_FILE = "run.json"  # written last into a run's folder: which variant, seed and ablation it belongs to


class AblationError(RuntimeError):
    """A run failed or the runs the report needs are missing: the message says which."""


@dataclass(frozen=True)
class AblationRun:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def planned_runs(cfg: Config) -> list[AblationRun]:
    from singer.train.loop import VARIANTS

    unknown = [v for v in cfg.ablate.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"ablate.variants has unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return [AblationRun(v, int(s)) for v in cfg.ablate.variants for s in cfg.ablate.seeds]


def run_dir(cfg: Config, run: AblationRun) -> Path:
    return Path(cfg.ablate.out_dir) / run.name


def run_overrides(cfg: Config, run: AblationRun, root: Path) -> list[str]:
    """The `-S` overrides that turn the project's config into this run's (paths under `root`)."""
    ab = cfg.ablate
    out = [
        f"train.variant={run.variant}",
        f"train.seed={run.seed}",
        f"train.steps={ab.steps if ab.steps is not None else cfg.train.steps}",
        f"train.models_dir={root / 'models'}",
        f"paths.metrics={root / 'metrics'}",
        f"evaluate.model_dir={root / 'models' / run.variant}",
        f"evaluate.out_dir={root / 'eval'}",
        f"evaluate.seed={run.seed}",
        f"evaluate.sample_videos={ab.sample_videos}",
    ]
    if ab.max_clips is not None:
        out.append(f"evaluate.max_clips={ab.max_clips}")
    if ab.inference_steps is not None:
        out.append(f"evaluate.inference_steps={ab.inference_steps}")
    return out


def ablation_key(cfg: Config) -> str:
    """Identifies one ablation: its budget, the model/train/evaluate settings and the data."""
    from singer.release.lineage import data_hash

    relevant = {name: getattr(cfg, name).model_dump(mode="json") for name in ("ablate", "model", "train", "evaluate")}
    # what each run sets itself, and what changes how a run executes but not what it computes
    for volatile in ("variant", "seed", "steps", "models_dir", "checkpoints_dir", "accelerate_profile",
                     "num_workers", "keep_last", "validate_every", "log_every"):
        relevant["train"].pop(volatile, None)
    for volatile in ("model_dir", "out_dir", "seed", "num_workers", "sample_videos"):
        relevant["evaluate"].pop(volatile, None)
    relevant["ablate"].pop("sample_videos", None)
    relevant["steps"] = cfg.ablate.steps if cfg.ablate.steps is not None else cfg.train.steps
    relevant["data"] = data_hash([cfg.paths.crops, cfg.paths.split])
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def run_is_current(cfg: Config, run: AblationRun) -> bool:
    """The run's folder is whole and was made with the current parameters and data."""
    try:
        info = json.loads((run_dir(cfg, run) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("ablation_key") == ablation_key(cfg)


# ------------------------------------------------------------------------------------------------ MLflow


def parent_run_id(cfg: Config) -> str | None:
    """The ablation's parent run (created on first use; found again by its `ablation_key` tag)."""
    from singer.release import tracking

    if not tracking.is_main_process():
        return None
    import mlflow

    key = ablation_key(cfg)
    experiment_id = tracking.setup_mlflow(cfg.tracking)
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id], f"tags.ablation_key = '{key}' and tags.stage = 'ablate'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    outer = os.environ.get("MLFLOW_RUN_ID") or None  # a flow's run: the ablation nests under it
    try:
        with tracking.start_run(cfg, "ablate", run_name="ablation", nested=outer is not None,
                                tags={"ablation_key": key}, data_paths=[cfg.paths.crops, cfg.paths.split]) as run:
            return run.info.run_id
    finally:
        if outer is not None:  # start_run takes it out of the environment
            os.environ["MLFLOW_RUN_ID"] = outer


def child_run_id(cfg: Config, parent: str, run: AblationRun) -> str:
    """A fresh child run for one variant x seed under the parent."""
    import mlflow

    from singer.release import tracking

    client = mlflow.MlflowClient()
    experiment_id = tracking.setup_mlflow(cfg.tracking)
    child = client.create_run(experiment_id, run_name=f"ablate-{run.name}", tags={
        "mlflow.parentRunId": parent, "stage": "ablate-run", "variant": run.variant, "seed": str(run.seed),
        "ablation_key": ablation_key(cfg)})
    client.set_terminated(child.info.run_id, "FINISHED")  # train resumes it (sets RUNNING) and ends it
    return child.info.run_id


class mlflow_handoff:
    """Temporarily replace os.environ's MLflow run hand-off (the evaluation logs into the child run)."""

    def __init__(self, env: dict[str, str]):
        self.env = {k: env[k] for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI") if k in env}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

