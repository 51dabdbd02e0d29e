"""`singer ablate`: train and evaluate the spectral-module variants with one budget, then the paper's Table 3.

    singer ablate                                  # every variant x seed of params.ablate, then the report
    singer ablate --variant no_msm --seed 0        # one run (what each DVC `ablate-run@...` stage does)
    singer ablate --report-only                    # the table from the runs already on disk (DVC `ablate`)
    dvc repro ablate                               # the same through DVC, one stage per variant x seed

A run `<variant>-s<seed>` trains through the normal path (`singer train`, i.e. `accelerate launch`) with
`train.variant`, `train.seed` and `train.steps = ablate.steps` (else `train.steps`: the same budget for every
variant), then evaluates the test split through `singer evaluate`'s code with `evaluate.seed = seed`.
Everything it writes lands in `<ablate.out_dir>/<variant>-s<seed>/` (models/, metrics/, eval/), written under a
`.partial` name and renamed when the run is whole. Checkpoints stay in `train.checkpoints_dir`, keyed by the
run's config, so a killed run resumes.

MLflow: one parent run per ablation (found again by its `ablation_key` tag: the hash of the ablate, model,
train and evaluate parameters and the data), one nested child run per variant x seed that holds both its
training and its evaluation (the run id is handed to `accelerate launch` through `MLFLOW_RUN_ID`), and the
table and plot on the parent.

The report (`metrics/ablation.json`, `reports/ablation.md`, `reports/ablation.csv`, `reports/ablation.png`):
per variant and metric the mean over seeds, the sample standard deviation when there are several seeds, and
the per-seed values; columns in the order of Table 3 (Diversity, BAS, LMD, FVD), then the metrics the paper
does not ablate. A metric unavailable for a run (e.g. FVD without I3D weights) is n/a with its reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from singer.config import Config

# Table 3's columns first, then ours; (name, label, higher is better)
TABLE_COLUMNS = [
    ("diversity", "Diversity", True),
    ("bas", "BAS", True),
    ("lmd", "LMD", False),
    ("fvd", "FVD", False),
    ("mouth_correlation", "mouth r", True),
    ("identity", "identity", True),
    ("ssim", "SSIM", True),
    ("psnr", "PSNR", True),
    ("cpbd", "CPBD", True),
    ("LSE-D", "LSE-D", False),
    ("LSE-C", "LSE-C", True),
]
VARIANT_LABELS = {"no_msm": "without MSM", "no_sfm": "without SFM", "no_both": "without both", "full": "SINGER"}
ROW_ORDER = ["no_msm", "no_sfm", "no_both", "full"]


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
    from singer.tracking import data_hash

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


# ------------------------------------------------------------------------------------------------ MLflow


def parent_run_id(cfg: Config) -> str | None:
    """The ablation's parent run (created on first use; found again by its `ablation_key` tag)."""
    from singer import tracking

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

    from singer import tracking

    client = mlflow.MlflowClient()
    experiment_id = tracking.setup_mlflow(cfg.tracking)
    child = client.create_run(experiment_id, run_name=run.name, tags={
        "mlflow.parentRunId": parent, "stage": "ablate-run", "variant": run.variant, "seed": str(run.seed),
        "ablation_key": ablation_key(cfg)})
    client.set_terminated(child.info.run_id, "FINISHED")  # train resumes it (sets RUNNING) and ends it
    return child.info.run_id


# ------------------------------------------------------------------------------------------------- runs


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

    from singer import tracking
    from singer.config import load_config
    from singer.evaluate.runner import run_evaluate
    from singer.io import write_json_atomic

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

        with _environ(env):
            train(run_cfg)
    with _environ(env):
        summary = run_evaluate(run_cfg, progress=progress)
    write_json_atomic(partial / RUN_FILE, {"variant": run.variant, "seed": run.seed, "ablation_key": ablation_key(cfg),
                                           "mlflow_run_id": child})
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return summary


class _environ:
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


# ----------------------------------------------------------------------------------------------- report


