"""Model registry and releases: the pyfunc wraps the save_pretrained folder and loads offline from
`models:/singer@champion`; `release` promotes the challenger only when the gate passes; the served model
answers `/invocations` with a playable mp4."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image
from skimage import data

from singer.config import load_config
from singer.media import probe
from singer.release.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    RegistryError,
    gate_check,
    register_model,
    release,
    version_metrics,
)

REPO = Path(__file__).resolve().parents[1]
SECONDS = 0.4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    cfg = load_config(REPO / "params.yaml")
    out = tmp_path_factory.mktemp("model") / "full"
    SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution).save_pretrained(out)
    return out


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private SQLite MLflow store and artifact root; returns the config pointing at them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "params.yaml", overrides=[f"tracking.artifact_location={tmp_path / 'mlartifacts'}"])
    yield cfg
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def request_frame() -> pd.DataFrame:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    t = np.arange(int(16000 * SECONDS)) / 16000
    wav = io.BytesIO()
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()],
                         "audio": [base64.b64encode(wav.getvalue()).decode()],
                         "steps": [1], "seed": [0]})


def assert_playable(b64: str, tmp_path: Path) -> None:
    out = tmp_path / "answer.mp4"
    out.write_bytes(base64.b64decode(b64))
    info = probe(out)
    assert info.n_frames == round(SECONDS * 25)
    assert info.has_audio


def test_gate_directions_and_margins():
    gate = {"lmd": 0.0, "ssim": 0.01, "lse_d": 0.5}
    champ = {"lmd": 2.0, "ssim": 0.80, "lse_d": 7.0, "mouth_correlation": 0.3}
    ok = gate_check({"lmd": 1.9, "ssim": 0.795, "lse_d": 7.4, "mouth_correlation": 0.3}, champ, gate,
                    ["lmd", "mouth_correlation"])
    assert all(c["ok"] for c in ok)
    bad = gate_check({"lmd": 2.1, "ssim": 0.78, "lse_d": 7.6, "mouth_correlation": None}, champ, gate,
                     ["lmd", "mouth_correlation"])
    assert {c["metric"] for c in bad if not c["ok"]} == {"lmd", "ssim", "lse_d", "mouth_correlation"}
    # no champion: only the required metrics must exist
    assert all(c["ok"] for c in gate_check({"lmd": 9.0, "mouth_correlation": 0.0}, None, gate,
                                           ["lmd", "mouth_correlation"]))
    with pytest.raises(RegistryError, match="direction"):
        gate_check({}, None, {"weird": 0.0}, [])


def test_register_release_and_load_champion(store, model_dir, tmp_path):
    import mlflow

    cfg = store
    name = cfg.tracking.registered_model
    with pytest.raises(RegistryError, match="challenger"):
        release(cfg)

    v1 = register_model(cfg, model_dir, metrics={"lmd": 2.0, "mouth_correlation": 0.30, "ssim": 0.80,
                                                 "LSE-D": 8.0})
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == v1
    assert version_metrics(client.get_model_version(name, v1))["lse_d"] == 8.0
    first = release(cfg)
    assert first["passed"] and first["promoted"] and first["champion"] is None
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1

    # worse lip sync: the gate (lmd: 0 regression allowed) stops it, the champion stays
    v2 = register_model(cfg, model_dir, metrics={"lmd": 2.5, "mouth_correlation": 0.35, "ssim": 0.80})
    failed = release(cfg)
    assert not failed["passed"] and not failed["promoted"]
    assert [f["metric"] for f in failed["failures"]] == ["lmd"]
    assert failed["failures"][0]["challenger"] == 2.5 and failed["failures"][0]["champion"] == 2.0
    assert "lmd" in failed["message"] and "\n" not in failed["message"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1

    # a required metric missing fails too
    v3 = register_model(cfg, model_dir, metrics={"lmd": 1.0, "mouth_correlation": None, "ssim": 0.9})
    missing = release(cfg)
    assert not missing["passed"] and [f["metric"] for f in missing["failures"]] == ["mouth_correlation"]

    # better within the margins: promoted; the old champion stays reachable
    with mlflow.start_run() as run:  # an existing run (e.g. the evaluate run) receives the model
        rid = run.info.run_id
    v4 = register_model(cfg, model_dir, run_id=rid, metrics={"lmd": 1.8, "mouth_correlation": 0.31,
                                                             "ssim": 0.795})
    registered = client.get_model_version(name, v4)
    assert registered.run_id == rid and registered.tags["train_run_id"] == rid and "run_id" not in registered.tags
    passed = release(cfg)
    assert passed["passed"] and passed["promoted"] and passed["champion"] == v1 and passed["challenger"] == v4
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v4
    assert str(client.get_model_version_by_alias(name, PREVIOUS_CHAMPION).version) == v1
    assert client.get_model_version(name, v1).tags[PREVIOUS_CHAMPION] == "true"
    assert client.get_model_version(name, v1).tags["replaced_by"] == v4
    assert client.get_model_version(name, v4).tags["promoted_from"] == v1
    assert client.get_model_version(name, v1).tags["promoted_from"] == "none"
    # the refused versions were never promoted and carry no release tags
    for refused in (v2, v3):
        assert not {"promoted_from", "replaced_by", PREVIOUS_CHAMPION} & set(client.get_model_version(name, refused).tags)
    assert [v1, v2, v3, v4] == ["1", "2", "3", "4"]
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {
        CHAMPION: v4, CHALLENGER: v4, PREVIOUS_CHAMPION: v1}
    again = release(cfg)
    assert again["passed"] and not again["promoted"] and again["message"] == f"{name} version {v4} is already {CHAMPION}"
    assert str(client.get_model_version_by_alias(name, PREVIOUS_CHAMPION).version) == v1  # not moved by a no-op

    # self-contained: the singer package travels with the model (code_paths), the pipeline as an artifact
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=str(tmp_path / "dl")))
    assert (local / "code" / "singer" / "release" / "registry.py").is_file()
    assert list((local / "artifacts").rglob("model_index.json"))

    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    out = model.predict(request_frame())
    assert list(out.columns) == ["video", "frames", "seconds"]
    assert out["frames"][0] == round(SECONDS * 25) and abs(out["seconds"][0] - SECONDS) < 0.05
    assert_playable(out["video"][0], tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_models_serve_answers_with_a_video(store, model_dir, tmp_path):
    cfg = store
    register_model(cfg, model_dir, metrics={"lmd": 2.0, "mouth_correlation": 0.3})
    assert release(cfg)["promoted"]
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH: the venv's
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{cfg.tracking.registered_model}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        body = json.dumps({"dataframe_split": request_frame().to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        rows = answer["predictions"]
        assert rows[0]["frames"] == round(SECONDS * 25)
        assert_playable(rows[0]["video"], tmp_path)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_floors_hold_for_the_first_release_too():
    floor = {"mouth_correlation": 0.3, "lmd": 2.0}
    rows = {r["metric"]: r for r in gate_check({"mouth_correlation": -0.45, "lmd": 1.5}, None, {}, [], floor)}
    assert not rows["mouth_correlation"]["ok"] and "below the floor 0.3" in rows["mouth_correlation"]["reason"]
    assert rows["lmd"]["ok"]
    rows = {r["metric"]: r for r in gate_check({"mouth_correlation": 0.8, "lmd": 2.5}, None, {}, [], floor)}
    assert rows["mouth_correlation"]["ok"] and not rows["lmd"]["ok"] and "ceiling" in rows["lmd"]["reason"]
    with pytest.raises(RegistryError, match="direction is unknown"):
        gate_check({}, None, {}, [], {"weird": 1.0})
