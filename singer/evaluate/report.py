"""The outputs of `singer evaluate` (all written atomically) and their MLflow logging.

Under `evaluate.out_dir` (default `eval/`):

    per_clip.parquet          one row per clip: clip_id, subject, n_frames, truth_source / width_truth_source
                              (where the mouth opening's / width's truth came from), then per metric
                              `<m>` (float, NaN when unavailable), `<m>_status` ("ok"|"unavailable"),
                              `<m>_reason` (None when ok without a note)
    plots/mouth_curves.csv    DVC plot data: clip_id, frame, generated, truth (mouth opening per frame, Fig. 9)
    plots/per_metric.csv      DVC plot data: metric, mean, std, n_ok, n_clips
    plots/mouth_curves.png    generated vs ground-truth mouth opening, one panel per clip (at most 6)
    plots/per_metric.png      per-clip values of every available metric (bars)
    samples/<clip_id>.mp4     reference | ground truth | generated, upscaled, with the audio (`evaluate.sample_videos`
                              clips), and samples/<clip_id>.png, their mouth-opening curves
    timings.json              seconds per clip of each step/metric (mean over clips), total wall time

and `metrics/eval.json` (DVC metrics): the mean of each metric over the clips where it is available (null
when it is available on none), `unavailable: {metric: reason}`, `n_clips`, `n_ok: {metric: count}`, and
`notes: {metric: note}` (e.g. FVD over few clips).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from singer.config import Config
from singer.io import write_json_atomic, write_parquet_atomic, write_png_atomic, write_text_atomic

MAX_CURVE_PANELS = 6


def metric_names(rows: list[dict], set_level: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r["results"]:
            if k not in names:
                names.append(k)
    return names + [k for k in set_level if k not in names]


def per_clip_frame(rows: list[dict], names: list[str]):
    import pandas as pd

    records = []
    for r in rows:
        rec: dict[str, Any] = {"clip_id": r["clip_id"], "subject": r["subject"], "n_frames": r["n_frames"],
                               "truth_source": r["truth_source"],
                               "width_truth_source": r["width_truth_source"]}
        for n in names:
            res = r["results"].get(n)
            value = None if res is None else res["value"]
            rec[n] = float("nan") if value is None else float(value)
            rec[f"{n}_status"] = "unavailable" if res is None else res["status"]
            rec[f"{n}_reason"] = "not computed" if res is None else res["reason"]
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for n in names:
        df[n] = df[n].astype("float64")
        df[f"{n}_reason"] = df[f"{n}_reason"].astype("object")
    return df


def summarize(rows: list[dict], set_level: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Means over clips; unavailable metrics as None with a reason."""
    summary: dict[str, Any] = {"n_clips": len(rows)}
    unavailable: dict[str, str] = {}
    n_ok: dict[str, int] = {}
    notes: dict[str, str] = {}
    for n in names:
        if n in set_level:
            res = set_level[n]
            summary[n] = float(res.value) if res.is_ok and res.value is not None else None
            n_ok[n] = int(res.is_ok)
            if not res.is_ok:
                unavailable[n] = str(res.reason)
            elif res.reason:
                notes[n] = str(res.reason)
            continue
        results = [r["results"].get(n) for r in rows]
        values = [x["value"] for x in results if x is not None and x["status"] == "ok" and x["value"] is not None
                  and math.isfinite(x["value"])]
        n_ok[n] = len(values)
        summary[n] = float(np.mean(values)) if values else None
        if not values:
            reasons = sorted({str(x["reason"]) for x in results if x is not None and x.get("reason")})
            unavailable[n] = "; ".join(reasons) if reasons else "not computed"
        elif len(values) < len(rows):
            notes[n] = f"mean over the {len(values)} of {len(rows)} clips where it is available"
    summary["unavailable"] = unavailable
    summary["n_ok"] = n_ok
    summary["notes"] = notes
    return summary


