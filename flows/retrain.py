"""Flow `singer-retrain`: pull new videos from S3, retrain, evaluate, register, release.

    python -m flows.retrain s3://singer/incoming                      # nothing new: says so and stops
    python -m flows.retrain s3://singer/incoming --set train.steps=500
    prefect deployment run 'singer-retrain/singer-retrain' -p source=s3://singer/incoming

Steps:
1. `pull-new-data` lists the objects under the prefix (`singer.storage`, boto3) and compares them with the
   ledger `data/retrain-ledger.json` ({"s3://bucket/key": {"etag", "size", "path", "ingested_at"}}): an object
   is new when the ledger lacks its URI or holds another ETag (re-uploaded with other content). Videos
   (`ingest.extensions`) and their sidecars (`.truth.json`, `.vocals.wav`) are taken; the subject is the first
   folder under the prefix, and the layout is kept: `s3://b/incoming/alice/take1.mp4` ->
   `data/raw/alice/take1.mp4`. Downloads go to a temporary folder beside data/raw (`data/.retrain-<id>/`),
   are verified (size + MD5/sha256, `singer.storage.download_prefix`), and are moved into data/raw only once
   every new object is in: a failure leaves data/raw as it was. S3/network faults are retried with
   exponential backoff (`s3_retries`, `s3_retry_delay_seconds`); when the server stays down the task fails
   with the endpoint and the error, and nothing reaches data/raw.
   Nothing new: the flow logs "no new data under s3://..., nothing to do" and runs no stage.
2. `dvc-add-raw`: `dvc add data/raw` (updates data.dvc, or whichever .dvc file tracks data/raw).
3. The `singer-pipeline` flow as a subflow (default stages ingest .. evaluate: the ablation is not part of a
   routine retrain; pass `stages` to change that).
4. `singer register` (challenger) and `singer release` (champion if the gate passes). A refused release is an
   outcome, reported with the gate's reason in the `singer-release` artifact and the flow's result; it does
   not fail the flow. Registering is skipped when `evaluate` was not among the stages (no fresh metrics).
5. The ledger is written last, so a run that failed anywhere is retried in full by the next one (downloads of
   files already in data/raw with the same checksum are skipped, and DVC reruns only what changed).
Objects deleted from S3 are not deleted from data/raw.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.commands import CommandFailed, CommandResult, run_command, stage_env, tool
from flows.common import (
    STAGES,
    FlowInputError,
    dvc_repo_slot,
    dvc_stage_names,
    ensure_concurrency_limit,
    resolve_repo,
    select_stages,
    target_overrides,
)
from flows.faults import exception_is_transient, retry_if_transient
from flows.overrides import parse_set_options
from flows.pipeline import OverrideValue, links_markdown, mlflow_links, pipeline, tracking_uri

LEDGER = Path("data/retrain-ledger.json")
SIDECAR_SUFFIXES = (".truth.json", ".vocals.wav")  # travel with their video (singer.data.ingest.SIDECARS)
RETRAIN_STAGES = [s for s in STAGES if s != "ablate"]
DEFAULT_S3_RETRIES = 4
DEFAULT_S3_RETRY_DELAY_S = 10.0
RELEASE_ARTIFACT = "singer-release"


class S3PullError(RuntimeError):
    """Listing or downloading the new objects failed; `.transient` says whether a retry may help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


# --------------------------------------------------------------------------------------------- ledger


def ledger_path(repo: Path) -> Path:
    return repo / LEDGER


def read_ledger(repo: Path) -> dict[str, dict[str, Any]]:
    """{"s3://bucket/key": {"etag", "size", "path", "ingested_at"}} of every object already ingested."""
    try:
        return json.loads(ledger_path(repo).read_text()).get("objects", {})
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise FlowInputError(f"{ledger_path(repo)} is not valid JSON ({exc}); fix or delete it") from None


def write_ledger(repo: Path, objects: list[dict[str, Any]]) -> Path:
    """Add the objects to the ledger (atomic replace)."""
    entries = read_ledger(repo)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for obj in objects:
        entries[obj["uri"]] = {"etag": obj["etag"], "size": obj["size"], "path": obj["path"], "ingested_at": now}
    path = ledger_path(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"objects": dict(sorted(entries.items()))}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- S3 pull


