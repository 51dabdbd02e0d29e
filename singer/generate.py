"""`singer generate`: a portrait and a song -> an mp4 of that person singing it, audio muxed in.

    singer generate --image portrait.jpg --audio song.mp3 --output out.mp4 [--vocals vocals.wav]
                    [--model models/full | --model models:/singer@champion] [--steps 25] [--guidance 3.5] [--seed 0]
    singer generate ... --pretrained pretrained_models --preset paper     # Hallo's weights + fresh MSM/SFM, untrained

With ``--vocals`` (the song's separated vocals, e.g. from a source separator) the audio encoder hears the vocals,
as Hallo's does (it separates them first: ``hallo/datasets/audio_processor.py:91-103``) and as training does when
a clip has ``vocals.wav``; the video's sound track is still ``--audio``, and its length sets the video's.

Every problem a user can cause (missing or unreadable files, audio shorter than a frame, no face or several
faces, an output path that is a folder or in no folder, a model folder that is not one or is damaged, a
registry that cannot be reached or has no such model, steps below 1 or a negative guidance) ends in a
`GenerateError` with a one-line message that says what is wrong and what to do; the CLI prints it. The
video is written to a temporary name beside the output and renamed into place, so a failed run leaves
nothing half-written there.
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


def load_song(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (16 kHz mono for the model, mono at the file's own rate for the output, that rate)."""
    from singer.media import MediaError, read_audio

    if not path.exists():
        raise GenerateError(f"audio file {path} does not exist")
    try:
        model_audio, _ = read_audio(path, sample_rate=SAMPLE_RATE, mono=True)
        native, rate = read_audio(path, sample_rate=None, mono=True)
    except MediaError as exc:
        raise GenerateError(f"cannot read audio from {path}: {exc}") from exc
    if len(model_audio) < SAMPLE_RATE // FPS:
        raise GenerateError(f"audio in {path} is {1000 * len(model_audio) / SAMPLE_RATE:.0f} ms long, shorter than "
                            f"one video frame ({1000 // FPS} ms); give a longer song")
    return model_audio, native, rate


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
                   sampler: str | None = None) -> dict:
    """Write `output`; the audio encoder hears `vocals` (16 kHz, fitted to the song) when given, else the song.
    With `config` (a Config whose model.pretrained is set) the model is built from it instead of loading `model`.
    compute: a `ComputeConfig` (None: fp32, eager); sampler: ddim | dpm_solver | unipc (None: the model's)."""
    from singer.faces import InputError, load_image, make_face_embedder, prepare_reference

    image, audio, output = Path(image), Path(audio), Path(output)
    check_settings(steps, guidance, sampler)
    check_writable(output)
    try:
        portrait = load_image(image)
    except InputError as exc:
        raise GenerateError(str(exc)) from exc
    song, native, rate = load_song(audio)
    heard = song if vocals is None else load_vocals(Path(vocals), len(song), warn)
    if float(np.max(np.abs(heard))) < 1e-4:
        warn(f"the {'audio' if vocals is None else 'vocals track'} is silent: the mouth will stay closed")
    folder = resolve_model(model) if config is None else Path(config.model.pretrained)

    import torch

    from singer.media import write_video

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
        reference = prepare_reference(portrait, pipe.resolution)
        embedding = make_face_embedder(pipe.model_cfg).embed(reference["image"], reference["landmarks"])
    except InputError as exc:
        raise GenerateError(f"{image}: {exc}") from exc
    minutes = len(song) / SAMPLE_RATE / 60
    if minutes > 1:
        warn(f"{minutes:.1f} minutes of audio: generating in windows of {pipe.model_cfg.num_frames} frames")
    started = time.perf_counter()
    result = pipe(reference, heard, embedding, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), progress=progress, sampler=sampler)
    seconds = len(result.frames) / result.fps
    try:
        # write_video encodes into a temporary name beside `output` and renames it into place
        write_video(output, result.frames, fps=result.fps, audio=native[: int(round(seconds * rate))],
                    sample_rate=rate)
    except OSError as exc:
        raise GenerateError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return {"frames": len(result.frames), "seconds": seconds, "compute_seconds": time.perf_counter() - started,
            "model": str(folder), "output": os.fspath(output), "compute_dtype": str(pipe.compute_dtype),
            "pretrained": loaded.summary() if loaded is not None else None}
