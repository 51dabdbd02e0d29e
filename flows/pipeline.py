"""Flow `singer-pipeline`: the DVC pipeline as Prefect tasks, one `dvc repro <stage>` per stage.

    python -m flows.pipeline                                   # every stage dvc.yaml declares, local target
    python -m flows.pipeline --stages split train --set train.steps=20 --set evaluate.max_clips=2
    python -m flows.pipeline --target cluster                  # multi_gpu accelerate profile, Ray at RAY_ADDRESS
    prefect deployment run 'singer-pipeline/singer-pipeline' -p stages='["train","evaluate"]'

Without PREFECT_API_URL the run starts a temporary local Prefect server; with it, the run shows up there.

- Stages run one after the other in pipeline order (ingest, clip, crop, split, train, evaluate, ablate), each
  holding the slot of the global concurrency limit `dvc-repo`: DVC takes a repository lock, so two repros in
  one checkout would fail. The flow creates the limit when the server lacks it (`prefect gcl create dvc-repo
  --limit 1` does the same by hand).
- A stage that fails on a transient S3/network fault (connection refused, timeouts, 503/SlowDown) is retried
  with exponential backoff (`retries`, `retry_delay_seconds`: 10, 20, 40 s by default); any other failure (a
  Great Expectations suite, a bad parameter, NoSuchBucket) fails at once with the tail of the stage's stderr.
- `overrides` ({"train.steps": 20}) are written into params.yaml first, like `dvc exp run -S`, and the result
  must load with `singer.config.load_config` before any stage runs; unknown keys are refused.
- `target`: "local" (RAY_ADDRESS removed from the stages' environment: evaluation starts its own Ray) or
  "cluster" (train.accelerate_profile=multi_gpu unless overridden; RAY_ADDRESS required for evaluation).
  MLFLOW_TRACKING_URI / MLFLOW_RUN_ID and the AWS variables reach the stages untouched.
- Artifacts: `singer-data-stats` (table), `singer-eval-metrics` (table), `singer-ablation` (markdown),
  `singer-mlflow-run` (a link to the training run on an http(s) tracking server, else markdown with the
  `mlflow ui` command). Each is published only when its stage was part of the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.commands import CommandFailed, run_command, stage_env, tool
from flows.common import (
    STAGES,
    dvc_repo_slot,
    dvc_stage_names,
    ensure_concurrency_limit,
    resolve_repo,
    select_stages,
    target_overrides,
)
from flows.faults import retry_if_transient
from flows.overrides import apply_overrides, parse_set_options
from singer.urls import mlflow_ui, ui_url, version_url

RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
RESTORED_STAGE = re.compile(r"Stage '([^']+)' is cached - skipping run")  # DVC's run cache had the outputs
STAGE_LINE = re.compile(f"{RUNNING_STAGE.pattern}|{RESTORED_STAGE.pattern}")
DATA_STAGES = ("ingest", "clip", "crop", "split")
ARTIFACT_KEYS = {
    "data": "singer-data-stats",
    "eval": "singer-eval-metrics",
    "ablation": "singer-ablation",
    "mlflow": "singer-mlflow-run",
}
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY_S = 10.0

OverrideValue = str | int | float | bool


# ---------------------------------------------------------------------------------------------- tasks


@task(name="set-params", task_run_name="set-params", cache_policy=NO_CACHE)
def set_params(repo: str, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write the overrides into params.yaml (validated first); under the repo slot, since a running stage
    reads params.yaml."""
    logger = get_run_logger()
    with dvc_repo_slot():
        changes = apply_overrides(Path(repo) / "params.yaml", overrides)
    for key, change in changes.items():
        logger.info("params.yaml: %s = %r (was %r)", key, change["new"], change["old"])
    if not changes:
        logger.info("params.yaml unchanged (%d override(s) already in place)", len(overrides))
    return changes


@task(
    name="dvc-repro",
    task_run_name="dvc-repro-{stage}",
    retries=DEFAULT_RETRIES,
    retry_delay_seconds=exponential_backoff(DEFAULT_RETRY_DELAY_S),
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,  # a stage has side effects; DVC itself decides what is up to date
)
def repro_stage(stage: str, repo: str, target: str = "local") -> dict[str, Any]:
    """`dvc repro <stage>` in the repository; raises CommandFailed (with `.transient`) on a non-zero exit."""
    logger = get_run_logger()
    cmd = [tool("dvc"), "repro", stage]
    with dvc_repo_slot():
        logger.info("%s (in %s)", " ".join(cmd), repo)
        result = run_command(cmd, cwd=repo, env=stage_env(target), watch=STAGE_LINE,
                             log=lambda line: logger.info("[%s] %s", stage, line))
    if not result.ok:
        raise CommandFailed(f"dvc repro {stage}", result)
    ran = [m.group(1) for line in result.matched if (m := RUNNING_STAGE.search(line))]
    restored = [m.group(1) for line in result.matched if (m := RESTORED_STAGE.search(line))]
    done = [f"ran {', '.join(ran)}"] if ran else []
    done += [f"restored {', '.join(restored)} from DVC's run cache"] if restored else []
    logger.info("dvc repro %s: %s in %.1f s", stage, "; ".join(done) or "nothing changed", result.seconds)
    return {"stage": stage, "ran": ran, "restored": restored, "seconds": round(result.seconds, 2)}


