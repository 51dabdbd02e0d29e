"""The served model: SINGER as an MLflow pyfunc (`SingerPyfunc`), what `mlflow models serve` runs.

- `log_pyfunc` logs the `save_pretrained` folder (artifact `pipeline`) with the `singer` package in `code_paths`,
  so `mlflow.pyfunc.load_model("models:/singer@champion")` and `mlflow models serve -m models:/singer@champion
  --env-manager local` work offline; `serve.max_seconds` goes into the model config.
- Input: a DataFrame with `image` (base64 image file bytes) and `audio` (base64 wav/mp3/flac/... bytes),
  optional `steps`, `seed`, `guidance`; output: `video` (base64 mp4 bytes), `frames`, `seconds`.
- A bad request (a missing column, not base64, not an image / audio file, no face, audio longer than
  `serve.max_seconds`, steps < 1, ...) raises `ServeError`, checked before generation starts: the server
  answers 400 with {"error_code": "INVALID_PARAMETER_VALUE", "message": "<one line>", ...}, no stack trace.
"""

from __future__ import annotations

import base64
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any


class RegistryError(RuntimeError):
    """A one-line, user-facing reason why registering or releasing cannot go on."""


# Runtime requirements written into the model's requirements.txt (the ones generation imports); the
# `singer` package itself travels in code_paths. Pinned to the installed versions when they are found.
_RUNTIME_PACKAGES = ["torch", "diffusers", "transformers", "numpy", "scipy", "pandas", "pydantic", "pyyaml",
                     "einops", "av", "scikit-image", "opencv-python-headless", "librosa", "soundfile",
                     "pywavelets", "dlib-bin", "face_recognition_models", "pillow"]


try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object

try:
    from mlflow.exceptions import MlflowException as _MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE as _INVALID_PARAMETER_VALUE
except ImportError:  # pragma: no cover - mlflow is a dependency
    _MlflowException, _INVALID_PARAMETER_VALUE = ValueError, None


class ServeError(_MlflowException):
    """A one-line, user-facing reason why the served model refuses a request.

    An MlflowException with INVALID_PARAMETER_VALUE: `mlflow models serve` answers it with a 400 and the JSON
    body {"error_code": "INVALID_PARAMETER_VALUE", "message": <this line>, ...}, no stack trace. The scoring
    server rewrites `message` of exceptions out of predict to "Failed to predict data '<the whole input
    DataFrame>'. \nError: <message>" (many lines, the user's base64 echoed back); the reason stays as it is."""

    def __init__(self, message: str):
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        self._reason = lines[0] if lines else "bad request"
        if _INVALID_PARAMETER_VALUE is None:  # pragma: no cover
            super().__init__(self._reason)
        else:
            super().__init__(self._reason, error_code=_INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value) -> None:  # keep the one-line reason (see the class docstring)
        pass


def default_max_seconds() -> float:
    """`serve.max_seconds` of a default config: for models logged before the limit was stored with them."""
    from singer.config import ServeConfig

    return float(ServeConfig().max_seconds)


