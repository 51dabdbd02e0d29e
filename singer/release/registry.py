"""The model registry and releases (`singer register`, `singer release`).

    version = register_model(cfg, "models/full", metrics={"lmd": 2.1, "mouth_correlation": 0.4})
    outcome = release(cfg)      # {"passed": True, "promoted": True, "challenger": "2", "champion": "1", ...}

- The model is logged as an MLflow pyfunc (`SingerPyfunc`) wrapping the `save_pretrained` folder (artifact
  `pipeline`), with the `singer` package shipped in `code_paths`, so `mlflow.pyfunc.load_model(
  "models:/singer@champion")` and `mlflow models serve -m models:/singer@champion --env-manager local` work
  offline. Input: a DataFrame with `image` (base64 image file bytes) and `audio` (base64 wav/mp3/flac bytes),
  optional `steps`, `seed`, `guidance`; output: `video` (base64 mp4 bytes), `frames`, `seconds`.
- A bad request (a missing column, not base64, not an image / audio file, no face, audio longer than
  `serve.max_seconds` (stored in the model config when logged), steps < 1, ...) raises `ServeError`, checked
  before generation starts: the server answers 400 with {"error_code": "INVALID_PARAMETER_VALUE",
  "message": "<one line>", ...} and no stack trace.
- `register_model` registers a new version of `cfg.tracking.registered_model`: the logged model the training run
  made (MLflow 3 lineage: version -> logged model -> training run, with its loss plot, checkpoints, sample
  videos, params and data hash), puts the alias `challenger` on it, stores the evaluation metrics as version
  tags `metric.<name>` (names lower-cased, `-` -> `_`: `LSE-D` -> `metric.lse_d`; a metric that was not
  measured is absent, its reason in the one tag `unavailable`) and writes a description (data hash, git
  commit, variant, metrics). The training run gets the tag `registered_version`.
- `release` compares the challenger with the champion on every metric of `cfg.release.gate` (metric -> the
  largest allowed regression, in the metric's units; `DIRECTIONS` says which way is better). A gated metric
  fails when the challenger is worse by more than its margin; a `require_metrics` metric fails when the
  challenger lacks it. Without a champion only the required metrics are checked. On a pass the alias
  `champion` moves to the challenger; the former champion keeps its version number, gets the alias
  `previous_champion` and the tag `previous_champion=true` (plus `replaced_by=<version>`).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Any

from singer.release.pyfunc import (  # noqa: F401
    RegistryError,
    ServeError,
    SingerPyfunc,
    audio_seconds,
    log_pyfunc,
    model_signature,
)

if TYPE_CHECKING:
    from singer.config import Config

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
METRIC_TAG_PREFIX = "metric."
UNAVAILABLE_TAG = "unavailable"
NULL = "null"  # read from versions registered before absent metrics were left out

# "lower" is better / "higher" is better, by normalised metric name.
DIRECTIONS: dict[str, str] = {
    "lmd": "lower",
    "fvd": "lower",
    "lse_d": "lower",
    "ssim": "higher",
    "psnr": "higher",
    "cpbd": "higher",
    "mouth_correlation": "higher",
    "mouth_width_correlation": "higher",
    "identity": "higher",
    "bas": "higher",
    "diversity": "higher",
    "lse_c": "higher",
}



def metric_key(name: str) -> str:
    """`LSE-D` -> `lse_d`."""
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, str) and value.strip().lower() in ("", NULL, "none", "nan"):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


# --------------------------------------------------------------------------------------------- register


def _client(cfg: Config):
    import mlflow

    from singer.release.tracking import setup_mlflow

    setup_mlflow(cfg.tracking)
    return mlflow.MlflowClient()


def eval_metrics(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """`metrics/eval.json` -> (metrics, unavailable): the numeric metric means (names by `metric_key`; counts
    such as n_clips are not metrics) and, for each metric that could not be measured, its reason."""
    metrics = {metric_key(k): value for k, v in summary.items() if not str(k).startswith("n_")
               and not isinstance(v, (bool, dict, list)) and (value := _as_float(v)) is not None}
    unavailable = {metric_key(k): str(v) for k, v in (summary.get("unavailable") or {}).items()}
    return metrics, {k: v for k, v in unavailable.items() if k not in metrics}


def _description(name: str, lineage: dict[str, str], metrics: dict[str, float], unavailable: dict[str, str]) -> str:
    """The version's description (Markdown, as the registry UI shows it): what was trained on what, and how
    it scored."""
    lines = [f"**{name}** `{lineage.get('variant', '?')}`: trained on data `{lineage.get('data_hash', 'unknown')[:12]}` "
             f"at git `{lineage.get('git_commit', 'unknown')[:12]}`"
             + (" (uncommitted changes)" if lineage.get("git_dirty") == "true" else "") + "."]
    if lineage.get("train_run_id"):
        lines.append(f"Training run `{lineage['train_run_id']}`, logged model `{lineage.get('model_id', '?')}`.")
    key = [k for k in DIRECTIONS if k in metrics] + sorted(k for k in metrics if k not in DIRECTIONS)
    if key:
        lines.append("Metrics: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in key) + ".")
    if unavailable:
        lines.append("Not measured: " + "; ".join(f"{k} ({reason})" for k, reason in sorted(unavailable.items())) + ".")
    return "\n\n".join(lines)


def _logged_model(client, model_id: str | None):
    from mlflow.exceptions import MlflowException

    if not model_id:
        return None
    try:
        return client.get_logged_model(model_id)
    except MlflowException:
        return None


def register_model(cfg: Config, model_dir: str | os.PathLike, run_id: str | None = None,
                   metrics: dict[str, Any] | None = None, model_id: str | None = None,
                   unavailable: dict[str, str] | None = None) -> str:
    """Register a new version of `cfg.tracking.registered_model`, alias it `challenger`, and describe it.

    model_id: the logged model training made of `model_dir` (`metrics/train.json`'s `mlflow_model_id`): that
    one is registered, so version -> logged model -> training run is MLflow's own lineage. Without it (a
    folder trained elsewhere, or a store that does not have that model), the pyfunc is logged into `run_id`
    (or a new run `register`) and that is registered. metrics: the evaluation's means, stored as version tags
    `metric.<name>` (absent metrics are left out); unavailable: metric -> why it was not measured, in one tag
    `unavailable`. The description says the data hash, git commit, variant and metrics. Returns the version."""
    import mlflow

    from singer.release.tracking import start_run

    name = cfg.tracking.registered_model
    client = _client(cfg)
    present = {metric_key(k): v for k, raw in (metrics or {}).items() if (v := _as_float(raw)) is not None}
    missing = {metric_key(k): str(v) for k, v in (unavailable or {}).items() if metric_key(k) not in present}
    logged = _logged_model(client, model_id)
    if logged is not None:
        uri, source_run = f"models:/{logged.model_id}", logged.source_run_id
    else:
        with start_run(cfg, stage="register", run_id=run_id, run_name="register",
                       tags={"variant": cfg.train.variant}) as active:
            if active is None:
                raise RegistryError("register_model must run on the main process")
            info = log_pyfunc(model_dir, max_seconds=cfg.serve.max_seconds)
            if present and run_id is None:
                mlflow.log_metrics(present, model_id=info.model_id)
            uri, source_run = info.model_uri, active.info.run_id
    run = client.get_run(source_run)
    lineage = {k: run.data.tags[k] for k in ("variant", "data_hash", "git_commit", "git_dirty") if k in run.data.tags}
    lineage.update(train_run_id=source_run, model_id=uri.split("/", 1)[-1])
    # the source run is the version's own `run_id` field; the tag names it for lineage readers as `train_run_id`
    mv = mlflow.register_model(uri, name, tags={"model_dir": str(model_dir), **lineage})
    version = str(mv.version)
    for key, value in present.items():
        client.set_model_version_tag(name, version, METRIC_TAG_PREFIX + key, repr(value))
    if missing:
        client.set_model_version_tag(name, version, UNAVAILABLE_TAG,
                                     "; ".join(f"{k}: {reason}" for k, reason in sorted(missing.items()))[:5000])
    client.update_model_version(name, version, description=_description(name, lineage, present, missing))
    client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_tag(source_run, "registered_version", f"{name}/{version}")  # the run page says it was released
    return version


def version_metrics(version) -> dict[str, float | None]:
    """The `metric.*` tags of a ModelVersion, as floats (None for null)."""
    return {k[len(METRIC_TAG_PREFIX):]: _as_float(v) for k, v in (version.tags or {}).items()
            if k.startswith(METRIC_TAG_PREFIX)}


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def gate_check(challenger: dict[str, float | None], champion: dict[str, float | None] | None,
               gate: dict[str, float], require: list[str], floor: dict[str, float] | None = None) -> list[dict]:
    """One row per checked metric: metric, challenger, champion, allowed, direction, ok, reason.

    gate: largest regression against the champion; floor: the worst value accepted at all (a minimum for
    higher-is-better metrics, a maximum for lower-is-better ones), which also holds for the first release."""
    rows: list[dict] = []
    required = [metric_key(m) for m in require]
    gate = {metric_key(k): float(v) for k, v in gate.items()}
    floor = {metric_key(k): float(v) for k, v in (floor or {}).items()}
    for metric in dict.fromkeys([*required, *gate, *floor]):
        direction = DIRECTIONS.get(metric)
        if (metric in gate or metric in floor) and direction is None:
            raise RegistryError(f"release gate names {metric!r}, whose direction is unknown "
                                f"(known: {', '.join(sorted(DIRECTIONS))})")
        new = challenger.get(metric)
        old = None if champion is None else champion.get(metric)
        row = {"metric": metric, "challenger": new, "champion": old, "allowed": gate.get(metric),
               "direction": direction, "ok": True, "reason": ""}
        if new is None:
            if metric in required:
                row.update(ok=False, reason="missing on the challenger")
            elif champion is not None and old is not None:
                row.update(ok=False, reason="missing on the challenger (the champion has it)")
            else:
                row["reason"] = "not measured"
        elif metric in gate and old is not None:
            regression = (new - old) if direction == "lower" else (old - new)
            row["regression"] = regression
            if regression > gate[metric] + 1e-12:
                better = "lower" if direction == "lower" else "higher"
                row.update(ok=False, reason=f"worse by {regression:.4g} > allowed {gate[metric]:g} "
                                            f"({better} is better)")
        elif metric in gate:
            row["reason"] = "no champion value" if champion is not None else "no champion"
        if new is not None and metric in floor and row["ok"]:
            limit = floor[metric]
            if (new > limit + 1e-12) if direction == "lower" else (new < limit - 1e-12):
                row.update(ok=False, reason=f"{'above the ceiling' if direction == 'lower' else 'below the floor'} "
                                            f"{limit:g}")
        rows.append(row)
    return rows


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4g}"


def release(cfg: Config) -> dict:
    """Promote the `challenger` to `champion` when the gate passes. Returns
    {"passed", "promoted", "model", "challenger", "champion", "checks", "failures", "message"}; "champion" is
    the version that was champion before (None when there was none). Raises RegistryError when there is no
    challenger."""
    name = cfg.tracking.registered_model
    client = _client(cfg)
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model {name!r} has no '{CHALLENGER}' version: register one with `singer register`")
    champion = _alias_version(client, name, CHAMPION)
    out: dict[str, Any] = {"model": name, "challenger": str(challenger.version),
                           "champion": None if champion is None else str(champion.version)}
    if champion is not None and str(champion.version) == str(challenger.version):
        out.update(passed=True, promoted=False, checks=[], failures=[],
                   message=f"{name} version {challenger.version} is already {CHAMPION}")
        return out
    checks = gate_check(version_metrics(challenger), None if champion is None else version_metrics(champion),
                        cfg.release.gate, cfg.release.require_metrics, cfg.release.floor)
    failures = [c for c in checks if not c["ok"]]
    out.update(checks=checks, failures=failures, passed=not failures)
    if failures:
        parts = [f"{f['metric']} challenger={_fmt(f['challenger'])} champion={_fmt(f['champion'])} ({f['reason']})"
                 for f in failures]
        against = f"champion v{champion.version}" if champion is not None else "no champion"
        out.update(promoted=False, message=f"release gate failed for {name} v{challenger.version} against "
                                           f"{against}: " + "; ".join(parts))
        return out
    version = str(challenger.version)
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(champion.version))
        client.set_model_version_tag(name, str(champion.version), PREVIOUS_CHAMPION, "true")
        client.set_model_version_tag(name, str(champion.version), "replaced_by", version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted_from", out["champion"] or "none")
    if challenger.run_id:  # the run that made it says it is released (unless it was deleted since)
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):
            client.set_tag(challenger.run_id, "released_as", f"{name}/{version} {CHAMPION}")
    out.update(promoted=True, message=f"{name} v{version} is now {CHAMPION}"
               + (f" (was v{champion.version})" if champion is not None else ""))
    return out
