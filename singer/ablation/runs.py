"""Running an ablation: each planned variant x seed trained and evaluated the normal way, then the report.

A run `<variant>-s<seed>` trains through the normal path (`singer train`, i.e. `accelerate launch`) with
`train.variant`, `train.seed` and `train.steps = ablate.steps` (else `train.steps`: the same budget for every
variant), then evaluates the test split through `singer evaluate`'s code with `evaluate.seed = seed`.
Everything it writes lands in `<ablate.out_dir>/<variant>-s<seed>/` (models/, metrics/, eval/), written under a
`.partial` name and renamed when the run is whole. Checkpoints stay in `train.checkpoints_dir`, keyed by the
run's config, so a killed run resumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from singer.ablation.plan import (
    RUN_FILE,
    AblationError,
    AblationRun,
    ablation_key,
    child_run_id,
    mlflow_handoff,
    parent_run_id,
    planned_runs,
    run_dir,
    run_is_current,
    run_overrides,
)
from singer.ablation.report import write_report
from singer.config import Config


def _launch_training(params: Path, preset: str | None, overrides: list[str], env: dict[str, str]) -> None:
    singer = Path(sys.executable).parent / "singer"
    cmd = [str(singer) if singer.exists() else "singer", "train", "--params", str(params)]
    if preset:
        cmd += ["--preset", preset]
    for override in overrides:
        cmd += ["-S", override]
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise AblationError(f"training failed (exit {code}): {' '.join(cmd)}")


def run_one(cfg: Config, run: AblationRun, params: Path = Path("params.yaml"), preset: str | None = None,
            overrides: list[str] | None = None, launch: bool = True, progress: bool = False) -> dict[str, Any]:
    """Train and evaluate one variant x seed into `<out_dir>/<variant>-s<seed>/`; returns its eval summary."""
    import shutil

    from singer.config import load_config
    from singer.evaluate.runner import run_evaluate
    from singer.io import write_json_atomic
    from singer.release import tracking

    final = run_dir(cfg, run)
    partial = final.with_name(final.name + ".partial")
    run_ovr = [*(overrides or []), *run_overrides(cfg, run, partial)]
    run_cfg = load_config(params, preset=preset, overrides=run_ovr)

    parent = parent_run_id(cfg)
    child = child_run_id(cfg, parent, run) if parent else None
    env = tracking.child_env(child) if child else dict(os.environ)
    if launch:
        _launch_training(params, preset, run_ovr, env)
    else:
        from singer.train.loop import train

        with mlflow_handoff(env):
            train(run_cfg)
    with mlflow_handoff(env):
        summary = run_evaluate(run_cfg, progress=progress)
    write_json_atomic(partial / RUN_FILE, {"variant": run.variant, "seed": run.seed, "ablation_key": ablation_key(cfg),
                                           "mlflow_run_id": child})
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return summary


def run_all(cfg: Config, params: Path = Path("params.yaml"), preset: str | None = None,
            overrides: list[str] | None = None, launch: bool = True, progress: bool = False,
            report: bool = True) -> dict[str, Any] | None:
    """Every planned run not already on disk with the current parameters, then the report."""
    for run in planned_runs(cfg):
        if run_is_current(cfg, run):
            continue
        run_one(cfg, run, params, preset, overrides, launch=launch, progress=progress)
    return write_report(cfg) if report else None


def run_single(cfg: Config, variant: str | None, seed: int | None, params: Path = Path("params.yaml"),
               preset: str | None = None, overrides: list[str] | None = None, launch: bool = True,
               progress: bool = False, report: bool = True) -> dict[str, Any] | None:
    """One variant x seed (default: `full` and the first of `ablate.seeds`), as each DVC `ablate-run@...` stage
    runs it; then the report, when asked for and every planned run is on disk and current."""
    planned = planned_runs(cfg)
    one = AblationRun(variant or "full", int(seed if seed is not None else cfg.ablate.seeds[0]))
    if one not in planned:
        raise AblationError(f"{one.name} is not in ablate.variants x ablate.seeds "
                            f"({', '.join(r.name for r in planned)})")
    run_one(cfg, one, params, preset, overrides, launch=launch, progress=progress)
    return write_report(cfg) if report and all(run_is_current(cfg, r) for r in planned) else None
