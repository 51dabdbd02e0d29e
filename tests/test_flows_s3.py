"""The `singer-retrain` flow's S3 side against the real SeaweedFS server of the `s3_server` fixture.

- What counts as new (ledger by URI + ETag, videos and sidecars only, the prefix taken as a folder).
- An outage while the pull starts: the server is started again once the task has been retried twice, and a
  download refused with InternalError after the restart is retried too; the retries the task logged follow
  the exponential backoff, and the files land in data/raw.
- An outage in the middle of the download that lasts: the flow fails naming the endpoint and the error, and
  data/raw holds nothing of the pull (no partial file, no temporary folder).
- Nothing new: the flow says "no new data under s3://..., nothing to do" and runs no stage.
- Slow, optional (`-m slow`): a whole retrain on the tiny corpus: a new subject arrives, `dvc add`, ingest ..
  evaluate, `singer register`, `singer release`, whose refusal by the gate is reported, not raised.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import prefect_harness
import pytest
from prefect import flow
from prefect_harness import finished_task_runs, latest_artifact

from flows.retrain import find_new_objects, pull_with_retries, read_ledger, retrain, write_ledger

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40  # bytes only: the pull never decodes them

prefect_server = prefect_harness.prefect_server
prefect_api = prefect_harness.prefect_api


@flow(name="pull-only")
def pull_only(source: str, repo: str, retries: int, delay: float) -> dict:
    """The retrain flow's first task alone, with its retry policy at test-sized delays."""
    return pull_with_retries(retries, delay)(source, repo)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout as far as the pull needs one: params.yaml and dvc.yaml (stage names only)."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    return root


@pytest.fixture
def incoming(s3_bucket, s3_env) -> str:
    """s3://<fresh bucket>/incoming with two subjects' videos, a sidecar, and things that are not videos."""
    client = s3_env.client()
    for key, body in {
        "incoming/alice/take1.mp4": VIDEO,
        "incoming/alice/take1.truth.json": b'{"fps": 25}',
        "incoming/bob/song.mov": VIDEO[::-1],
        "incoming/bob/notes.txt": b"not a video",
        "incoming/": b"",                              # a folder marker
        "incomingX/carol/other.mp4": VIDEO,            # another prefix that merely starts the same
    }.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    return f"s3://{s3_bucket}/incoming"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


EXPECTED = ["alice/take1.mp4", "alice/take1.truth.json", "bob/song.mov"]


# ------------------------------------------------------------------------------------------ what is new


def test_new_objects_by_ledger_and_etag():
    listed = [{"key": "in/a/x.mp4", "size": 3, "etag": "e1"}, {"key": "in/a/x.truth.json", "size": 1, "etag": "e2"},
              {"key": "in/b/y.MKV", "size": 3, "etag": "e3"}, {"key": "in/b/readme.md", "size": 1, "etag": "e4"},
              {"key": "in/", "size": 0, "etag": "e5"}, {"key": "inside/c/z.mp4", "size": 3, "etag": "e6"},
              {"key": "in/root.mp4", "size": 3, "etag": "e7"}]
    ledger = {"s3://bkt/in/a/x.mp4": {"etag": "e1"}, "s3://bkt/in/b/y.MKV": {"etag": "old"}}
    new = find_new_objects("s3://bkt/in", listed, ledger, [".mp4", ".mkv"], "data/raw")
    assert [(o["uri"], o["path"]) for o in new] == [
        ("s3://bkt/in/a/x.truth.json", "data/raw/a/x.truth.json"),  # sidecar travels with its video
        ("s3://bkt/in/b/y.MKV", "data/raw/b/y.MKV"),                # known key, new content (ETag)
        ("s3://bkt/in/root.mp4", "data/raw/root.mp4"),              # no subject folder: ingest takes the stem
    ]


def test_sidecars_are_the_ones_ingest_reads():
    from flows.retrain import SIDECAR_SUFFIXES
    from singer.data.ingest import SIDECARS

    assert set(SIDECAR_SUFFIXES) == set(SIDECARS.values())


def test_ledger_round_trip(tmp_path):
    assert read_ledger(tmp_path) == {}
    write_ledger(tmp_path, [{"uri": "s3://bkt/k.mp4", "etag": "e", "size": 3, "path": "data/raw/k.mp4"}])
    write_ledger(tmp_path, [{"uri": "s3://bkt/l.mp4", "etag": "f", "size": 4, "path": "data/raw/l.mp4"}])
    ledger = read_ledger(tmp_path)
    assert set(ledger) == {"s3://bkt/k.mp4", "s3://bkt/l.mp4"} and ledger["s3://bkt/k.mp4"]["etag"] == "e"
    assert json.loads((tmp_path / "data/retrain-ledger.json").read_text())["objects"]


# ------------------------------------------------------------------------------------------- outages


