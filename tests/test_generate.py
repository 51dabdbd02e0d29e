"""`singer generate`: a playable mp4 with the right frames and an audio stream; every bad input a user can
give ends in exactly one line on stderr and exit code 1, never a traceback, and nothing at the output path."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from factories import audio_file
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from singer.cli import app
from singer.config import load_config
from singer.media import probe

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(data.astronaut()).save(d / "portrait.jpg")
    Image.fromarray(np.hstack([data.astronaut(), data.astronaut()])).save(d / "two.png")
    Image.fromarray(np.full((256, 256, 3), 120, np.uint8)).save(d / "blank.png")
    (d / "text.png").write_text("not an image")
    t = np.arange(int(44100 * 0.6)) / 44100
    song = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(d / "stereo44k.wav", np.stack([song, song * 0.5], 1), 44100)
    sf.write(d / "mono48k.flac", np.interp(np.arange(int(48000 * 0.6)) / 48000, t, song), 48000)
    write_mp3(d / "song22k.mp3", song[::2].astype(np.float32), 22050)
    sf.write(d / "silent.wav", np.zeros(8000), 16000)
    sf.write(d / "short.wav", 0.3 * np.sin(np.arange(320) / 5), 16000)  # 20 ms: half a 25 fps frame
    return d


@pytest.fixture(scope="module")
def broken_models(model_dir, tmp_path_factory):
    """Folders that look like models and are not: no model_index.json; a model_index.json that is not JSON;
    a component's weights cut off (a download or copy that stopped half-way)."""
    root = tmp_path_factory.mktemp("broken")
    (root / "no_index").mkdir()
    (root / "no_index" / "weights.safetensors").write_bytes(b"\0" * 64)
    bad_json = root / "bad_json"
    shutil.copytree(model_dir, bad_json)
    (bad_json / "model_index.json").write_text('{"_class_name": "SingerPipeline", ')
    truncated = root / "truncated"
    shutil.copytree(model_dir, truncated)
    weights = truncated / "msm" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return root


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A real MLflow sqlite store with its tables and no registered model."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow") / "empty.db"
    uri = f"sqlite:///{db}"
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    assert db.is_file()
    return uri


def free_port() -> int:
    """A port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(monkeypatch):
    """Point MLflow (tracking and registry) at a URI for one test, whatever an earlier test set in-process."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    def use(uri: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
        monkeypatch.setattr(registry_utils, "_registry_uri", None)

    return use


def write_mp3(path: Path, audio: np.ndarray, rate: int) -> None:
    audio_file(path, audio, rate, codec="libmp3lame", fmt=None, frame_size=1152)


def run(*args, steps="1"):
    extra = ["--steps", str(steps)] if steps is not None else []
    return CliRunner().invoke(app, ["generate", *map(str, args), *extra, "--no-progress"])


def assert_one_line_error(result, expected: str) -> str:
    """Exit 1 through a clean exit (not an uncaught exception), exactly one non-empty line on stderr, nothing
    on stdout, no traceback anywhere; the line says `expected`. Returns the line."""
    everything = result.stdout + result.stderr
    assert result.exit_code == 1, everything
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # CliRunner keeps an uncaught one
    assert "Traceback" not in everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert result.stdout.strip() == ""
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("song", ["stereo44k.wav", "mono48k.flac", "song22k.mp3"])
def test_generate_writes_a_playable_video_with_audio(song, inputs, model_dir, tmp_path):
    out = tmp_path / "out.mp4"
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / song, "--output", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    info = probe(out)
    seconds = 0.6
    assert info.n_frames == round(seconds * 25) and info.width == info.height == 512  # the photo's size
    assert info.has_audio and abs(info.duration_s - seconds) < 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary left beside it
    assert result.stderr.strip() == f"generate: wrote {out} (512x512, 15 frames, 0.6 s)"  # one line, however long


def test_silent_audio_warns_and_still_generates(inputs, model_dir, tmp_path):
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / "silent.wav", "--output",
                 tmp_path / "o.mp4", "--model", model_dir)
    assert result.exit_code == 0 and "silent" in result.output
    assert probe(tmp_path / "o.mp4").n_frames == 12