def curves_frame(rows: list[dict]):
    import pandas as pd

    parts = []
    for r in rows:
        g = np.asarray(r["curves"]["generated"], np.float64)
        t = np.asarray(r["curves"]["truth"], np.float64)
        parts.append(pd.DataFrame({"clip_id": r["clip_id"], "frame": np.arange(len(g)), "generated": g,
                                   "truth": t[: len(g)] if len(t) >= len(g) else np.pad(t, (0, len(g) - len(t)),
                                                                                        constant_values=np.nan)}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["clip_id", "frame", "generated", "truth"])


def per_metric_frame(df, names: list[str]):
    import pandas as pd

    rows = []
    for n in names:
        if n not in df:
            continue
        v = df[n].to_numpy(np.float64)
        ok = np.isfinite(v)
        rows.append({"metric": n, "mean": float(v[ok].mean()) if ok.any() else float("nan"),
                     "std": float(v[ok].std()) if ok.any() else float("nan"), "n_ok": int(ok.sum()),
                     "n_clips": int(len(v))})
    return pd.DataFrame(rows, columns=["metric", "mean", "std", "n_ok", "n_clips"])


def _csv_atomic(path: Path, df) -> Path:
    return write_text_atomic(path, df.to_csv(index=False, na_rep=""))


def mouth_plot(curves, path: Path) -> Path:
    from matplotlib.figure import Figure

    clips = list(dict.fromkeys(curves["clip_id"]))[:MAX_CURVE_PANELS]
    fig = Figure(figsize=(8, 2.2 * max(1, len(clips))))
    for i, cid in enumerate(clips):
        ax = fig.add_subplot(max(1, len(clips)), 1, i + 1)
        c = curves[curves["clip_id"] == cid]
        ax.plot(c["frame"], c["truth"], label="ground truth", color="black")
        ax.plot(c["frame"], c["generated"], label="generated", color="tab:red")
        ax.set_title(str(cid), fontsize=9)
        ax.set_ylabel("mouth opening")
        if i == 0:
            ax.legend(fontsize=8)
    if clips:
        fig.axes[-1].set_xlabel("frame")
    return write_png_atomic(path, fig)


def metric_bars(df, names: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    avail = [n for n in names if n in df and np.isfinite(df[n].to_numpy(np.float64)).any()]
    fig = Figure(figsize=(3 * max(1, len(avail)), 3))
    for i, n in enumerate(avail):
        ax = fig.add_subplot(1, max(1, len(avail)), i + 1)
        ax.bar(range(len(df)), df[n].to_numpy(np.float64), color="tab:blue")
        ax.set_title(n, fontsize=9)
        ax.set_xticks(range(len(df)))
        ax.set_xticklabels([str(c)[-8:] for c in df["clip_id"]], rotation=90, fontsize=6)
    return write_png_atomic(path, fig)


def timings_summary(rows: list[dict], seconds: float, fanout: dict | None = None) -> dict[str, Any]:
    """Where the time went, and where the clips went: `clips_per_node` (Ray node id, or "local"), and from the
    fan-out (`fanout`: run_clips' stats) its mode, the workers lost and the clips given to another worker."""
    keys = sorted({k for r in rows for k in r["timings"]})
    nodes = Counter(str((r.get("worker") or {}).get("node", "local")) for r in rows)
    fanout = fanout or {}
    return {"seconds_total": seconds, "n_clips": len(rows),
            "seconds_per_clip_mean": {k: float(np.mean([r["timings"][k] for r in rows if k in r["timings"]]))
                                      for k in keys},
            "mode": fanout.get("mode"), "clips_per_node": dict(sorted(nodes.items())),
            "workers_lost": int(fanout.get("workers_lost", 0)), "resubmitted": list(fanout.get("resubmitted", []))}


def write_outputs(cfg: Config, rows: list[dict], set_level: dict[str, Any], seconds: float = 0.0, *,
                  eval_json: str | os.PathLike, fanout: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write everything (the summary to `eval_json`, which the runner names; `fanout`, run_clips' stats, into
    timings.json); returns (eval.json's content, {name: path or [paths]})."""
    from singer.media.sample_video import write_mouth_plot, write_sample_video

    out = Path(cfg.evaluate.out_dir)
    names = metric_names(rows, set_level)
    df = per_clip_frame(rows, names)
    summary = summarize(rows, set_level, names)
    if cfg.evaluate.audio_control != "none":  # a control, not the model's score: say so in the file
        summary["audio_control"] = cfg.evaluate.audio_control
    curves = curves_frame(rows)
    per_metric = per_metric_frame(df, [n for n in names if n not in set_level])
    paths: dict[str, Any] = {
        "per_clip": write_parquet_atomic(out / "per_clip.parquet", df),
        "mouth_curves_csv": _csv_atomic(out / "plots" / "mouth_curves.csv", curves),
        "per_metric_csv": _csv_atomic(out / "plots" / "per_metric.csv", per_metric),
        "mouth_curves_png": mouth_plot(curves, out / "plots" / "mouth_curves.png"),
        "per_metric_png": metric_bars(df, [n for n in names if n not in set_level], out / "plots" / "per_metric.png"),
        "timings": write_json_atomic(out / "timings.json", timings_summary(rows, seconds, fanout)),
    }
    samples, plots = [], []
    (out / "samples").mkdir(parents=True, exist_ok=True)  # a declared DVC output, even with no sample videos
    for r in rows:
        if "frames" in r:
            gt, gen = r["frames"]
            audio, rate = r["audio"]
            name = r["clip_id"]
            samples.append(write_sample_video(out / "samples" / f"{name}.mp4", gt, gen, fps=r["fps"],
                                              audio=audio, sample_rate=rate, reference=r.get("reference")))
            plots.append(write_mouth_plot(out / "samples" / f"{name}.png", r["curves"]["truth"],
                                          r["curves"]["generated"], title=str(r["clip_id"]), fps=r["fps"]))
    paths["samples"], paths["sample_plots"] = samples, plots
    paths["eval_json"] = write_json_atomic(eval_json, summary)
    return summary, paths


def log_to_mlflow(summary: dict[str, Any], paths: dict[str, Any], model_id: str | None = None) -> None:
    """Metric means (also against the logged model `model_id`, when given), the per-clip table, the plots, plot
    data and sample videos (each with its mouth-opening plot) into the active run."""
    import pandas as pd

    from singer.release import tracking

    values = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and v is not None}
    tracking.log_step(values, step=0, model_id=model_id)
    if summary.get("unavailable"):
        tracking.log_tags({f"unavailable.{k}": str(v)[:5000] for k, v in summary["unavailable"].items()})
    df = pd.read_parquet(paths["per_clip"])
    tracking.log_table(df, "eval/per_clip.json")
    tracking.log_artifact(paths["per_clip"], "eval")
    tracking.log_artifact(paths["eval_json"], "metrics")
    tracking.log_artifact(paths["timings"], "eval")
    for key in ("mouth_curves_csv", "per_metric_csv"):
        tracking.log_artifact(paths[key], "eval/plots")
    for key in ("mouth_curves_png", "per_metric_png"):
        tracking.log_figure(paths[key], f"plots/{Path(paths[key]).name}")
    for p in paths.get("samples", []):
        tracking.log_video(p, "samples")
    for p in paths.get("sample_plots", []):
        tracking.log_figure(p, f"samples/{Path(p).name}")


__all__ = ["log_to_mlflow", "per_clip_frame", "summarize", "write_outputs"]
