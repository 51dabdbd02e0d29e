"""`singer generate`: a portrait and a song -> an mp4 of that person singing it, audio muxed in.

    singer generate --image portrait.jpg --audio song.mp3 --output out.mp4 [--model models/full
                    | --model models:/singer@champion] [--steps 25] [--guidance 3.5] [--seed 0]

Every problem a user can cause (missing or unreadable files, no face or several faces, an unwritable output,
a model folder that is not one) ends in a `GenerateError` with a one-line message; the CLI prints it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class GenerateError(RuntimeError):
    """A one-line, user-facing reason why generation cannot run."""


def check_writable(output: Path) -> None:
    parent = output.resolve().parent
    if output.exists() and output.is_dir():
        raise GenerateError(f"cannot write {output}: it is a folder")
    if not parent.is_dir():
        raise GenerateError(f"cannot write {output}: folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".singer-write-test-"):
            pass
    except OSError as exc:
        raise GenerateError(f"cannot write {output}: {exc.strerror or exc}") from exc


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
    if len(model_audio) < SAMPLE_RATE // 25:
        raise GenerateError(f"audio in {path} is shorter than one video frame")
    return model_audio, native, rate


def resolve_model(model: str) -> Path:
    """A local save_pretrained folder, or a registered MLflow model (`models:/name@alias`, `models:/name/3`)."""
    if model.startswith("models:/"):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except Exception as exc:  # MLflow raises many kinds; the message is what the user needs
            raise GenerateError(f"cannot fetch {model} from MLflow: {str(exc).splitlines()[0]}") from exc
    else:
        local = Path(model)
    if not local.exists():
        raise GenerateError(f"model folder {local} does not exist (train one with `singer train`)")
    hits = sorted(local.rglob("model_index.json"))
    if not hits:
        raise GenerateError(f"{local} holds no SINGER pipeline (no model_index.json)")
    return hits[0].parent


def generate_video(image: Path, audio: Path, output: Path, model: str = "models/full", steps: int | None = None,
                   guidance: float | None = None, seed: int = 0, progress: bool = True,
                   warn: Callable[[str], None] = print) -> dict:
    from singer.faces import InputError, load_image, make_face_embedder, prepare_reference

    image, audio, output = Path(image), Path(audio), Path(output)
    check_writable(output)
    try:
        portrait = load_image(image)
    except InputError as exc:
        raise GenerateError(str(exc)) from exc
    song, native, rate = load_song(audio)
    if float(np.max(np.abs(song))) < 1e-4:
        warn("the audio is silent: the mouth will stay closed")
    folder = resolve_model(model)

    import torch

    from singer.media import write_video
    from singer.pipeline import SingerPipeline

    if not progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    pipe = SingerPipeline.from_pretrained(folder)
    try:
        reference = prepare_reference(portrait, pipe.resolution)
        embedding = make_face_embedder(pipe.model_cfg).embed(reference["image"], reference["landmarks"])
    except InputError as exc:
        raise GenerateError(f"{image}: {exc}") from exc
    minutes = len(song) / SAMPLE_RATE / 60
    if minutes > 1:
        warn(f"{minutes:.1f} minutes of audio: generating in windows of {pipe.model_cfg.num_frames} frames")
    started = time.perf_counter()
    result = pipe(reference, song, embedding, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), progress=progress)
    seconds = len(result.frames) / result.fps
    try:
        write_video(output, result.frames, fps=result.fps, audio=native[: int(round(seconds * rate))],
                    sample_rate=rate)
    except OSError as exc:
        raise GenerateError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return {"frames": len(result.frames), "seconds": seconds, "compute_seconds": time.perf_counter() - started,
            "model": str(folder), "output": os.fspath(output)}
