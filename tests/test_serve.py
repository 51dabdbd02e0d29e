"""The served model refuses bad requests with a 400 and a one-line reason (issue 16): not base64, not an image,
no face, not audio, audio longer than `serve.max_seconds`, a missing column, steps 0; never a 500 or a stack
trace. The slow test asks a real `mlflow models serve` (the approach of tests/test_registry.py); the fast ones
check the pyfunc's messages in-process."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
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
from singer.release.pyfunc import ServeError, SingerPyfunc, audio_seconds
from singer.release.registry import register_model, release

REPO = Path(__file__).resolve().parents[1]
SECONDS = 0.4
MAX_SECONDS = 1.0  # the served model's serve.max_seconds: a 2 s song is "too long" and cheap to send


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


FACE = png(data.astronaut())
NO_FACE = png(np.full((256, 256, 3), 128, np.uint8))


def frame(image: bytes | str = FACE, audio=None, **extra) -> pd.DataFrame:
    """One request row: bytes are base64-encoded, str sent as is, `...` leaves the column out."""
    row = {"image": image, "audio": wav(SECONDS) if audio is None else audio, "steps": 1, "seed": 0, **extra}
    return pd.DataFrame({k: [b64(v) if isinstance(v, bytes) else v] for k, v in row.items() if v is not ...})


# name -> (request, words the one-line message must hold)
BAD = {
    "image not base64": (frame(image="this is not base64!"), ["column 'image' is not base64"]),
    "image not an image": (frame(image=wav(SECONDS)), ["column 'image' is not an image file"]),
    "no face": (frame(image=NO_FACE), ["column 'image'", "no face"]),
    "audio not base64": (frame(audio="abc"), ["column 'audio' is not base64"]),
    "audio not audio": (frame(audio=b"definitely not a sound file " * 20), ["column 'audio' is not an audio file"]),
    "audio is a picture": (frame(audio=FACE), ["column 'audio' holds no audio stream"]),
    "audio too long": (frame(audio=wav(2.0)), ["audio is 2.0 s long; this server accepts at most 1 s "
                                               "(serve.max_seconds)"]),
    "missing column": (frame(audio=...), ["input needs a column 'audio'"]),
    "steps 0": (frame(steps=0), ["column 'steps' must be at least 1, got 0"]),
}


def assert_playable(b64_video: str, tmp_path: Path) -> None:
    out = tmp_path / "answer.mp4"
    out.write_bytes(base64.b64decode(b64_video))
    info = probe(out)
    assert info.n_frames == round(SECONDS * 25)
    assert info.has_audio


# ------------------------------------------------------------------------------------- fast, in-process


@pytest.fixture
def pyfunc(tmp_path, monkeypatch):
    """A SingerPyfunc with max_seconds=1 whose generate_video must not be reached (records calls)."""
    import singer.generate

    (tmp_path / "model_index.json").write_text("{}")
    model = SingerPyfunc()
    model.load_context(types.SimpleNamespace(artifacts={"pipeline": str(tmp_path)},
                                             model_config={"max_seconds": MAX_SECONDS}))
    calls = []

    def fake_generate(image, audio, output, *args, **kwargs):
        calls.append(image)
        raise singer.generate.GenerateError(f"{image}: no face found in the image")

    monkeypatch.setattr(singer.generate, "generate_video", fake_generate)
    model.calls = calls
    return model


@pytest.mark.parametrize("case", sorted(BAD))
def test_pyfunc_refuses_with_one_line(pyfunc, case):
    request, words = BAD[case]
    with pytest.raises(ServeError) as info:
        pyfunc.predict(None, request)
    message = info.value.message
    assert "\n" not in message and all(w in message for w in words), message
    assert "/tmp" not in message and "singer-pyfunc" not in message  # no temporary paths
    assert info.value.get_http_status_code() == 400
    assert len(pyfunc.calls) == (1 if case == "no face" else 0)  # refused before generation starts


def test_every_row_is_checked_before_generating(pyfunc):
    good = frame()
    with pytest.raises(ServeError, match=r"column 'steps' must be at least 1, got 0 \(row 1\)"):
        pyfunc.predict(None, pd.concat([good, frame(steps=0)], ignore_index=True))
    assert pyfunc.calls == []


def test_the_scoring_servers_rewrite_keeps_the_reason():
    err = ServeError("audio is 75.0 s long; this server accepts at most 60 s (serve.max_seconds)\nmore")
    # what mlflow/pyfunc/scoring_server does with an MlflowException out of predict
    err.message = f"Failed to predict data '{frame()}'. \nError: {err.message}"
    body = json.loads(err.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
    assert body["message"] == "audio is 75.0 s long; this server accepts at most 60 s (serve.max_seconds)"


def test_max_seconds_comes_from_the_model_config_with_a_default(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    old = SingerPyfunc()  # a model logged before serve.max_seconds existed: no model config
    old.load_context(types.SimpleNamespace(artifacts={"pipeline": str(tmp_path)}, model_config=None))
    assert old.max_seconds == load_config(REPO / "params.yaml").serve.max_seconds == 60
    new = SingerPyfunc()
    new.load_context(types.SimpleNamespace(artifacts={"pipeline": str(tmp_path)}, model_config={"max_seconds": 5}))
    assert new.max_seconds == 5.0


def test_audio_seconds_reads_the_container():
    assert audio_seconds(wav(3.0)) == pytest.approx(3.0, abs=0.01)
    flac = io.BytesIO()
    sf.write(flac, np.zeros(44100 * 75, np.float32), 44100, format="FLAC")
    assert audio_seconds(flac.getvalue()) == pytest.approx(75.0, abs=0.01)


def test_base64_with_line_breaks_and_data_urls_is_accepted(pyfunc):
    wrapped = "\n".join(b64(FACE)[i:i + 76] for i in range(0, len(b64(FACE)), 76))
    for image in (wrapped, "data:image/png;base64," + b64(FACE)):
        with pytest.raises(ServeError, match="no face"):  # got past decoding to (fake) generation
            pyfunc.predict(None, frame(image=image))


# ------------------------------------------------------------------------------------ a real served model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`mlflow models serve` of a registered champion (untrained tiny model, serve.max_seconds=1); yields
    its base URL."""
    import mlflow

    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(root)
        cfg = load_config(REPO / "params.yaml", overrides=[f"tracking.artifact_location={root / 'mlartifacts'}",
                                                           f"serve.max_seconds={MAX_SECONDS}"])
        model_dir = root / "full"
        SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution),
                                  cfg.crop.resolution).save_pretrained(model_dir)
        register_model(cfg, model_dir, metrics={"lmd": 2.0, "mouth_correlation": 0.3})
        assert release(cfg)["promoted"]
        while mlflow.active_run() is not None:
            mlflow.end_run()

        port = _free_port()
        bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH: the venv's
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        log_path = root / "serve.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
        proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m",
                                 f"models:/{cfg.tracking.registered_model}@champion", "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
            yield types.SimpleNamespace(url=url, proc=proc, log=log_path)
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(url: str, request: pd.DataFrame) -> tuple[int, str]:
    body = json.dumps({"dataframe_split": request.to_dict(orient="split")}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_served_model_answers_bad_requests_with_400_and_one_line(served, tmp_path):
    failures = []
    for case, (request, words) in BAD.items():
        status, text = invoke(served.url, request)
        try:
            body = json.loads(text)
        except ValueError:
            failures.append(f"{case}: {status}, not JSON: {text[:300]!r}")
            continue
        message = body.get("message", "")
        ok = (status == 400 and body.get("error_code") == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
              and "Traceback" not in text and "\n" not in message and all(w in message for w in words)
              and len(message) < 300)  # the request is not echoed back
        if not ok:
            failures.append(f"{case}: {status} {text[:500]!r}")
    assert not failures, "\n".join(failures) + "\n" + served.log.read_text()[-2000:]

    # the server still works: a good request gets a playable mp4
    status, text = invoke(served.url, frame())
    assert status == 200, text[:2000]
    rows = json.loads(text)["predictions"]
    assert rows[0]["frames"] == round(SECONDS * 25)
    assert_playable(rows[0]["video"], tmp_path)
    assert served.proc.poll() is None