class _Records(logging.Handler):
    """The log records of a logger, kept (Prefect's task-run logger sends its own to the API only)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


RETRY_LOG = re.compile(r"Task run failed with exception: (?P<error>.*) - Retry (?P<n>\d+)/(?P<of>\d+) will start "
                       r"(?P<delay>[\d.]+) second\(s\) from now")


@pytest.mark.slow
def test_pull_recovers_when_s3_comes_back(repo, incoming, s3_server, prefect_api, monkeypatch):
    """The server is down when the pull starts and is started once the task has failed (and been retried)
    twice; the first download after that is refused with InternalError, as a restarted SeaweedFS does on a
    loaded machine. Each failure is retried after the exponential backoff (0.5, 1, 2, ... s), and the files land.
    Checked from what the flow did (its retry log, the attempts it made), not from how long the test took."""
    from singer import storage

    attempts: list[dict] = []  # one per try of the task: when it listed the prefix, and how that went

    def listing(*args, **kwargs):
        attempt = {"t": time.time(), "error": None}
        attempts.append(attempt)
        try:
            return real_list(*args, **kwargs)
        except Exception as exc:
            attempt["error"] = str(exc)
            raise

    refused = []

    def download_refused_once_after_the_restart(uri, *args, **kwargs):
        if not refused:
            refused.append(uri)
            raise storage.StorageError(f"downloading {uri} failed: InternalError: We encountered an internal "
                                       "error. Please try again.")
        return real_download(uri, *args, **kwargs)

    real_list, real_download = storage.list_objects, storage.download_prefix
    monkeypatch.setattr(storage, "list_objects", listing)
    task_log = _Records()
    logging.getLogger("prefect.task_runs").addHandler(task_log)

    def retries() -> list[tuple[logging.LogRecord, re.Match]]:
        found = [(r, RETRY_LOG.search(r.getMessage())) for r in list(task_log.records)]
        return [(r, m) for r, m in found if m]

    s3_server.stop()
    try:
        # the flow in a thread, the restart from this one: the server is started with PR_SET_PDEATHSIG, which
        # fires when the *thread* that started it ends, so a short-lived restart thread would take it down again
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(pull_only, incoming, str(repo), retries=8, delay=0.5, return_state=True)
            try:
                prefect_harness.wait_for(lambda: len(retries()) >= 2 or running.done(), timeout=120,
                                         what="two retries of the pull while S3 is down")
            finally:
                monkeypatch.setattr(storage, "download_prefix", download_refused_once_after_the_restart)
                launched = time.time()
                s3_server.start()
            state = running.result(timeout=300)
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(task_log)

    assert state.is_completed(), state.message
    result = state.result()
    assert sorted(Path(o["path"]).relative_to("data/raw").as_posix() for o in result["new"]) == EXPECTED
    assert _files(repo / "data/raw") == EXPECTED
    assert (repo / "data/raw/bob/song.mov").read_bytes() == VIDEO[::-1]
    assert not list((repo / "data").glob(".retrain-*"))

    # what was tried: down while the server was down, refused once after it came back, then done
    logged = retries()
    runs = finished_task_runs(state.state_details.flow_run_id, {"pull-new-data"})
    assert runs["pull-new-data"].run_count == len(attempts) == len(logged) + 1 >= 4, (attempts, logged)
    before = [a for a in attempts if a["t"] < launched]
    assert len(before) >= 2 and all("Could not connect to the endpoint URL" in (a["error"] or "") for a in before)
    assert attempts[-1]["error"] is None and attempts[-1]["t"] > launched
    assert refused == [f"{incoming}/alice/take1.mp4"]
    errors = [m["error"] for _, m in logged]  # every failure the task logged was retried
    assert all(f"pulling new data from {incoming} (S3 endpoint {s3_server.endpoint_url}) failed" in e for e in errors)
    assert all("Could not connect to the endpoint URL" in e for e in errors[:len(before)]), errors
    assert sum(f"downloading {refused[0]} failed: InternalError" in e for e in errors) == 1, errors
    # retry n of 8 waits 0.5 * 2**(n-1) s (exponential_backoff(0.5)), and the next try starts no earlier
    assert [(int(m["n"]), int(m["of"]), float(m["delay"])) for _, m in logged] == [
        (n, 8, 0.5 * 2 ** (n - 1)) for n in range(1, len(logged) + 1)]
    for (record, m), following in zip(logged, attempts[1:], strict=True):
        assert following["t"] >= record.created + float(m["delay"]) - 0.1, (record.created, m["delay"], following)


@pytest.mark.slow
def test_lasting_outage_mid_download_fails_clearly_and_leaves_data_raw_alone(repo, incoming, s3_server,
                                                                              prefect_api, monkeypatch):
    from singer import storage

    real = storage.download_prefix
    calls = []

    def download_then_lose_the_server(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == 1:
            s3_server.stop()  # the first file is in; the server goes away for good
        return out

    monkeypatch.setattr(storage, "download_prefix", download_then_lose_the_server)
    try:
        state = pull_only(incoming, str(repo), retries=2, delay=0.2, return_state=True)
    finally:
        s3_server.start()
    assert state.is_failed()
    assert f"pulling new data from {incoming} (S3 endpoint {s3_server.endpoint_url}) failed" in state.message
    assert "Could not connect to the endpoint URL" in state.message
    assert len(calls) == 1  # one object arrived before the outage ...
    assert _files(repo / "data") == []  # ... and none of it reached data/raw; no temporary folder left
    runs = finished_task_runs(state.state_details.flow_run_id, {"pull-new-data"})
    assert runs["pull-new-data"].run_count == 3  # the first try and two retries


@pytest.mark.slow
def test_nothing_new_runs_no_stage(repo, incoming, s3_env, prefect_api):
    first = pull_only(incoming, str(repo), retries=0, delay=0.1)
    assert len(first["new"]) == 3 and first["bytes"] > 0
    # a run that failed after its pull wrote no ledger: the objects count as new again, but the files in
    # data/raw already match them, so nothing is downloaded twice
    again = pull_only(incoming, str(repo), retries=0, delay=0.1)
    assert [o["uri"] for o in again["new"]] == [o["uri"] for o in first["new"]] and again["bytes"] == 0
    # everything under the prefix is in the ledger: nothing to do
    write_ledger(repo, first["new"])
    state = retrain(incoming, repo_dir=str(repo), s3_retries=0, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"status": "nothing-to-do", "listed": 6, "source": incoming,
                              "message": f"no new data under {incoming}, nothing to do"}
    runs = finished_task_runs(state.state_details.flow_run_id, {"pull-new-data"})
    assert set(runs) == {"pull-new-data"}  # no dvc add, no subflow, no stage
    assert not (repo / "dvc.lock").exists() and not (repo / "data.dvc").exists()
    # an empty prefix is nothing new too
    empty = incoming.rsplit("/", 1)[0] + "/nobody-here"
    state = retrain(empty, repo_dir=str(repo), s3_retries=0, return_state=True)
    assert state.result()["message"] == f"no new data under {empty}, nothing to do"


@pytest.mark.slow
def test_missing_bucket_is_not_retried(repo, s3_env, prefect_api):
    state = pull_only("s3://no-such-bucket-here/incoming", str(repo), retries=3, delay=5.0, return_state=True)
    assert state.is_failed() and "NoSuchBucket" in state.message
    runs = finished_task_runs(state.state_details.flow_run_id, {"pull-new-data"})
    assert runs["pull-new-data"].run_count == 1


# ------------------------------------------------------------------------------------- whole retrain


@pytest.mark.slow
def test_retrain_end_to_end_reports_the_release_outcome(retrain_repo, s3_env, s3_bucket, prefect_api,
                                                        monkeypatch, tmp_path):
    from singer.data.synth import synthesize_corpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # a new singer arrives on S3
    synthesize_corpus(tmp_path / "new", subjects=4, seconds=4.2, seed=0, size=192, fps=[25.0], progress=False)
    client = s3_env.client()
    for path in sorted((tmp_path / "new" / "subject_003").iterdir()):
        client.upload_file(str(path), s3_bucket, f"incoming/subject_003/{path.name}")
    # the video and the sidecars ingest reads (not e.g. the synthesizer's landmarks.npy)
    uploaded = ["take_00.mp4", "take_00.truth.json", "take_00.vocals.wav"]
    before = (retrain_repo / "data.dvc").read_text()
    overrides = {"train.steps": 2, "train.batch_size": 1, "train.checkpoint_every": 2, "train.validate_every": 0,
                 "evaluate.max_clips": 1, "evaluate.inference_steps": 2, "evaluate.num_workers": 0,
                 "evaluate.sample_videos": 1}
    state = retrain(f"s3://{s3_bucket}/incoming", overrides=overrides, repo_dir=str(retrain_repo),
                    s3_retries=1, s3_retry_delay_seconds=1, retries=1, retry_delay_seconds=1, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "retrained" and len(result["new"]) == len(uploaded)
    assert sorted(p.name for p in (retrain_repo / "data/raw/subject_003").iterdir()) == uploaded
    assert (retrain_repo / "data.dvc").read_text() != before and not (retrain_repo / "data/raw.dvc").exists()
    ingest = json.loads((retrain_repo / "metrics/ingest.json").read_text())
    assert ingest["n_subjects"] == 4
    assert result["registered"]["version"] == "1"
    # a model trained for 2 steps has no face to measure lmd on: the gate refuses, and that is an outcome
    assert result["release"]["promoted"] is False and "release gate failed" in result["release"]["message"]
    assert "lmd" in result["release"]["message"]
    release = latest_artifact("singer-release")
    assert release["flow_run_id"] == str(state.state_details.flow_run_id)
    assert "refused by the release gate" in release["data"] and "lmd" in release["data"]
    assert set(read_ledger(retrain_repo)) == {f"s3://{s3_bucket}/incoming/subject_003/{n}" for n in uploaded}
    # the next run finds nothing new
    again = retrain(f"s3://{s3_bucket}/incoming", repo_dir=str(retrain_repo), return_state=True)
    assert again.result()["status"] == "nothing-to-do"