with warnings.catch_warnings():  # mlflow nags about type hints on predict; the signature is explicit
    warnings.simplefilter("ignore")

    class SingerPyfunc(_PythonModel):
        """Reference image + audio in, mp4 out (all base64), as an MLflow pyfunc.

        Bad requests raise ServeError (a 400 from `mlflow models serve`, one line) before generation starts:
        a missing column, a value that is not base64, an image PIL cannot read, audio PyAV cannot read or
        longer than `max_seconds` (the model config's, from `serve.max_seconds` when the model was logged),
        steps < 1, ...; generate_video's GenerateError (no face in the image, ...) becomes a ServeError too."""

        model_dir: str | None = None
        max_seconds: float | None = None

        def load_context(self, context) -> None:
            from singer.generate import resolve_model

            self.model_dir = str(resolve_model(context.artifacts["pipeline"]))
            config = getattr(context, "model_config", None) or {}
            limit = config.get("max_seconds")
            self.max_seconds = default_max_seconds() if limit is None else float(limit)

        def predict(self, context, model_input, params=None):
            import pandas as pd

            from singer.generate import GenerateError, generate_video

            if context is not None and not getattr(self, "model_dir", None):
                self.load_context(context)
            limit = self.max_seconds if self.max_seconds is not None else default_max_seconds()
            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            for column in ("image", "audio"):
                if column not in df.columns:
                    raise ServeError(f"input needs a column '{column}' (base64-encoded file bytes)")
            # every row is checked before any generation starts
            requests = [_check_row(row, i if len(df) > 1 else None, limit) for i, (_, row) in enumerate(df.iterrows())]
            rows = []
            for req in requests:
                with tempfile.TemporaryDirectory(prefix="singer-pyfunc-") as tmp:
                    image = Path(tmp) / ("image" + _image_suffix(req["image"]))
                    image.write_bytes(req["image"])
                    audio = Path(tmp) / ("audio" + _audio_suffix(req["audio"]))
                    audio.write_bytes(req["audio"])
                    output = Path(tmp) / "out.mp4"
                    try:
                        info = generate_video(image, audio, output, self.model_dir, steps=req["steps"],
                                              guidance=req["guidance"], seed=req["seed"], progress=False,
                                              warn=lambda _m: None)
                    except GenerateError as exc:
                        raise ServeError(_served_message(str(exc), {str(image): "column 'image'",
                                                                    str(audio): "column 'audio'"},
                                                         req["where"])) from exc
                    rows.append({"video": base64.b64encode(output.read_bytes()).decode("ascii"),
                                 "frames": int(info["frames"]), "seconds": float(info["seconds"])})
            return pd.DataFrame(rows, columns=["video", "frames", "seconds"])


def _check_row(row, index: int | None, max_seconds: float) -> dict:
    """One request row, decoded and checked cheaply (no generation): raises ServeError."""
    where = "" if index is None else f" (row {index})"
    image = _b64(row["image"], "image", where)
    _check_image(image, where)
    audio = _b64(row["audio"], "audio", where)
    seconds = audio_seconds(audio, where)
    if seconds > max_seconds:
        raise ServeError(f"audio is {seconds:.1f} s long; this server accepts at most {max_seconds:g} s "
                         f"(serve.max_seconds){where}")
    steps = _opt(row, "steps", int, where)
    if steps is not None and steps < 1:
        raise ServeError(f"column 'steps' must be at least 1, got {steps}{where} (leave it out for the model's "
                         f"default)")
    guidance = _opt(row, "guidance", float, where)
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ServeError(f"column 'guidance' must be a number >= 0, got {guidance}{where} (1 turns guidance off; "
                         f"leave it out for the model's default)")
    seed = _opt(row, "seed", int, where)
    return {"image": image, "audio": audio, "steps": steps, "guidance": guidance,
            "seed": 0 if seed is None else seed, "where": where}


def _served_message(message: str, paths: dict[str, str], where: str) -> str:
    """generate_video's one line, in the request's terms: temporary paths -> column names, CLI flags -> columns."""
    message = first_line_of(message)
    for path, name in paths.items():
        message = message.replace(path, name)
    for flag in ("steps", "guidance", "seed"):
        message = message.replace(f"--{flag}", f"column '{flag}'")
    return message + where