@task(name="publish-artifacts", task_run_name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(repo: str, stages: list[str]) -> dict[str, Any]:
    """The run's tables, ablation report and MLflow link as Prefect artifacts; returns the metrics summary.
    A report that cannot be built is a warning, never a failed pipeline."""
    logger = get_run_logger()
    root = Path(repo)
    metrics_dir = root / "metrics"
    published: list[str] = []
    summary: dict[str, Any] = {}

    def attempt(name: str, fn) -> None:
        try:
            if fn():
                published.append(ARTIFACT_KEYS[name])
        except Exception as exc:  # reporting must not fail the pipeline
            logger.warning("artifact %s not published: %s: %s", ARTIFACT_KEYS[name], type(exc).__name__, exc)

    if set(DATA_STAGES) & set(stages):
        rows = data_stats_rows(metrics_dir)
        summary["data"] = rows
        attempt("data", lambda: rows and create_table_artifact(
            rows, key=ARTIFACT_KEYS["data"], description="Data stages: what each kept and rejected (metrics/*.json)"))
    if "train" in stages:
        train = read_json(metrics_dir / "train.json") or {}
        summary["train"] = {k: train.get(k) for k in ("final_loss", "first_loss", "steps", "seconds",
                                                        "samples_per_second", "mlflow_run_id", "variant")}
        attempt("mlflow", lambda: publish_mlflow_link(root, train.get("mlflow_run_id")))
    if "evaluate" in stages:
        evaluation = read_json(metrics_dir / "eval.json") or {}
        rows = eval_metric_rows(evaluation)
        summary["eval"] = {r["metric"]: r["value"] for r in rows}
        attempt("eval", lambda: rows and create_table_artifact(
            rows, key=ARTIFACT_KEYS["eval"],
            description=f"Evaluation on {evaluation.get('n_clips', '?')} test clip(s) (metrics/eval.json)"))
    if "ablate" in stages:
        markdown = ablation_markdown(root)
        summary["ablation"] = read_json(metrics_dir / "ablation.json")
        attempt("ablation", lambda: markdown and create_markdown_artifact(
            markdown, key=ARTIFACT_KEYS["ablation"], description="Ablation (paper Table 3 shape)"))
    summary["artifacts"] = published
    logger.info("published artifacts: %s", ", ".join(published) or "none")
    return summary


# ------------------------------------------------------------------------------------------- reports


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(value: Any, digits: int = 4) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


def _reasons(stats: dict) -> str:
    reasons = stats.get("rejected_reasons") or {}
    return ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))


def data_stats_rows(metrics_dir: Path) -> list[dict[str, Any]]:
    """One row per data stage from metrics/{ingest,clip,crop,split}.json (stages without a file are left out)."""
    rows: list[dict[str, Any]] = []

    def row(stage: str, unit: str, n_in: Any, kept: Any, rejected: Any, stats: dict, notes: str = "") -> None:
        rows.append({"stage": stage, "unit": unit, "in": n_in, "kept": kept, "rejected": rejected,
                     "subjects": stats.get("n_subjects", ""), "seconds": _num(stats.get("seconds", ""), 2),
                     "rejected reasons": _reasons(stats), "notes": notes})

    if ingest := read_json(metrics_dir / "ingest.json"):
        row("ingest", "videos", ingest.get("n_candidates"), ingest.get("n_accepted"), ingest.get("n_rejected"),
            ingest, f"{_num(ingest.get('total_duration_s'), 1)} s of video")
    if clip := read_json(metrics_dir / "clip.json"):
        row("clip", "clips", clip.get("n_videos"), clip.get("n_clips"), clip.get("n_rejected"), clip,
            f"from {clip.get('n_videos')} videos")
    if crop := read_json(metrics_dir / "crop.json"):
        row("crop", "clips", crop.get("n_in"), crop.get("n_accepted"), crop.get("n_rejected"), crop,
            f"{crop.get('resolution')} px, {crop.get('frames')} frames")
    if split := read_json(metrics_dir / "split.json"):
        train, test = split.get("n_train_clips") or 0, split.get("n_test_clips") or 0
        rows.append({"stage": "split", "unit": "clips", "in": train + test, "kept": train + test, "rejected": 0,
                     "subjects": (split.get("n_train_subjects") or 0) + (split.get("n_test_subjects") or 0),
                     "seconds": "", "rejected reasons": "",
                     "notes": f"train {train} clips / {split.get('n_train_subjects')} subjects, "
                              f"test {test} clips / {split.get('n_test_subjects')} subjects"})
    return rows