def run_is_current(cfg: Config, run: AblationRun) -> bool:
    """The run's folder is whole and was made with the current parameters and data."""
    try:
        info = json.loads((run_dir(cfg, run) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("ablation_key") == ablation_key(cfg)


def _run_metrics(cfg: Config, run: AblationRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """(eval summary, train summary) of a finished run, read from its folder."""
    if run_dir(cfg, run).exists() and not run_is_current(cfg, run):
        raise AblationError(f"run {run.name} in {run_dir(cfg, run)} was made with other parameters or data: "
                            f"rerun it (`singer ablate --variant {run.variant} --seed {run.seed}`)")
    metrics = run_dir(cfg, run) / "metrics"
    prefix = "" if run.variant == "full" else f"{run.variant}-"
    paths = metrics / f"{prefix}eval.json", metrics / f"{prefix}train.json"
    if not paths[0].exists():
        raise AblationError(f"run {run.name} has no {paths[0]}: run `singer ablate --variant {run.variant} "
                            f"--seed {run.seed}` (or `dvc repro ablate`) first")
    return json.loads(paths[0].read_text()), (json.loads(paths[1].read_text()) if paths[1].exists() else {})


def _spread(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": values}


def aggregate(cfg: Config) -> dict[str, Any]:
    """metrics/ablation.json's content from the runs on disk."""
    runs = planned_runs(cfg)
    per_variant: dict[str, Any] = {}
    columns = [c for c in TABLE_COLUMNS if c[0] in _metric_names(cfg)]
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == variant]
        evals, trains = zip(*(_run_metrics(cfg, r) for r in mine), strict=True)
        entry: dict[str, Any] = {"label": VARIANT_LABELS[variant], "seeds": [r.seed for r in mine], "metrics": {},
                                 "unavailable": {}}
        for name, _, _ in columns:
            values = [float(e[name]) for e in evals if isinstance(e.get(name), (int, float))]
            if values:
                entry["metrics"][name] = _spread(values)
            else:
                reasons = {(e.get("unavailable") or {}).get(name) for e in evals} - {None}
                entry["unavailable"][name] = "; ".join(sorted(reasons)) or "not computed"
        losses = [float(t["final_loss"]) for t in trains if isinstance(t.get("final_loss"), (int, float))]
        if losses:
            entry["final_loss"] = _spread(losses)
        entry["train_seconds"] = sum(float(t.get("seconds") or 0) for t in trains)
        per_variant[variant] = entry
    steps = cfg.ablate.steps if cfg.ablate.steps is not None else cfg.train.steps
    return {"budget": {"steps": steps, "seeds": list(cfg.ablate.seeds), "batch_size": cfg.train.batch_size,
                       "test_clips": cfg.ablate.max_clips if cfg.ablate.max_clips is not None
                       else cfg.evaluate.max_clips,
                       "inference_steps": cfg.ablate.inference_steps or cfg.evaluate.inference_steps},
            "columns": [{"metric": n, "label": lab, "higher_is_better": hib} for n, lab, hib in columns],
            "variants": per_variant,
            "ablation_key": ablation_key(cfg)}


def _metric_names(cfg: Config) -> set[str]:
    names = set(cfg.evaluate.metrics)
    if "lse" in names:
        names |= {"LSE-D", "LSE-C"}
    return names


def _cell(entry: dict[str, Any], metric: str) -> str:
    stat = entry["metrics"].get(metric)
    if stat is None:
        return "n/a"
    digits = 2 if metric in ("lmd", "psnr", "fvd", "diversity", "LSE-D", "LSE-C") else 4
    text = f"{stat['mean']:.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def markdown_table(result: dict[str, Any]) -> str:
    cols = result["columns"]
    budget = result["budget"]
    seeds = budget["seeds"]
    head = "| variant | " + " | ".join(c["label"] + ("↑" if c["higher_is_better"] else "↓") for c in cols) + " |"
    lines = [
        "# Ablation of the spectral modules (the shape of the paper's Table 3)",
        "",
        f"Same budget for every variant: {budget['steps']} training steps, batch {budget['batch_size']}, "
        f"seed(s) {', '.join(map(str, seeds))}; evaluation on the test split "
        f"({budget['test_clips'] or 'all'} clips, {budget['inference_steps']} sampling steps). "
        + ("Cells are mean ± sample std over the seeds." if len(seeds) > 1 else "One seed: no spread."),
        "",
        head,
        "|---" * (len(cols) + 1) + "|",
    ]
    variants = result["variants"]
    for v in [v for v in ROW_ORDER if v in variants]:
        lines.append(f"| {variants[v]['label']} | " + " | ".join(_cell(variants[v], c["metric"]) for c in cols) + " |")
    notes = {}
    for entry in variants.values():
        for metric, reason in entry["unavailable"].items():
            notes.setdefault(metric, reason)
    if notes:
        lines += ["", "n/a:"] + [f"- {m}: {r}" for m, r in sorted(notes.items())]
    lines += ["", "What the numbers say: " + verdict(result)]
    return "\n".join(lines) + "\n"


def verdict(result: dict[str, Any]) -> str:
    """One sentence per available metric: does the full model beat every ablated variant?"""
    variants = result["variants"]
    if "full" not in variants or len(variants) < 2:
        return "the full model and at least one ablated variant are needed for a comparison."
    full = variants["full"]["metrics"]
    parts = []
    for col in result["columns"]:
        m = col["metric"]
        if m not in full:
            continue
        others = {v: e["metrics"][m]["mean"] for v, e in variants.items() if v != "full" and m in e["metrics"]}
        if not others:
            continue
        better = [v for v, x in others.items()
                  if (full[m]["mean"] > x) == col["higher_is_better"] and full[m]["mean"] != x]
        parts.append(f"{col['label']}: full {'beats' if len(better) == len(others) else 'does not beat'} "
                     f"{'all' if len(better) == len(others) else f'{len(others) - len(better)} of {len(others)}'}"
                     f" ablated variant(s)")
    return ("; ".join(parts) + ". Differences smaller than the seed spread are not evidence either way."
            if parts else "no metric is available for both the full model and an ablated variant.")


def plot_frame(result: dict[str, Any]):
    import pandas as pd

    rows = []
    for v, entry in result["variants"].items():
        for m, stat in entry["metrics"].items():
            rows.append({"variant": v, "metric": m, "mean": stat["mean"], "std": stat["std"], "n": stat["n"]})
    return pd.DataFrame(rows, columns=["variant", "metric", "mean", "std", "n"])


def bar_plot(df, path: Path) -> Path:
    from matplotlib.figure import Figure

    from singer.evaluate.report import _png_atomic

    metrics = list(dict.fromkeys(df["metric"]))
    fig = Figure(figsize=(3 * max(1, len(metrics)), 3))
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(1, max(1, len(metrics)), i + 1)
        part = df[df["metric"] == m]
        ax.bar(part["variant"], part["mean"], yerr=part["std"].fillna(0).to_numpy(), capsize=3,
               color=["#4c72b0" if v == "full" else "#a0a0a0" for v in part["variant"]])
        ax.set_title(m)
        ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    return _png_atomic(fig, path)


def write_report(cfg: Config) -> dict[str, Any]:
    """Aggregate the runs, write metrics/ablation.json and reports/ablation.{md,csv,png}, log to MLflow."""
    from singer import tracking
    from singer.io import write_json_atomic, write_text_atomic

    result = aggregate(cfg)
    reports = Path(cfg.paths.reports)
    table = write_text_atomic(reports / "ablation.md", markdown_table(result))
    df = plot_frame(result)
    write_text_atomic(reports / "ablation.csv", df.to_csv(index=False, na_rep=""))
    png = bar_plot(df, reports / "ablation.png")
    write_json_atomic(Path(cfg.paths.metrics) / "ablation.json", result)
    parent = parent_run_id(cfg)
    if parent:
        with _environ({"MLFLOW_RUN_ID": parent}), tracking.start_run(cfg, "ablate", tags={"ablation_key": result[
                "ablation_key"]}):
            tracking.log_artifact(table, "ablation")
            tracking.log_artifact(png, "plots")
            tracking.log_table(df, "ablation/table.json")
            flat = {f"{v}.{m}": s["mean"] for v, e in result["variants"].items() for m, s in e["metrics"].items()}
            tracking.log_step(flat, 0)
        result["mlflow_run_id"] = parent
    return result


def run_all(cfg: Config, params: Path = Path("params.yaml"), preset: str | None = None,
            overrides: list[str] | None = None, launch: bool = True, progress: bool = False,
            report: bool = True) -> dict[str, Any] | None:
    """Every planned run not already on disk with the current parameters, then the report."""
    for run in planned_runs(cfg):
        if run_is_current(cfg, run):
            continue
        run_one(cfg, run, params, preset, overrides, launch=launch, progress=progress)
    return write_report(cfg) if report else None


__all__ = ["AblationError", "AblationRun", "aggregate", "markdown_table", "planned_runs", "run_all", "run_one",
           "write_report"]
