"""Great Expectations (1.x) suites for every stage's manifest; a failed expectation stops the pipeline.

    report = validate_stage("clip", cfg)      # reads the stage's manifest, raises ValidationError on failure

Each run writes `reports/<stage>.validation.json` (machine-readable) and `reports/<stage>.validation.md`
(what failed, with example values), pass or fail, so a stopped pipeline says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from singer.config import Config
from singer.data.common import StageError
from singer.io import write_json_atomic, write_text_atomic


class ValidationError(StageError):
    """A stage's output broke an expectation. The message names the report file."""


@dataclass
class Check:
    """One expectation, described independently of GE so suites read as plain data."""

    kind: str          # GE expectation class name, e.g. "ExpectColumnValuesToBeBetween"
    kwargs: dict


def _between(column: str, lo=None, hi=None) -> Check:
    return Check("ExpectColumnValuesToBeBetween", {"column": column, "min_value": lo, "max_value": hi})


def _not_null(*columns: str) -> list[Check]:
    return [Check("ExpectColumnValuesToNotBeNull", {"column": c}) for c in columns]


def _unique(column: str) -> Check:
    return Check("ExpectColumnValuesToBeUnique", {"column": column})


def _exists(*columns: str) -> list[Check]:
    return [Check("ExpectColumnToExist", {"column": c}) for c in columns]


def _rows(lo: int = 1) -> Check:
    return Check("ExpectTableRowCountToBeBetween", {"min_value": lo, "max_value": None})


def ingest_suite(cfg: Config) -> list[Check]:
    cols = ("id", "subject", "sha256", "file", "duration_s", "fps", "width", "height", "audio_sr")
    return [
        _rows(1), *_exists(*cols), *_not_null(*cols), _unique("id"), _unique("sha256"),
        _between("fps", cfg.ingest.min_fps, 240), _between("duration_s", cfg.ingest.min_duration_s - 1e-3, None),
        _between("width", 16, 16384), _between("height", 16, 16384), _between("audio_sr", 4000, 384000),
        _between("audio_channels", 1, 16), _between("bytes", 1, cfg.ingest.max_bytes),
    ]


def clip_suite(cfg: Config) -> list[Check]:
    c = cfg.clip
    cols = ("clip_id", "video_id", "subject", "video", "audio", "fps", "n_frames", "seconds")
    return [
        _rows(1), *_exists(*cols), *_not_null(*cols), _unique("clip_id"),
        _between("fps", c.fps * (1 - cfg.validate_.max_fps_error), c.fps * (1 + cfg.validate_.max_fps_error)),
        _between("n_frames", c.frames_per_clip, c.frames_per_clip), _between("seconds", c.seconds, c.seconds),
        _between("mean_luma", c.min_luma, 255), _between("motion", c.min_motion, None),
        _between("max_cut_score", 0, c.scene_cut_threshold), _between("width", 16, c.max_side),
        _between("height", 16, c.max_side),
    ]


def crop_suite(cfg: Config) -> list[Check]:
    cols = ("clip_id", "subject", "dir", "n_frames", "resolution")
    return [
        _rows(1), *_exists(*cols), *_not_null(*cols), _unique("clip_id"),
        _between("resolution", cfg.crop.resolution, cfg.crop.resolution),
        _between("n_frames", cfg.clip.frames_per_clip, cfg.clip.frames_per_clip),
        _between("jitter", 0, cfg.crop.max_jitter), _between("missing_fraction", 0, cfg.crop.max_missing_fraction),
    ]


def split_table(cfg: Config) -> pd.DataFrame:
    """One row per subject with the sides it appears on; the split suite checks it."""
    from singer.data.split import read_split

    crops = pd.read_parquet(cfg.paths.crops / "manifest.parquet").set_index("clip_id")
    sides = read_split(cfg)
    rows = []
    for side, ids in sides.items():
        for clip_id in ids:
            subject = crops["subject"].get(clip_id)
            rows.append({"clip_id": clip_id, "side": side, "subject": subject})
    table = pd.DataFrame(rows, columns=["clip_id", "side", "subject"])
    per_subject = table.groupby("subject", dropna=False)["side"].nunique().rename("n_sides").reset_index()
    n_subjects = len(per_subject)
    n_test = int(table.loc[table.side == "test", "subject"].nunique())
    per_subject["test_subject_fraction"] = n_test / max(1, n_subjects)
    per_subject["n_clips_missing_from_crops"] = int(table["subject"].isna().sum())
    per_subject["n_subjects_missing_from_split"] = len(set(crops["subject"]) - set(table["subject"].dropna()))
    return per_subject