BAD_INPUTS = [
    ("missing_image", "image file not found"),
    ("text_image", "as an image"),
    ("two_faces", "several faces"),
    ("no_face", "no face found"),
    ("missing_audio", "does not exist"),
    ("image_as_audio", "no audio stream"),
    ("short_audio", "shorter than one video frame (40 ms)"),
    ("unwritable", "does not exist; create it first"),
    ("output_is_folder", "it is a folder"),
    ("no_model", "model folder"),
    ("no_model_index", "no model_index.json"),
    ("bad_model_index", "is not a valid JSON file"),
    ("truncated_weights", "Unable to load weights"),
    ("registry_no_store", "no MLflow store at"),
    ("registry_empty", "Registered Model with name=singer not found"),
    ("registry_unreachable", "is not reachable"),
    ("steps_zero", "--steps must be at least 1, got 0"),
    ("steps_negative", "--steps must be at least 1, got -3"),
    ("steps_too_many", "--steps must be at most 1000"),
    ("guidance_negative", "--guidance must be a number >= 0, got -1.0"),
    ("guidance_nan", "--guidance must be a number >= 0, got nan"),
]


BROKEN = {"no_model_index": "no_index", "bad_model_index": "bad_json", "truncated_weights": "truncated"}


@pytest.mark.parametrize("case, expected", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_input_gives_one_line(case, expected, inputs, model_dir, broken_models, empty_registry, registry,
                                  tmp_path):
    image, audio, output, model = inputs / "portrait.jpg", inputs / "stereo44k.wav", tmp_path / "o.mp4", model_dir
    extra, steps = [], "1"
    if case == "missing_image":
        image = inputs / "nope.jpg"
    elif case == "text_image":
        image = inputs / "text.png"
    elif case == "two_faces":
        image = inputs / "two.png"
    elif case == "no_face":
        image = inputs / "blank.png"
    elif case == "missing_audio":
        audio = inputs / "nope.wav"
    elif case == "image_as_audio":
        audio = inputs / "portrait.jpg"
    elif case == "short_audio":
        audio = inputs / "short.wav"
    elif case == "unwritable":
        output = tmp_path / "missing-folder" / "o.mp4"
    elif case == "output_is_folder":
        output = tmp_path / "videos"
        output.mkdir()
    elif case == "no_model":
        model = tmp_path / "no-model"
    elif case in BROKEN:
        model = broken_models / BROKEN[case]
    elif case.startswith("registry_"):
        model = "models:/singer@champion"
        registry({"registry_no_store": f"sqlite:///{tmp_path / 'nowhere.db'}", "registry_empty": empty_registry,
                  "registry_unreachable": f"http://127.0.0.1:{free_port()}"}[case])
    elif case == "steps_zero":
        steps = "0"
    elif case == "steps_negative":
        steps = "-3"
    elif case == "steps_too_many":
        steps = "1001"
    elif case == "guidance_negative":
        extra = ["--guidance", "-1"]
    elif case == "guidance_nan":
        extra = ["--guidance", "nan"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("--image", image, "--audio", audio, "--output", output, "--model", model, *extra, steps=steps)
    assert_one_line_error(result, expected)
    if case == "output_is_folder":
        assert output.is_dir() and not any(output.iterdir())
    else:
        assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary, no sqlite store made on the way


def test_a_failed_write_leaves_the_previous_video_and_no_temporary(inputs, model_dir, tmp_path, monkeypatch):
    """Writing dies half-way (a full disk, say): the old video at the output path is untouched and the
    half-written one is gone."""
    import singer.media.writer as writer

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = tmp_path / "out.mp4"
    out.write_bytes(b"the previous video")
    monkeypatch.setattr(writer._SongReader, "take", full_disk)  # the sound track, as the first window is written
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / "stereo44k.wav", "--output", out,
                 "--model", model_dir)
    assert_one_line_error(result, f"cannot write {out}: No space left on device")
    assert out.read_bytes() == b"the previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_steps_given_are_the_steps_run(inputs, model_dir, tmp_path, monkeypatch):
    """`--steps 2` runs 2 denoising steps; leaving it out runs the model's own number (not 0 or 1)."""
    import singer.pipeline
    from singer.pipeline import SingerPipeline

    seen, samplers = [], []
    original, make_sampler = SingerPipeline.windows, singer.pipeline.make_sampler

    def spy(self, *args, **kwargs):
        yield from original(self, *args, **kwargs)
        seen.append(len(samplers[-1].timesteps))  # the sampler the call stepped with (model.sampler)

    monkeypatch.setattr(SingerPipeline, "windows", spy)
    monkeypatch.setattr(singer.pipeline, "make_sampler", lambda *a, **k: samplers.append(make_sampler(*a, **k))
                        or samplers[-1])
    sf.write(tmp_path / "frame.wav", 0.3 * np.sin(np.arange(1280) / 5), 16000)  # 2 frames
    common = ("--image", inputs / "portrait.jpg", "--audio", tmp_path / "frame.wav")
    assert run(*common, "--output", tmp_path / "a.mp4", "--model", model_dir, steps="2").exit_code == 0
    assert run(*common, "--output", tmp_path / "b.mp4", "--model", model_dir, steps=None).exit_code == 0
    default = load_config().model.inference_steps
    assert default > 2 and seen == [2, default]


def test_pipeline_refuses_zero_steps(model_dir):
    from singer.pipeline import SingerPipeline

    pipe = SingerPipeline.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        pipe({}, np.zeros(640, np.float32), np.zeros(128, np.float32), num_inference_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad_model_index", "registry_no_store", "registry_empty", "output_long_path"])
def test_the_installed_command_prints_one_line(case, inputs, broken_models, empty_registry, model_dir, tmp_path):
    """The real `singer` entry point in its own process: what libraries log (MLflow's database migrations,
    diffusers' warnings) and rich's wrapping at 80 columns land on the real stderr, which CliRunner does not see."""
    env = {**os.environ, "COLUMNS": "80", "MLFLOW_TRACKING_URI": empty_registry}
    env.pop("MLFLOW_REGISTRY_URI", None)
    output, model = tmp_path / "o.mp4", model_dir
    if case == "bad_model_index":
        model = broken_models / "bad_json"
    elif case == "registry_no_store":
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'nowhere.db'}"
        model = "models:/singer@champion"
    elif case == "registry_empty":
        model = "models:/singer@champion"
    elif case == "output_long_path":
        output = tmp_path / ("a-folder-with-a-long-name-" * 4) / "o.mp4"
    done = subprocess.run([str(BIN / "singer"), "generate", "--image", str(inputs / "portrait.jpg"), "--audio",
                           str(inputs / "stereo44k.wav"), "--output", str(output), "--model", str(model),
                           "--steps", "1", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert done.stdout.strip() == ""
    assert not output.exists() and not (tmp_path / "nowhere.db").exists()


@pytest.mark.slow
def test_minutes_of_audio_are_generated_in_windows(inputs, model_dir, tmp_path):
    song = 0.2 * np.sin(2 * np.pi * 220 * np.arange(16000 * 125) / 16000)  # 2 min 5 s
    sf.write(tmp_path / "long.wav", song, 16000)
    result = run("--image", inputs / "portrait.jpg", "--audio", tmp_path / "long.wav", "--output",
                 tmp_path / "long.mp4", "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "windows" in result.output
    assert probe(tmp_path / "long.mp4").n_frames == 125 * 25


def test_the_model_hears_the_vocals_and_the_video_plays_the_song(inputs, model_dir, tmp_path, monkeypatch):
    """Hallo's audio encoder hears the separated vocals (hallo/datasets/audio_processor.py:91-103): with
    `--vocals` the pipeline gets the vocals (16 kHz, fitted to the song's length), the video's sound and length
    stay the song's; a vocals file that is not there is one line."""
    from singer.media import read_audio
    from singer.pipeline import SingerPipeline

    heard = []
    original = SingerPipeline.windows

    def spy(self, reference, audio, *args, **kwargs):
        heard.append(np.asarray(audio))
        return original(self, reference, audio, *args, **kwargs)

    monkeypatch.setattr(SingerPipeline, "windows", spy)
    t = np.arange(int(16000 * 0.5)) / 16000
    vocals = (0.3 * np.sin(2 * np.pi * 660 * t)).astype(np.float32)  # 0.5 s: padded to the 0.6-s song
    sf.write(tmp_path / "vocals.wav", vocals, 16000)
    out = tmp_path / "out.mp4"
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / "stereo44k.wav", "--vocals",
                 tmp_path / "vocals.wav", "--output", out, "--model", model_dir,
                 "-S", "generate.loudness_lufs=null")  # as given, to compare samples (loudness: its own tests)
    assert result.exit_code == 0, result.output
    song, _ = read_audio(inputs / "stereo44k.wav", sample_rate=16000, mono=True)
    assert heard[0].shape == song.shape
    assert np.allclose(heard[0][: len(vocals)], vocals, atol=1e-4) and not heard[0][len(vocals):].any()
    info = probe(out)
    assert info.n_frames == 15 and info.has_audio
    played, _ = read_audio(out, sample_rate=16000, mono=True)
    n = min(len(played), len(song)) - 1600
    to_song = abs(np.corrcoef(played[800:n], song[800:n])[0, 1])
    assert to_song > 0.9  # the sound track is the song, not the vocals
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / "stereo44k.wav", "--vocals",
                 tmp_path / "missing.wav", "--output", tmp_path / "b.mp4", "--model", model_dir)
    assert_one_line_error(result, "vocals file")