def eval_metric_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics/eval.json as rows: metric, value (None when unavailable), clips scored, note (why unavailable)."""
    n_ok = evaluation.get("n_ok") or {}
    unavailable = evaluation.get("unavailable") or {}
    notes = evaluation.get("notes") or {}
    rows = []
    for name, value in evaluation.items():
        if name in ("n_clips", "n_ok", "unavailable", "notes") or isinstance(value, (dict, list, str)):
            continue
        rows.append({"metric": name, "value": _num(value), "clips scored": n_ok.get(name, ""),
                     "note": unavailable.get(name) or notes.get(name) or ""})
    return rows


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(_num(r.get(c))) for c in columns) + " |")
    return "\n".join(lines)


def ablation_markdown(root: Path) -> str | None:
    """reports/ablation.md when the stage wrote one, else metrics/ablation.json rendered as a table."""
    report = root / "reports" / "ablation.md"
    if report.is_file():
        return report.read_text()
    data = read_json(root / "metrics" / "ablation.json")
    if data is None:
        return None
    rows = None
    if isinstance(data, dict):
        for key in ("rows", "table", "variants"):
            if isinstance(data.get(key), list) and all(isinstance(r, dict) for r in data[key]):
                rows = data[key]
                break
            if isinstance(data.get(key), dict) and all(isinstance(v, dict) for v in data[key].values()):
                rows = [{"variant": k, **v} for k, v in data[key].items()]
                break
        if rows is None and data and all(isinstance(v, dict) for v in data.values()):
            rows = [{"variant": k, **v} for k, v in data.items()]
    elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
        rows = data
    body = _markdown_table(rows) if rows else "```json\n" + json.dumps(data, indent=2) + "\n```"
    return "# Ablation (metrics/ablation.json)\n\n" + body + "\n"


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, else params.yaml's tracking.tracking_uri; a relative SQLite path is taken
    relative to the project folder (where the stages ran)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        from singer.config import load_config

        uri = load_config(root / "params.yaml").tracking.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((root / uri[len(prefix):]).resolve())
    elif "://" not in uri:  # a plain folder (file store)
        uri = str((root / uri).resolve())
    return uri


def _tracking_get(uri: str, endpoint: str, timeout: float = 5.0, **query: str) -> dict[str, Any]:
    """GET one tracking-API object: over REST with a short timeout on a server (the MLflow client would retry
    for minutes when it is down), through MlflowClient on a local store."""
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if endpoint == "runs/get":
        run = client.get_run(query["run_id"])
        return {"run": {"info": {"experiment_id": run.info.experiment_id, "run_name": run.info.run_name},
                        "data": {"tags": [{"key": k, "value": v} for k, v in run.data.tags.items()]}}}
    mv = client.get_model_version(query["name"], query["version"])
    return {"model_version": {"run_id": mv.run_id, "source": mv.source}}


def mlflow_run_url(uri: str, run_id: str, timeout: float = 5.0) -> str:
    """The MLflow UI page of a run (its experiment looked up through the tracking API)."""
    try:
        experiment = _tracking_get(uri, "runs/get", timeout, run_id=run_id)["run"]["info"]["experiment_id"]
        return ui_url(uri, f"experiments/{experiment}/runs/{run_id}")
    except Exception:  # server unreachable or auth in front of it: the run-only route redirects in the UI
        return ui_url(uri, f"runs/{run_id}")


def mlflow_links(uri: str, run_id: str | None = None, model: str | None = None,
                 version: str | None = None) -> list[tuple[str, str]]:
    """(text, URL) of the MLflow UI pages a flow run made: the registered version, the run that made it (else
    `run_id`) and the logged model it is. Looked up through the tracking API; what cannot be is left out."""
    links: list[tuple[str, str]] = []
    model_id = None
    try:
        if model and version:
            links.append((f"registered model {model} version {version}", version_url(uri, model, version)))
            mv = _tracking_get(uri, "model-versions/get", name=model, version=str(version))["model_version"]
            run_id = mv.get("run_id") or run_id
            if str(mv.get("source", "")).startswith("models:/m-"):
                model_id = str(mv["source"]).split("/", 1)[1]
        if run_id:
            run = _tracking_get(uri, "runs/get", run_id=run_id)["run"]
            experiment = run["info"]["experiment_id"]
            stage = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}.get("stage", "source")
            links.append((f"{stage} run {run['info'].get('run_name', '')} ({run_id})",
                          ui_url(uri, f"experiments/{experiment}/runs/{run_id}")))
            if model_id:
                links.append((f"logged model {model_id}", ui_url(uri, f"experiments/{experiment}/models/{model_id}")))
    except Exception:  # noqa: BLE001 - a link is a convenience; the flow's result does not depend on it
        pass
    return links


def links_markdown(uri: str, links: list[tuple[str, str]]) -> str:
    """Markdown list of `links`, with the command that serves the UI when the store has no server."""
    _, command = mlflow_ui(uri)
    body = "".join(f"- [{text}]({url})\n" for text, url in links)
    if command:
        body += (f"\nThe tracking store is `{uri}` (no web server): these links open once the UI runs:\n\n"
                 f"```bash\n{command}\n```\n")
    return body


def publish_mlflow_link(root: Path, run_id: str | None) -> bool:
    if not run_id:
        return False
    uri = tracking_uri(root)
    key = ARTIFACT_KEYS["mlflow"]
    if uri.startswith(("http://", "https://")):
        create_link_artifact(mlflow_run_url(uri, run_id), link_text=f"MLflow training run {run_id}", key=key,
                             description="The training run in the MLflow UI")
        return True
    links = mlflow_links(uri, run_id=run_id) or [(f"training run {run_id}", ui_url(uri, f"runs/{run_id}"))]
    create_markdown_artifact(f"# MLflow training run `{run_id}`\n\n" + links_markdown(uri, links), key=key,
                             description="How to open the training run in MLflow")
    return True


# ----------------------------------------------------------------------------------------------- flow


@flow(name="singer-pipeline", log_prints=True)
def pipeline(
    stages: list[str] | None = None,
    overrides: dict[str, OverrideValue] | None = None,
    target: Literal["local", "cluster"] = "local",
    repo_dir: str | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_S,
) -> dict[str, Any]:
    """Run the SINGER DVC pipeline stage by stage (`dvc repro <stage>`) and publish its reports.

    stages: subset of ingest, clip, crop, split, train, evaluate, ablate (default: all that dvc.yaml declares).
    overrides: params.yaml values to set first, like `dvc exp run -S` ({"train.steps": 20}).
    target: "local" or "cluster" (multi_gpu training, Ray at RAY_ADDRESS for evaluation).
    repo_dir: the project folder (default: the working directory).
    retries, retry_delay_seconds: retries of a stage on transient S3/network faults, exponential backoff base.
    """
    logger = get_run_logger()
    repo = resolve_repo(repo_dir)
    selected = select_stages(stages, dvc_stage_names(repo))
    wanted = target_overrides(target, overrides, selected)
    logger.info("repository %s, target %s, stages %s", repo, target, " -> ".join(selected))
    limit = ensure_concurrency_limit()
    if limit.startswith("unavailable"):
        logger.warning("concurrency limit 'dvc-repo' %s; stages are serialised by DVC's lock only", limit)

    changes = set_params(str(repo), wanted)
    repro = repro_stage.with_options(retries=max(0, int(retries)),
                                     retry_delay_seconds=exponential_backoff(float(retry_delay_seconds)))
    results = [repro(stage, str(repo), target) for stage in selected]  # in order: DVC locks the repository
    summary = publish_artifacts(str(repo), selected)
    return {
        "repo": str(repo),
        "target": target,
        "stages": selected,
        "ran": {r["stage"]: r["ran"] for r in results},
        "restored": {r["stage"]: r["restored"] for r in results if r["restored"]},
        "seconds": {r["stage"]: r["seconds"] for r in results},
        "params_changed": changes,
        "metrics": {k: v for k, v in summary.items() if k != "artifacts"},
        "mlflow_run_id": (summary.get("train") or {}).get("mlflow_run_id"),
        "artifacts": summary.get("artifacts", []),
    }


def _parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline.__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="stages to run (default: all in dvc.yaml)")
    parser.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override, e.g. -S train.steps=20 (repeatable)")
    parser.add_argument("--target", choices=["local", "cluster"], default="local")
    parser.add_argument("--repo-dir", default=None)
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES)
    parser.add_argument("--retry-delay-seconds", type=float, default=DEFAULT_RETRY_DELAY_S)
    args = parser.parse_args(argv)
    overrides = parse_set_options(parser, args.overrides)
    return {"stages": args.stages, "overrides": overrides, "target": args.target,
            "repo_dir": args.repo_dir, "retries": args.retries, "retry_delay_seconds": args.retry_delay_seconds}


if __name__ == "__main__":
    print(json.dumps(pipeline(**_parse_args()), indent=2, default=str))