def allowed_test_fractions(n_subjects: int, test_fraction: float) -> tuple[float, float]:
    """The share of test subjects a right split of `n_subjects` whole subjects has: k / n for the k in
    [1, n - 1] (both sides non-empty) nearest to n * test_fraction; both neighbours where it falls half-way.
    With few subjects that can be far from the target (5 subjects at 0.05: 1 of 5), but never further
    than whole subjects force."""
    n = int(n_subjects)
    if n < 2:
        return 0.0, 1.0  # no split is possible; the row-count expectation fails instead
    target = n * test_fraction
    best = min(abs(k - target) for k in range(1, n))
    near = [k for k in range(1, n) if abs(k - target) <= best + 1e-9]
    return min(near) / n - 1e-9, max(near) / n + 1e-9


def split_suite(cfg: Config) -> list[Check]:
    lo, hi = allowed_test_fractions(len(split_table(cfg)), cfg.split.test_fraction)
    return [
        _rows(2), *_not_null("subject"),
        _between("n_sides", 1, 1),  # no subject on both sides
        _between("test_subject_fraction", lo, hi),
        _between("n_clips_missing_from_crops", 0, 0),
        _between("n_subjects_missing_from_split", 0, 0),  # nobody dropped on the way
    ]


SUITES = {"ingest": ingest_suite, "clip": clip_suite, "crop": crop_suite, "split": split_suite}


def stage_table(stage: str, cfg: Config) -> pd.DataFrame:
    if stage == "split":
        return split_table(cfg)
    root = {"ingest": cfg.paths.ingested, "clip": cfg.paths.clips, "crop": cfg.paths.crops}[stage]
    return pd.read_parquet(root / "manifest.parquet")


def run_checks(name: str, table: pd.DataFrame, checks: list[Check]) -> dict:
    """Validate a dataframe with Great Expectations; returns a plain report dict."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": table})
    )
    expectations = [getattr(gx.expectations, c.kind)(**{k: v for k, v in c.kwargs.items()}) for c in checks]
    result = batch.validate(gx.ExpectationSuite(name=f"{name}_suite", expectations=expectations))
    rows = []
    for r in result.results:
        kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
        details = {k: r.result.get(k) for k in ("observed_value", "unexpected_count", "partial_unexpected_list")
                   if r.result.get(k) is not None}
        raised = (r.exception_info or {}).get("exception_message") if r.exception_info else None
        rows.append({"expectation": r.expectation_config.type, "kwargs": kwargs, "success": bool(r.success),
                     "details": details, **({"error": raised} if raised else {})})
    return {"suite": name, "success": bool(result.success), "n_rows": len(table), "results": rows}


def render_markdown(report: dict) -> str:
    status = "PASSED" if report["success"] else "FAILED"
    lines = [f"# Validation of `{report['suite']}`: {status}", "", f"Rows checked: {report['n_rows']}", "",
             "| result | expectation | arguments | details |", "|---|---|---|---|"]
    for r in sorted(report["results"], key=lambda r: r["success"]):
        args = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items())
        details = "; ".join(f"{k}: {v}" for k, v in r["details"].items()) + f" {r.get('error', '')}"
        lines.append(f"| {'ok' if r['success'] else '**FAIL**'} | {r['expectation']} | {args} | {details.strip()} |")
    return "\n".join(lines) + "\n"


def validate_stage(stage: str, cfg: Config) -> dict:
    """Run the stage's suite, write its reports, raise ValidationError when an expectation fails."""
    try:
        table = stage_table(stage, cfg)
        report = run_checks(stage, table, SUITES[stage](cfg))
    except (FileNotFoundError, KeyError) as exc:
        report = {"suite": stage, "success": False, "n_rows": 0,
                  "results": [{"expectation": "output exists", "kwargs": {}, "success": False,
                               "details": {"error": str(exc)}}]}
    reports = Path(cfg.paths.reports)
    json_path = write_json_atomic(reports / f"{stage}.validation.json", report)
    write_text_atomic(reports / f"{stage}.validation.md", render_markdown(report))
    if not report["success"]:
        failed = [r["expectation"] + "(" + ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) + ")"
                  for r in report["results"] if not r["success"]]
        raise ValidationError(
            f"{stage}: {len(failed)} expectation(s) failed: {'; '.join(failed[:5])}. "
            f"Report: {json_path.with_suffix('.md')}"
        )
    return report
