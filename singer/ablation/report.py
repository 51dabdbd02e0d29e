"""The report of an ablation, the shape of the paper's Table 3, from the runs on disk.

`metrics/ablation.json`, `reports/ablation.md`, `reports/ablation.csv`, `reports/ablation.png`: per variant and
metric the mean over seeds, the sample standard deviation when there are several seeds, and the per-seed
values; columns in the order of Table 3 (Diversity, BAS, LMD, FVD), then the metrics the paper does not
ablate. A metric unavailable for a run (e.g. FVD without I3D weights) is n/a with its reason. The table and
the plot are logged on the ablation's parent MLflow run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from singer.ablation.plan import (
    AblationError,
    AblationRun,
    ablation_key,
    mlflow_handoff,
    parent_run_id,
    planned_runs,
    run_dir,
    run_is_current,
)
from singer.config import Config

# Table 3's columns first, then ours; (name, label, higher is better)
TABLE_COLUMNS = [
    ("diversity", "Diversity", True),
    ("bas", "BAS", True),
    ("lmd", "LMD", False),
    ("fvd", "FVD", False),
    ("mouth_correlation", "mouth r", True),
    ("mouth_width_correlation", "mouth width r", True),
    ("identity", "identity", True),
    ("ssim", "SSIM", True),
    ("psnr", "PSNR", True),
    ("cpbd", "CPBD", True),
    ("LSE-D", "LSE-D", False),
    ("LSE-C", "LSE-C", True),
]
VARIANT_LABELS = {"no_msm": "without MSM", "no_sfm": "without SFM", "no_both": "without both", "full": "SINGER"}
ROW_ORDER = ["no_msm", "no_sfm", "no_both", "full"]


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

    from singer.io import write_png_atomic

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
    return write_png_atomic(path, fig)


def write_report(cfg: Config) -> dict[str, Any]:
    """Aggregate the runs, write metrics/ablation.json and reports/ablation.{md,csv,png}, log to MLflow."""
    from singer.io import write_json_atomic, write_text_atomic
    from singer.release import tracking

    result = aggregate(cfg)
    reports = Path(cfg.paths.reports)
    table = write_text_atomic(reports / "ablation.md", markdown_table(result))
    df = plot_frame(result)
    write_text_atomic(reports / "ablation.csv", df.to_csv(index=False, na_rep=""))
    png = bar_plot(df, reports / "ablation.png")
    write_json_atomic(Path(cfg.paths.metrics) / "ablation.json", result)
    parent = parent_run_id(cfg)
    if parent:
        with mlflow_handoff({"MLFLOW_RUN_ID": parent}), tracking.start_run(cfg, "ablate", tags={"ablation_key": result[
                "ablation_key"]}):
            tracking.log_artifact(table, "ablation")
            tracking.log_artifact(png, "plots")
            tracking.log_table(df, "ablation/table.json")
            flat = {f"{v}.{m}": s["mean"] for v, e in result["variants"].items() for m, s in e["metrics"].items()}
            tracking.log_step(flat, 0)
        result["mlflow_run_id"] = parent
    return result

