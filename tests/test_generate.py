"""`singer generate`: a playable mp4 with the right frames and an audio stream; every bad input a user can
give ends in one line on stderr and exit code 1, never a traceback."""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model saved like `singer train` saves one (weights don't matter here)."""
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    cfg = load_config()
    out = tmp_path_factory.mktemp("model") / "full"
    SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution).save_pretrained(out)
    return out


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
    return d


def write_mp3(path: Path, audio: np.ndarray, rate: int) -> None:
    audio_file(path, audio, rate, codec="libmp3lame", fmt=None, frame_size=1152)


def run(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args), "--steps", "1", "--no-progress"])


@pytest.mark.parametrize("song", ["stereo44k.wav", "mono48k.flac", "song22k.mp3"])
def test_generate_writes_a_playable_video_with_audio(song, inputs, model_dir, tmp_path):
    out = tmp_path / "out.mp4"
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / song, "--output", out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    info = probe(out)
    seconds = 0.6
    assert info.n_frames == round(seconds * 25) and info.width == info.height == 64
    assert info.has_audio and abs(info.duration_s - seconds) < 0.1


def test_silent_audio_warns_and_still_generates(inputs, model_dir, tmp_path):
    result = run("--image", inputs / "portrait.jpg", "--audio", inputs / "silent.wav", "--output",
                 tmp_path / "o.mp4", "--model", model_dir)
    assert result.exit_code == 0 and "silent" in result.output
    assert probe(tmp_path / "o.mp4").n_frames == 12


@pytest.mark.parametrize("case, expected", [
    ("missing_image", "image file not found"),
    ("text_image", "as an image"),
    ("two_faces", "several faces"),
    ("no_face", "no face found"),
    ("missing_audio", "does not exist"),
    ("image_as_audio", "no audio stream"),
    ("unwritable", "cannot write"),
    ("no_model", "model folder"),
])
def test_bad_input_gives_one_line(case, expected, inputs, model_dir, tmp_path):
    image, audio, output, model = inputs / "portrait.jpg", inputs / "stereo44k.wav", tmp_path / "o.mp4", model_dir
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
    elif case == "unwritable":
        output = tmp_path / "missing-folder" / "o.mp4"
    elif case == "no_model":
        model = tmp_path / "no-model"
    result = run("--image", image, "--audio", audio, "--output", output, "--model", model)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught error
    assert expected in " ".join(result.output.split())
    assert not output.exists()


@pytest.mark.slow
def test_minutes_of_audio_are_generated_in_windows(inputs, model_dir, tmp_path):
    song = 0.2 * np.sin(2 * np.pi * 220 * np.arange(16000 * 125) / 16000)  # 2 min 5 s
    sf.write(tmp_path / "long.wav", song, 16000)
    result = run("--image", inputs / "portrait.jpg", "--audio", tmp_path / "long.wav", "--output",
                 tmp_path / "long.mp4", "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "windows" in result.output
    assert probe(tmp_path / "long.mp4").n_frames == 125 * 25