def first_line_of(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _opt(row, name: str, kind, where: str = ""):
    value = row.get(name) if hasattr(row, "get") else None
    if value is None:
        return None
    try:
        if isinstance(value, float) and math.isnan(value):
            return None
    except TypeError:
        pass
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ServeError(f"column '{name}' must be {'an integer' if kind is int else 'a number'}, "
                         f"got {str(value)[:40]!r}{where}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise ServeError(f"column '{name}' must be an integer, got {value}{where}")
    return out


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return isinstance(value, float) and math.isnan(value)
    except TypeError:
        return False


def _b64(value: Any, what: str, where: str = "") -> bytes:
    """A column's file bytes: base64 text (whitespace and a `data:...;base64,` prefix allowed), or raw bytes."""
    if _is_missing(value):
        raise ServeError(f"column '{what}' is empty{where}: give the file's bytes, base64-encoded")
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        try:  # bytes columns may hold the raw file or its base64 text
            out = base64.b64decode(value, validate=True)
        except ValueError:
            out = value
    else:
        text = "".join(str(value).split())
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            out = base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise ServeError(f"column '{what}' is not base64{where}: {first_line_of(str(exc)) or 'cannot decode'}") \
                from None
    if not out:
        raise ServeError(f"column '{what}' is empty{where}: give the file's bytes, base64-encoded")
    return out


def _check_image(data: bytes, where: str = "") -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "not a format PIL knows" if isinstance(exc, UnidentifiedImageError) else \
            (first_line_of(str(exc)) or type(exc).__name__)
        raise ServeError(f"column 'image' is not an image file (PNG, JPEG, WebP, ...){where}: {reason}") from None


def audio_seconds(data: bytes, where: str = "") -> float:
    """The duration of an audio file's bytes (`singer.media.audio_seconds`: no decoding), or a ServeError."""
    from singer.media import MediaError
    from singer.media import audio_seconds as media_audio_seconds

    try:
        return media_audio_seconds(data)
    except MediaError as exc:
        if str(exc) == "no audio stream":
            raise ServeError(f"column 'audio' holds no audio stream{where} (give a wav, mp3, flac, ... file)") \
                from None
        raise ServeError(f"column 'audio' is not an audio file{where} (give a wav, mp3, flac, ... file): "
                         f"{first_line_of(str(exc))}") from None


def _image_suffix(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def _audio_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF":
        return ".wav"
    if data[:4] == b"fLaC":
        return ".flac"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0):
        return ".mp3"
    if data[:4] == b"OggS":
        return ".ogg"
    return ".audio"


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # image and audio are required, but SingerPyfunc checks that itself: MLflow's schema enforcement would
    # answer a missing column with a many-line message that echoes the whole request back
    inputs = Schema([
        ColSpec("string", "image", required=False),
        ColSpec("string", "audio", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("double", "guidance", required=False),
    ])
    outputs = Schema([ColSpec("string", "video"), ColSpec("long", "frames"), ColSpec("double", "seconds")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in _RUNTIME_PACKAGES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def input_example():
    """A request the served model answers in a second: scikit-image's astronaut (a 256^2 JPEG around the face),
    0.2 s of a sung A3 (16 kHz wav), 1 step. MLflow stores it with the model and, when the model is logged,
    runs it through `predict` once: a logged model that cannot generate says so (a warning) at logging time."""
    import numpy as np
    import pandas as pd
    import soundfile as sf
    from PIL import Image
    from skimage import data

    image = io.BytesIO()
    Image.fromarray(data.astronaut()[:256, 96:352]).save(image, format="JPEG", quality=85)
    rate = 16000
    t = np.arange(int(0.2 * rate)) / rate
    audio = io.BytesIO()
    sf.write(audio, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return pd.DataFrame({"image": [base64.b64encode(image.getvalue()).decode("ascii")],
                         "audio": [base64.b64encode(audio.getvalue()).decode("ascii")], "steps": [1], "seed": [0]})


def log_pyfunc(model_dir: str | os.PathLike, name: str = "model", max_seconds: float | None = None,
               tags: dict[str, str] | None = None, params: dict[str, str] | None = None):
    """Log the pyfunc wrapping `model_dir` into the active run as an MLflow 3 logged model (its source run is
    that run); returns mlflow's ModelInfo (`.model_id`, `.model_uri`). `max_seconds` (the longest audio the
    served model accepts; `serve.max_seconds`) goes into the model config; None: the default config's. `tags`
    and `params` go on the logged model."""
    import mlflow

    import singer

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        hits = sorted(model_dir.rglob("model_index.json")) if model_dir.is_dir() else []
        if not hits:
            raise RegistryError(f"{model_dir} holds no SINGER pipeline (no model_index.json)")
        model_dir = hits[0].parent
    package_dir = Path(singer.__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=SingerPyfunc(),
        artifacts={"pipeline": str(model_dir)},
        code_paths=[str(package_dir)],
        pip_requirements=pip_requirements(),
        signature=model_signature(),
        input_example=input_example(),
        model_config={"max_seconds": float(default_max_seconds() if max_seconds is None else max_seconds)},
        tags=tags,
        params=params,
    )
