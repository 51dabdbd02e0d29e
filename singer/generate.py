"""`singer generate`: a portrait and a song -> an mp4 of that person singing it, the song as its sound track.

    singer generate --image photo.jpg --audio song.mp3 --output out.mp4 [--vocals vocals.wav]
                    [--model models/full | --model models:/singer@champion] [--steps 25] [--guidance 3.5] [--seed 0]
                    [--max-side 1280] [--no-paste-back] [--separation repet_sim|hpss|none|model] [--separator-model F]
    singer generate ... --pretrained pretrained_models --preset paper     # Hallo's weights + fresh MSM/SFM, untrained

The way people use it (params.yaml `generate:`):
- **Any photo**: any size and aspect ratio, greyscale, alpha, EXIF-rotated, WebP. The face is found wherever it
  is, down to `crop.min_face_px`, with the crop stage's detector settings, cropped as in training, generated,
  and pasted back into the photo (`singer.faces.paste.PasteBack`: a feathered mask, colours matched at the
  seam), so the video has the photo's size (or `--max-side`). `--no-paste-back` gives the model's crop.
- **Any song**: whatever PyAV decodes (mp3, m4a/AAC, flac, ogg/opus, wav; any channels and rate). The video
  carries the song as it was (its channels, its rate: `singer.media.writer`); the audio encoder hears 16 kHz
  mono vocals (`--vocals`, else separated from the song: `generate.separation`, HPSS by default, as Hallo separates them,
  ``hallo/datasets/audio_processor.py``) at one loudness (`generate.loudness_lufs`, ITU-R BS.1770), so a quiet
  master and a loud one drive the mouth alike.
- **Long songs**: frames are pasted and encoded as each window finishes (`SingerPipeline.windows`), so memory
  does not grow with the song (README "Long songs"); the progress bar counts windows, with an ETA.

Every problem a user can cause (missing or unreadable files, audio shorter than a frame or longer than
`generate.max_seconds`, no face or several faces, an output path that is a folder or in no folder, a model
folder that is not one or is damaged, a registry that cannot be reached or has no such model, steps below 1 or
a negative guidance) ends in a `GenerateError` with a one-line message that says what is wrong and what to do;
the CLI prints it. The video is written to a temporary name beside the output and renamed into place when
it is whole, so a failed or interrupted (Ctrl-C) run leaves nothing half-written there.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from singer.urls import redact_url, server_unreachable

SAMPLE_RATE = 16000
FPS = 25  # the shortest song is one frame of it


class GenerateError(RuntimeError):
    """A one-line, user-facing reason why generation cannot run."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_settings(steps: int | None, guidance: float | None, sampler: str | None = None) -> None:
    """`None` means the model's own value; anything given must make sense (0 steps is not 'the default')."""
    from singer.models.scheduler import SAMPLERS

    if sampler is not None and sampler not in SAMPLERS:
        raise GenerateError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None and int(steps) < 1:
        raise GenerateError(f"--steps must be at least 1, got {steps} (leave it out for the model's default)")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise GenerateError(f"--guidance must be a number >= 0, got {guidance} (1 turns guidance off; leave it "
                            f"out for the model's default)")