def _wanted(relative: str, extensions: list[str]) -> bool:
    name = relative.lower()
    return name.endswith(tuple(e.lower() for e in extensions)) or name.endswith(SIDECAR_SUFFIXES)


def find_new_objects(source: str, objects: list[dict[str, Any]], ledger: dict[str, dict[str, Any]],
                     extensions: list[str], raw_dir: str) -> list[dict[str, Any]]:
    """The listed objects that are videos or sidecars and that the ledger lacks (or knows with another ETag),
    each with its URI and its path under data/raw (the layout under the prefix, subject folder first)."""
    from singer.storage import parse_s3_uri, s3_uri

    bucket, prefix = parse_s3_uri(source)
    folder = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
    new = []
    for obj in objects:
        key = obj["key"]
        if key.endswith("/") or not key.startswith(folder):
            continue  # folder markers; `s3://b/raw` must not take `rawhide/...`
        parts = [p for p in key[len(folder):].split("/") if p not in ("", ".")]
        if not parts or ".." in parts or not _wanted(parts[-1], extensions):
            continue
        uri = s3_uri(bucket, key)
        known = ledger.get(uri)
        if known and known.get("etag") == obj["etag"]:
            continue
        new.append({"uri": uri, "key": key, "etag": obj["etag"], "size": obj["size"],
                    "path": str(Path(raw_dir) / Path(*parts))})
    return new


def _remove_stale_downloads(data_dir: Path) -> None:
    """Temporary download folders of earlier runs that were killed."""
    for stale in data_dir.glob(".retrain-*"):
        shutil.rmtree(stale, ignore_errors=True)


