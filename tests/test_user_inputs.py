"""Photos and songs as people have them, through `singer generate` (issue 16): every one gives a playable video
of the photo's own size carrying the song as it was (its channels, its rate), or exactly one line of error.

The photos are scikit-image's astronaut placed in larger canvases (a 1920x1080 frame with a small face, a
3024x4032 phone photo), greyscale, RGBA, EXIF-rotated, WebP; the songs are written with PyAV in each format
(mp3, m4a/AAC, flac, ogg/opus, wav), mono, stereo and 5.1, at several rates. Weights don't matter here: an
untrained tiny model, one denoising step, songs of under a second.
"""

import numpy as np
import pytest
from factories import song, song_file
from PIL import Image
from skimage import data
from skimage.transform import resize
from test_generate import assert_one_line_error, run

from singer.media import probe, read_audio
from singer.media.writer import aac_rate

pytestmark = pytest.mark.slow


def astronaut(side: int) -> np.ndarray:
    return (resize(data.astronaut(), (side, side), anti_aliasing=True) * 255).astype(np.uint8)


def placed(canvas_wh: tuple[int, int], side: int, at: tuple[int, int]) -> np.ndarray:
    w, h = canvas_wh
    canvas = np.full((h, w, 3), (90, 120, 150), np.uint8)
    canvas[at[1]:at[1] + side, at[0]:at[0] + side] = astronaut(side)
    return canvas


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """name -> (path, (width, height) as displayed)."""
    d = tmp_path_factory.mktemp("photos")
    out = {}

    def save(name, image, **kwargs):
        Image.fromarray(image).save(d / name, **kwargs)
        h, w = image.shape[:2]
        out[name] = (d / name, (w, h))

    save("frame1080.jpg", placed((1920, 1080), 256, (1200, 300)), quality=90)   # the photo
    save("phone.jpg", placed((3024, 4032), 1400, (800, 900)), quality=85)
    save("grey.png", np.asarray(Image.fromarray(astronaut(400)).convert("L")))
    rgba = np.dstack([astronaut(300), np.full((300, 300), 255, np.uint8)])
    rgba[:20, :, 3] = 0                                                           # a transparent band
    save("alpha.png", rgba)
    save("photo.webp", placed((640, 480), 300, (170, 90)), quality=90)
    # stored rotated a quarter turn, with EXIF saying so: it shows (and must come out) upright, 480 x 640
    upright = placed((480, 640), 320, (80, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(np.rot90(upright, k=1)).save(d / "rotated.jpg", exif=exif, quality=90)
    out["rotated.jpg"] = (d / "rotated.jpg", (480, 640))
    return out


SONGS = [  # name, sample rate, channels
    ("stereo44k.mp3", 44100, 2),
    ("surround48k.m4a", 48000, 6),
    ("mono96k.flac", 96000, 1),
    ("stereo48k.ogg", 48000, 2),
    ("stereo37k8.wav", 37800, 2),
    ("mono8k.wav", 8000, 1),
]


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    d = tmp_path_factory.mktemp("songs")
    return {name: (song_file(d / name, song(0.6, rate, ch), rate), rate, ch) for name, rate, ch in SONGS}


def check_video(path, size, seconds, rate, channels, source=None):
    info = probe(path)
    assert (info.width, info.height) == (size[0] + size[0] % 2, size[1] + size[1] % 2) or \
        abs(info.width - size[0]) <= 1 and abs(info.height - size[1]) <= 1, (info.width, info.height, size)
    assert info.n_frames == round(seconds * 25), info
    assert info.has_audio and info.audio_channels == channels and info.audio_sr == aac_rate(rate), info
    if source is not None:  # each channel is the song's own channel, not a downmix
        heard, got_rate = read_audio(path, sample_rate=None, mono=False)
        given, _ = read_audio(source, sample_rate=got_rate, mono=False)
        n = min(heard.shape[1], given.shape[1]) - 2048
        for c in range(channels):
            lag = max(range(0, 2048, 1), key=lambda k: float(np.dot(heard[c, k:k + n], given[c, :n])))
            r = np.corrcoef(heard[c, lag:lag + n], given[c, :n])[0, 1]
            assert r > 0.9, (c, r, lag)
    return info


@pytest.mark.parametrize("photo", ["frame1080.jpg", "phone.jpg", "grey.png", "alpha.png", "photo.webp",
                                   "rotated.jpg"])
def test_every_photo_comes_back_its_own_size_singing(photo, photos, songs, model_dir, tmp_path):
    path, size = photos[photo]
    audio, rate, channels = songs["stereo44k.mp3"]
    out = tmp_path / "out.mp4"
    result = run("--image", path, "--audio", audio, "--output", out, "--model", model_dir)
    assert result.exit_code == 0, result.stdout + result.stderr
    check_video(out, size, 0.6, rate, channels)


def test_the_generated_face_is_pasted_where_the_face_was(photos, songs, model_dir, tmp_path):
    """Outside the face crop the video shows the photo; inside it, the generated face."""
    from singer.media import read_frames

    path, _ = photos["frame1080.jpg"]
    out = tmp_path / "out.mp4"
    result = run("--image", path, "--audio", songs["stereo44k.mp3"][0], "--output", out, "--model", model_dir)
    assert result.exit_code == 0, result.stderr
    frame = read_frames(out)[0][5].astype(float)
    photo = np.asarray(Image.open(path).convert("RGB"), float)
    far = np.abs(frame - photo)[:, :1000].mean()            # the left half holds no face: the photo itself
    face = np.abs(frame - photo)[300:556, 1200:1456].mean()  # an untrained model paints noise on the face
    assert far < 3 and face > 4 * far, (far, face)


@pytest.mark.parametrize("name", [name for name, _, _ in SONGS])
def test_every_song_plays_as_it_was(name, photos, songs, model_dir, tmp_path):
    audio, rate, channels = songs[name]
    out = tmp_path / "out.mp4"
    result = run("--image", photos["photo.webp"][0], "--audio", audio, "--output", out, "--model", model_dir,
                 "--max-side", "320")
    assert result.exit_code == 0, result.stdout + result.stderr
    check_video(out, (320, 240), 0.6, rate, channels, source=audio)


def test_no_paste_back_gives_the_models_crop(photos, songs, model_dir, tmp_path):
    out = tmp_path / "crop.mp4"
    result = run("--image", photos["frame1080.jpg"][0], "--audio", songs["mono8k.wav"][0], "--output", out,
                 "--model", model_dir, "--no-paste-back")
    assert result.exit_code == 0, result.stderr
    check_video(out, (64, 64), 0.6, 8000, 1)


@pytest.mark.parametrize("case,expected", [
    ("blank", "no face"),
    ("two_faces", "several faces"),
    ("not_audio", "cannot read audio"),
    ("too_long", "generate.max_seconds"),
    ("bad_separation", "separation"),
])
def test_bad_photos_and_songs_give_one_line(case, expected, photos, songs, model_dir, tmp_path):
    image, audio, extra = photos["photo.webp"][0], songs["stereo44k.mp3"][0], []
    if case == "blank":
        image = tmp_path / "blank.jpg"
        Image.fromarray(np.full((1080, 1920, 3), 128, np.uint8)).save(image)
    elif case == "two_faces":
        image = tmp_path / "two.jpg"
        Image.fromarray(np.hstack([placed((900, 700), 400, (250, 150))] * 2)).save(image)
    elif case == "not_audio":
        audio = photos["photo.webp"][0]
    elif case == "too_long":
        extra = ["-S", "generate.max_seconds=0.3"]
    elif case == "bad_separation":
        extra = ["--separation", "karaoke"]
    out = tmp_path / "out.mp4"
    result = run("--image", image, "--audio", audio, "--output", out, "--model", model_dir, *extra)
    assert_one_line_error(result, expected)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