def check_writable(output: Path) -> None:
    parent = output.resolve().parent
    if output.is_dir():
        raise GenerateError(f"cannot write {output}: it is a folder; give a file name such as {output / 'out.mp4'}")
    if not parent.is_dir():
        raise GenerateError(f"cannot write {output}: folder {parent} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".singer-write-test-"):
            pass
    except OSError as exc:
        raise GenerateError(f"cannot write {output}: {exc.strerror or exc}; choose a folder you can write to") \
            from exc


def load_song(path: Path, max_seconds: float | None = None) -> np.ndarray:
    """The song at 16 kHz mono, for the model (the video's sound track is read from the file again, as it is)."""
    from singer.media import MediaError, audio_seconds, read_audio

    if not path.exists():
        raise GenerateError(f"audio file {path} does not exist")
    try:
        # the container's own duration first: a two-hour file is refused before it is decoded
        declared = audio_seconds(path)
        if max_seconds is not None and declared is not None and declared > max_seconds + 1:
            raise GenerateError(too_long(path, declared, max_seconds))
        model_audio, _ = read_audio(path, sample_rate=SAMPLE_RATE, mono=True)
    except MediaError as exc:
        raise GenerateError(f"cannot read audio from {path}: {exc}") from exc
    if len(model_audio) < SAMPLE_RATE // FPS:
        raise GenerateError(f"audio in {path} is {1000 * len(model_audio) / SAMPLE_RATE:.0f} ms long, shorter than "
                            f"one video frame ({1000 // FPS} ms); give a longer song")
    if max_seconds is not None and len(model_audio) / SAMPLE_RATE > max_seconds:
        raise GenerateError(too_long(path, len(model_audio) / SAMPLE_RATE, max_seconds))
    return model_audio


def too_long(path: Path, seconds: float, max_seconds: float) -> str:
    return (f"audio in {path} is {seconds:.1f} s long; at most {max_seconds:g} s are accepted "
            f"(generate.max_seconds): cut the song or raise the limit")


def heard_audio(song: np.ndarray, settings, vocals: np.ndarray | None = None) -> np.ndarray:
    """What the audio encoder hears: (S,) 16 kHz mono. The vocals (given, else separated from the song by
    `settings.separation`), at `settings.loudness_lufs` (BS.1770) when set."""
    from singer.media import SeparationError, normalize_loudness, separate_vocals

    if vocals is None and settings.separation != "none":
        try:
            vocals = separate_vocals(song, SAMPLE_RATE, settings.separation, settings.separator_model)
        except SeparationError as exc:
            raise GenerateError(str(exc)) from exc
    heard = song if vocals is None else vocals
    if settings.loudness_lufs is not None:
        heard = normalize_loudness(heard, SAMPLE_RATE, float(settings.loudness_lufs))
    return np.asarray(heard, np.float32)


def load_vocals(path: Path, samples: int, warn: Callable[[str], None] = print) -> np.ndarray:
    """The vocals track at 16 kHz mono, cut or padded with silence to the song's `samples`."""
    from singer.media import MediaError, read_audio

    if not path.exists():
        raise GenerateError(f"vocals file {path} does not exist")
    try:
        vocals, _ = read_audio(path, sample_rate=SAMPLE_RATE, mono=True)
    except MediaError as exc:
        raise GenerateError(f"cannot read audio from {path}: {exc}") from exc
    if abs(len(vocals) - samples) > SAMPLE_RATE // 2:
        warn(f"the vocals last {len(vocals) / SAMPLE_RATE:.1f} s, the song {samples / SAMPLE_RATE:.1f} s: "
             f"the vocals are cut or padded with silence to the song")
    out = np.zeros(samples, np.float32)
    out[: min(samples, len(vocals))] = vocals[:samples]
    return out


def check_registry(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, where MLflow would create a store as a side effect (a sqlite file that is
    not there) or retry for minutes (a server nobody answers at)."""
    hint = "set MLFLOW_TRACKING_URI to the store `singer register` used"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not Path(path).is_file():
            raise GenerateError(f"no MLflow store at {path} (from the tracking URI {uri}); {hint}")
    elif uri.startswith(("http://", "https://")):
        exc = server_unreachable(uri, timeout)
        if exc is not None:
            reason = getattr(exc, "reason", exc)
            raise GenerateError(f"MLflow server {redact_url(uri)} is not reachable ({reason}); start it or {hint}") \
                from exc


@contextmanager
def _quiet(*loggers: str, level: int = logging.WARNING):
    """Keep libraries' INFO lines (database migrations, downloads) off stderr while the CLI works."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


def resolve_model(model: str) -> Path:
    """A local save_pretrained folder, or a registered MLflow model (`models:/name@alias`, `models:/name/3`)."""
    if model.startswith("models:/"):
        import mlflow

        uri = mlflow.get_registry_uri()
        check_registry(uri)
        try:
            with _quiet("mlflow", "alembic"):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except Exception as exc:  # MLflow raises many kinds; the message is what the user needs
            raise GenerateError(f"cannot fetch {model} from the MLflow registry at {redact_url(uri)}: "
                                f"{first_line(exc)}; check the name and alias (`singer register`, "
                                f"`singer release`) or MLFLOW_TRACKING_URI") from exc
    else:
        local = Path(model)
    if not local.exists():
        raise GenerateError(f"model folder {local} does not exist (train one with `singer train`)")
    hits = sorted(local.rglob("model_index.json"))
    if not hits:
        raise GenerateError(f"{local} holds no SINGER pipeline (no model_index.json); point --model at a folder "
                            f"that `singer train` wrote, e.g. models/full")
    return hits[0].parent


def load_pipeline(folder: Path):
    """`SingerPipeline.from_pretrained`, with whatever a damaged folder makes diffusers raise (bad JSON, a
    truncated safetensors file, a missing component) turned into one line."""
    from singer.pipeline import SingerPipeline

    try:
        return SingerPipeline.from_pretrained(folder)
    except Exception as exc:  # OSError, ValueError, SafetensorError, KeyError, ...: all mean "not loadable"
        raise GenerateError(f"cannot load the model in {folder}: {first_line(exc)}; the folder is damaged or "
                            f"incomplete: train it again (`singer train`) or fetch it again") from exc


def build_pipeline(cfg):
    """(pipeline, LoadReport): a pipeline built from the parameters, released weights included (``singer generate --pretrained DIR``:
    Hallo + fresh MSM/SFM, no training), with the folder's problems in one line."""
    from singer.models.pretrained import PretrainedMismatchError
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    try:
        model = SingerModel.build(cfg.model, resolution=cfg.crop.resolution, fps=float(cfg.clip.fps))
    except (PretrainedMismatchError, FileNotFoundError, ValueError) as exc:
        raise GenerateError(f"cannot build the {cfg.preset} model on {cfg.model.pretrained}: {first_line(exc)}") \
            from exc
    return SingerPipeline.from_model(model.eval(), cfg.crop.resolution), getattr(model, "pretrained_report", None)


def generate_video(image: Path, audio: Path, output: Path, model: str = "models/full", steps: int | None = None,
                   guidance: float | None = None, seed: int = 0, progress: bool = True,
                   warn: Callable[[str], None] = print, vocals: Path | None = None, config=None, compute=None,
                   sampler: str | None = None, settings=None, crop=None,
                   callback: Callable[[int, int], None] | None = None) -> dict:
    """Write `output`: the photo `image` singing the song `audio`, at the photo's size (see the module docstring).

    model: a local folder or `models:/name@alias`; with `config` (a Config whose model.pretrained is set) the
    model is built from it instead. vocals: the song's vocals (16 kHz, fitted to the song) for the audio
    encoder, instead of separating them. compute: a `ComputeConfig` (None: fp32, eager); sampler: ddim |
    dpm_solver | unipc (None: the model's); settings: a `GenerateConfig` (None: its defaults); crop: the
    `CropConfig` whose detector settings find the face (None: its defaults); callback(done, total) after every
    denoising step, over all windows (an exception it raises stops generation, and nothing is written)."""
    from singer.config import CropConfig, GenerateConfig
    from singer.faces import InputError, load_image, make_face_embedder, prepare_reference
    from singer.faces.paste import PasteBack

    settings = settings or GenerateConfig()
    crop = crop or CropConfig()
    image, audio, output = Path(image), Path(audio), Path(output)
    check_settings(steps, guidance, sampler)
    check_writable(output)
    try:
        photo = load_image(image)
    except InputError as exc:
        raise GenerateError(str(exc)) from exc
    song = load_song(audio, settings.max_seconds)
    given = None if vocals is None else load_vocals(Path(vocals), len(song), warn)
    heard = heard_audio(song, settings, given)
    if float(np.max(np.abs(heard))) < 1e-4:
        warn(f"the {'audio' if vocals is None else 'vocals track'} is silent: the mouth will stay closed")
    folder = resolve_model(model) if config is None else Path(config.model.pretrained)

    import torch

    from singer.media import MediaError
    from singer.media.writer import VideoWriter

    if not progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    pipe, loaded = (load_pipeline(folder), None) if config is None else build_pipeline(config)
    if compute is not None:
        pipe.set_compute(compute)
    most = int(pipe.scheduler.config.num_train_timesteps)
    if steps is not None and steps > most:
        raise GenerateError(f"--steps must be at most {most} (the model's training timesteps), got {steps}")
    try:
        reference = prepare_reference(photo, pipe.resolution, crop=crop, what=str(image))
        embedding = make_face_embedder(pipe.model_cfg).embed(reference["image"], reference["landmarks"])
    except InputError as exc:
        raise GenerateError(str(exc) if str(image) in str(exc) else f"{image}: {exc}") from exc
    paste = PasteBack(photo, reference, settings.feather, settings.max_side) if settings.paste_back else None
    size = paste.size if paste is not None else (pipe.resolution, pipe.resolution)
    minutes = len(song) / SAMPLE_RATE / 60
    if minutes > 1:
        warn(f"{minutes:.1f} minutes of audio: generating in windows of {pipe.model_cfg.num_frames} frames")
    started = time.perf_counter()
    windows = pipe.windows(reference, heard, embedding, num_inference_steps=steps, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(seed), progress=progress, sampler=sampler,
                           callback=callback)
    try:
        # encoded into a temporary name beside `output` as each window finishes, renamed into place at the end;
        # any exception (Ctrl-C too) deletes the temporary file
        with VideoWriter(output, pipe.fps, size, audio=audio) as out:
            for frames in windows:
                out.write(frames if paste is None else np.stack([paste(frame) for frame in frames]))
    except MediaError as exc:
        raise GenerateError(f"cannot write {output} with the sound of {audio}: {exc}") from exc
    except OSError as exc:
        raise GenerateError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        windows.close()
    return {"frames": out.frames, "seconds": out.seconds, "compute_seconds": time.perf_counter() - started,
            "model": str(folder), "output": os.fspath(output), "compute_dtype": str(pipe.compute_dtype),
            "width": size[0], "height": size[1], "paste_back": paste is not None,
            "separation": "given" if vocals is not None else settings.separation,
            "loudness_lufs": settings.loudness_lufs,
            "pretrained": loaded.summary() if loaded is not None else None}