def download_new(new: list[dict[str, Any]], repo: Path, raw_dir: str, client: Any) -> int:
    """Download every new object to a temporary folder beside data/raw, then move them all into place (under
    the `dvc-repo` slot: data/raw must not change under a running `dvc repro`). Files already in data/raw with
    the object's size and checksum are not fetched again. Returns the bytes fetched."""
    from singer import storage

    parent = (repo / raw_dir).parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(parent)
    staging = parent / f".retrain-{uuid.uuid4().hex[:12]}"  # same filesystem: the moves are renames
    # already in data/raw with the same content (a run that failed after its pull): nothing to fetch
    fetch = [o for o in new if storage.verify_file(repo / o["path"], int(o["size"]), o["etag"]) is not True]
    try:
        for obj in fetch:
            rel = Path(obj["path"]).relative_to(raw_dir)
            # one object per call: download_prefix lists the key itself, verifies, renames atomically
            storage.download_prefix(obj["uri"], staging / rel.parent, client=client)
            if not (staging / rel).is_file():
                raise S3PullError(f"{obj['uri']} vanished while it was being downloaded", transient=True)
        with dvc_repo_slot():
            for obj in fetch:
                target = repo / obj["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / Path(obj["path"]).relative_to(raw_dir), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(int(o["size"]) for o in fetch)


@task(
    name="pull-new-data",
    task_run_name="pull-new-data",
    retries=DEFAULT_S3_RETRIES,
    retry_delay_seconds=exponential_backoff(DEFAULT_S3_RETRY_DELAY_S),
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
def pull_new_data(source: str, repo: str) -> dict[str, Any]:
    """List `source`, find what the ledger lacks, download it into data/raw. Returns {"new": [...], "bytes"}."""
    from singer import storage
    from singer.config import load_config

    logger = get_run_logger()
    root = Path(repo)
    cfg = load_config(root / "params.yaml")
    endpoint = storage.resolve_endpoint(cfg.s3) or "the default AWS endpoint"
    try:
        # boto3 retries once more itself (a blip); longer outages are Prefect's retries, visible in the UI
        client = storage.s3_client(cfg.s3, max_attempts=2)
        listed = storage.list_objects(source, client=client)
        raw_dir = str(cfg.paths.raw)
        new = find_new_objects(source, listed, read_ledger(root), list(cfg.ingest.extensions), raw_dir)
        logger.info("%s: %d object(s), %d new", source, len(listed), len(new))
        size = download_new(new, root, raw_dir, client) if new else 0
    except (storage.StorageError, OSError) as exc:
        transient = exception_is_transient(exc)
        raise S3PullError(f"pulling new data from {source} (S3 endpoint {endpoint}) failed: {exc}",
                          transient=transient) from exc
    for obj in new:
        logger.info("new: %s -> %s (%d bytes)", obj["uri"], obj["path"], obj["size"])
    return {"new": new, "bytes": size, "listed": len(listed)}


def pull_with_retries(retries: int, retry_delay_seconds: float):
    """`pull-new-data` with the flow's S3 retry policy: `retries` more tries on transient faults, waiting
    retry_delay_seconds * 2**n before retry n+1 (exponential backoff)."""
    return pull_new_data.with_options(retries=max(0, int(retries)),
                                      retry_delay_seconds=exponential_backoff(float(retry_delay_seconds)))


# ------------------------------------------------------------------------------------- DVC, registry


@task(name="dvc-add-raw", task_run_name="dvc-add-raw", retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def track_raw(repo: str) -> str:
    """`dvc add data/raw`: DVC finds the .dvc file that already tracks it (data.dvc here) and updates it."""
    from singer.config import load_config

    logger = get_run_logger()
    raw = str(load_config(Path(repo) / "params.yaml").paths.raw)
    cmd = [tool("dvc"), "add", raw]
    with dvc_repo_slot():
        result = run_command(cmd, cwd=repo, env=stage_env(), log=lambda line: logger.info("[dvc add] %s", line))
    if not result.ok:
        raise CommandFailed(" ".join(cmd[1:]), result)
    return raw


def _singer(repo: str, *args: str) -> tuple[int, list[str], CommandResult]:
    env = stage_env()
    env["COLUMNS"] = "1000"  # rich wraps at 80 columns without a terminal: keep messages on one line
    logger = get_run_logger()
    result = run_command([tool("singer"), *args], cwd=repo, env=env,
                         log=lambda line: logger.info("[singer %s] %s", args[0], line))
    return result.returncode, result.stderr_tail + result.stdout_tail, result


def _message(lines: list[str], prefixes: tuple[str, ...]) -> str | None:
    for line in reversed(lines):
        stripped = line.strip()
        for prefix in prefixes:
            if stripped.startswith(prefix):
                return stripped[len(prefix):].strip()
    return None


@task(name="register-model", task_run_name="register-model", retries=2,
      retry_delay_seconds=exponential_backoff(10), retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def register_model(repo: str) -> dict[str, Any]:
    """`singer register`: a new version of the registered model, alias `challenger`."""
    code, lines, result = _singer(repo, "register")
    if code != 0:
        raise CommandFailed("singer register", result)
    message = _message(lines, ("register:",)) or ""
    version = message.split(" version ", 1)[1].split()[0] if " version " in message else None
    return {"version": version, "message": message}


@task(name="release-model", task_run_name="release-model", retries=2,
      retry_delay_seconds=exponential_backoff(10), retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def release_model(repo: str) -> dict[str, Any]:
    """`singer release`. Exit 0: promoted (or already champion). A refusal by the gate is an outcome with its
    reason, not a failure; any other error fails the task."""
    code, lines, result = _singer(repo, "release")
    if code == 0:
        message = _message(lines, ("release:",)) or "released"
        return {"promoted": "already" not in message, "passed": True, "message": message}
    error = _message(lines, ("error:",)) or ""
    if "release gate failed" in error:
        return {"promoted": False, "passed": False, "message": error}
    raise CommandFailed("singer release", result)


def publish_release(outcome: dict[str, Any], registered: dict[str, Any], source: str, n_new: int,
                    repo: str | None = None) -> None:
    """The release's outcome as a Prefect artifact, with links to the registered version in the MLflow UI, the
    run that trained it and its logged model."""
    verdict = "promoted to champion" if outcome["promoted"] else (
        "kept the current champion" if outcome["passed"] else "refused by the release gate")
    links = ""
    if repo is not None and registered.get("version"):
        from singer.config import load_config

        uri = tracking_uri(Path(repo))
        name = load_config(Path(repo) / "params.yaml").tracking.registered_model
        found = mlflow_links(uri, model=name, version=str(registered["version"]))
        links = "\n## In MLflow\n\n" + links_markdown(uri, found) if found else ""
    create_markdown_artifact(
        f"# Release: {verdict}\n\n"
        f"- new data: {n_new} object(s) from `{source}`\n"
        f"- registered: {registered.get('message') or registered.get('version')}\n"
        f"- release: {outcome['message']}\n" + links,
        key=RELEASE_ARTIFACT, description="Outcome of `singer release` after the retraining")


# ----------------------------------------------------------------------------------------------- flow


@flow(name="singer-retrain", log_prints=True)
def retrain(
    source: str,
    overrides: dict[str, OverrideValue] | None = None,
    target: Literal["local", "cluster"] = "local",
    stages: list[str] | None = None,
    repo_dir: str | None = None,
    s3_retries: int = DEFAULT_S3_RETRIES,
    s3_retry_delay_seconds: float = DEFAULT_S3_RETRY_DELAY_S,
    retries: int = 3,
    retry_delay_seconds: float = 10.0,
) -> dict[str, Any]:
    """Retrain when new videos arrive under an S3 prefix: pull them into data/raw, `dvc add`, run the pipeline,
    register the model and try to release it.

    source: s3://bucket/prefix; the first folder under the prefix is the subject.
    overrides, target, retries, retry_delay_seconds: as for the singer-pipeline flow.
    stages: pipeline stages (default: ingest .. evaluate).
    s3_retries, s3_retry_delay_seconds: retries of the S3 pull on connection faults (exponential backoff).
    """
    from singer.storage import parse_s3_uri

    logger = get_run_logger()
    repo = resolve_repo(repo_dir)
    try:
        parse_s3_uri(source)
    except (TypeError, ValueError) as exc:
        raise FlowInputError(str(exc)) from None
    # every parameter is checked before anything is downloaded
    selected = select_stages(stages or RETRAIN_STAGES, dvc_stage_names(repo))
    target_overrides(target, overrides, selected)
    ensure_concurrency_limit()  # the pull's move into data/raw takes the `dvc-repo` slot too

    pulled = pull_with_retries(s3_retries, s3_retry_delay_seconds)(source, str(repo))
    if not pulled["new"]:
        message = f"no new data under {source}, nothing to do"
        logger.info(message)
        return {"status": "nothing-to-do", "message": message, "source": source, "listed": pulled["listed"]}

    track_raw(str(repo))
    summary = pipeline(stages=selected, overrides=overrides, target=target, repo_dir=str(repo),
                       retries=retries, retry_delay_seconds=retry_delay_seconds)
    result: dict[str, Any] = {"status": "retrained", "source": source, "new": [o["uri"] for o in pulled["new"]],
                              "bytes": pulled["bytes"], "pipeline": summary}
    if "evaluate" in selected:
        registered = register_model(str(repo))
        outcome = release_model(str(repo))
        publish_release(outcome, registered, source, len(pulled["new"]), str(repo))
        logger.info("release: %s", outcome["message"])
        result.update(registered=registered, release=outcome)
    else:
        logger.info("evaluate was not among the stages: no fresh metrics, so nothing is registered or released")
    write_ledger(repo, pulled["new"])
    return result


def _parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.__doc__.split("\n")[0])
    parser.add_argument("source", help="s3://bucket/prefix with <subject>/<video> objects")
    parser.add_argument("--stages", nargs="+", choices=STAGES)
    parser.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--target", choices=["local", "cluster"], default="local")
    parser.add_argument("--repo-dir", default=None)
    parser.add_argument("--s3-retries", type=int, default=DEFAULT_S3_RETRIES)
    parser.add_argument("--s3-retry-delay-seconds", type=float, default=DEFAULT_S3_RETRY_DELAY_S)
    args = parser.parse_args(argv)
    overrides = parse_set_options(parser, args.overrides)
    return {"source": args.source, "stages": args.stages, "overrides": overrides, "target": args.target,
            "repo_dir": args.repo_dir, "s3_retries": args.s3_retries,
            "s3_retry_delay_seconds": args.s3_retry_delay_seconds}


if __name__ == "__main__":
    print(json.dumps(retrain(**_parse_args()), indent=2, default=str))
