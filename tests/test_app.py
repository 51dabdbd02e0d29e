"""`singer app` in a real browser (Debian's headless chromium, driven by Playwright): a photo and a song are
uploaded, the video comes back playable and of the song's length; a photo without a face shows the CLI's
one-line error in the page."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from skimage import data

from singer.media import probe

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GRADIO_ANALYTICS_ENABLED": "False"}
    repo = Path(__file__).resolve().parents[1]
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "singer"), "app", "--params",
                                 str(repo / "params.yaml"), "--port", str(port), "--model", str(model_dir)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"singer app did not answer in 120 s:\n{log.read_text()}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("the browser test needs Debian's chromium: apt-get install chromium (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    Image.fromarray(data.astronaut()).save(d / "photo.jpg")
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(d / "blank.png")
    t = np.arange(16000) / 16000
    sf.write(d / "song.wav", 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)), 16000)
    return d


def submit(page, url, photo, song):
    page.goto(url)
    page.locator("#photo input[type=file]").set_input_files(str(photo))
    page.locator("#song input[type=file]").set_input_files(str(song))
    page.locator("#steps input").fill("1")
    page.wait_for_timeout(1500)  # the uploads land on the server before the click
    page.locator("#generate").click()


def test_a_photo_and_a_song_give_a_playable_video(app_url, browser, uploads, tmp_path):
    page = browser.new_page()
    submit(page, app_url, uploads / "photo.jpg", uploads / "song.wav")
    video = page.locator("#result video")
    video.wait_for(state="attached", timeout=240_000)
    src = video.get_attribute("src")
    page.screenshot(path=str(tmp_path / "app-result.png"), full_page=True)
    got = page.request.get(src if src.startswith("http") else app_url.rstrip("/") + "/" + src.lstrip("/"))
    assert got.ok, got.status
    (tmp_path / "got.mp4").write_bytes(got.body())
    info = probe(tmp_path / "got.mp4")
    assert info.n_frames == 25 and abs(info.duration_s - 1.0) < 0.1 and info.has_audio, info
    assert (info.width, info.height) == (512, 512)  # the photo's size: the face was pasted back
    page.close()


def test_a_photo_without_a_face_shows_the_one_line_error(app_url, browser, uploads):
    page = browser.new_page()
    submit(page, app_url, uploads / "blank.png", uploads / "song.wav")
    error = page.get_by_text("no face found", exact=False).first
    error.wait_for(timeout=120_000)
    text = error.inner_text()
    assert "Traceback" not in page.content() and "\n" not in text.strip(), text
    assert page.locator("#result video").count() == 0
    page.close()
