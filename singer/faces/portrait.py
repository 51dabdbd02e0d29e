"""A user's portrait -> the model's reference inputs, cropped exactly as the crop stage crops training clips.

    image = load_image("portrait.jpg")                    # uint8 RGB (H, W, 3); InputError on a bad file
    ref = prepare_reference(image, resolution=64)         # or prepare_reference("portrait.jpg", 64)
    ref["image"]      (64, 64, 3) uint8  the face crop (scale 0.8: the face spans 0.8 of the side)
    ref["landmarks"]  (68, 2) float32    dlib's 68 points in crop pixels (pixel centres are integers)
    ref["masks"]      "full", "face", "lip": (64, 64) float32 in [0, 1] (soft; Hallo's background / face
                      minus lip / lip), "face_region": (64, 64) uint8 {0, 1} (the hard face box)
    ref["crop_box"]   (x0, y0, x1, y1) of the crop in source pixels; ref["score"] the detector's score
    ref["crop_centre"] (2,) and ref["crop_side"]: the crop square in source pixels; ref["source_size"] (W, H)
                      (what ``singer.faces.paste.PasteBack`` needs to put a generated crop back)

Detection (``find_face``), the crop stage's rules and settings (a ``CropConfig``) on one frame:
* HOG coarse to fine (``singer.faces.detect.search_faces``): the image with its long side at ``detect_max_side``
  (320), then twice the scale, and so on, until a face of ``min_face_px`` (80) source pixels would measure HOG's
  85-px window; the first level with a face answers. Candidates scoring below ``min_face_score`` (0.3) are
  ignored (with upsampling HOG reports weak false faces, e.g. 0.12 on the astronaut's flag).
* Faces are counted a second time on the whole image rescaled so that the found face measures 170 px (a face
  half its size is then still above HOG's window). Another candidate scoring >= ``min_face_score`` whose box is at
  least ``second_face_ratio`` (0.5) of the main one's size, and which does not overlap it, is a second face:
  ``ManyFacesError``. Judged by score and size, not by count (DESIGN section 6).
* The 68 landmarks are fitted on the full-resolution image.

Cropping uses ``singer.faces.crop`` (``crop_geometry`` / ``crop_frame`` / ``to_crop``) on a one-frame track, so a
portrait is cropped like the reference frame of a training clip. The masks are ``singer.faces.masks.make_masks``
with Hallo's inference ratios (face box x1.2, lip box x2.0, as its ``ImageProcessor.preprocess`` builds them for one
image): a still portrait must cover where the face and lips will move, which a training clip's masks get from
the union of its frames' boxes.

Errors are one line each and subclass ``InputError`` (a ``ValueError``): ``NoFaceError``, ``ManyFacesError``,
and ``InputError`` itself for files that are missing or not images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from singer.config import CropConfig
from singer.faces.crop import crop_frame, crop_geometry, to_crop
from singer.faces.detect import HOG_MIN_FACE, Box, box_side, detect_scaled, iou, search_faces
from singer.faces.landmarks import landmarks68
from singer.faces.masks import INFERENCE_FACE_EXPAND, INFERENCE_LIP_EXPAND, make_masks

__all__ = [
    "FaceDetection",
    "InputError",
    "ManyFacesError",
    "NoFaceError",
    "as_rgb_uint8",
    "find_face",
    "load_image",
    "prepare_reference",
]

MAX_PIXELS = 50_000_000   # a larger photo is refused (Pillow's decompression-bomb guard sits at 89 M)
MAX_COUNT_SIDE = 1280     # long-side cap of the rescaled image used to count faces
SAME_FACE_IOU = 0.3       # candidates overlapping the main face this much are the same face


class InputError(ValueError):
    """A user-supplied input (image, audio, file) that cannot be used; the message is one line."""


class NoFaceError(InputError):
    """No face was found."""


class ManyFacesError(InputError):
    """More than one face was found."""


@dataclass
class FaceDetection:
    box: Box                      # (x0, y0, x1, y1) in source pixels
    score: float                  # dlib HOG score
    landmarks: np.ndarray         # (68, 2) float32, source pixels
    candidates: list[tuple[Box, float]] = field(default_factory=list)  # every candidate >= min score

    @property
    def side(self) -> float:
        return box_side(self.box)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), upright as it is displayed (EXIF orientation applied).

    Any mode Pillow reads: greyscale (also 16-bit), palette, CMYK; transparency (RGBA, LA, a palette's) is
    composited over white, as a viewer shows it. Raises ``InputError`` (one line) for a missing, empty or
    unreadable file and for a photo over 50 megapixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"cannot read {path} as an image (the file is empty)")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise InputError(f"{path} is {img.width}x{img.height} pixels; at most {MAX_PIXELS // 1_000_000} "
                                 f"megapixels are accepted: downscale it first")
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16-bit greyscale: to 8 bits, not clipped
                img = Image.fromarray((np.asarray(img, np.float64) / max(1, np.asarray(img).max()) * 255)
                                      .round().astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {path} as an image ({reason})") from exc


def as_rgb_uint8(image: np.ndarray, what: str = "the image") -> np.ndarray:
    """Validate and convert to contiguous uint8 RGB (H, W, 3): grey is replicated, alpha dropped."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"{what} must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    elif image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    elif image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"{what} must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if min(image.shape[:2]) < 8:
        raise InputError(f"{what} is too small ({image.shape[1]}x{image.shape[0]} pixels)")
    return np.ascontiguousarray(image)


def find_face(image_rgb: np.ndarray, what: str = "the image", crop: CropConfig | None = None) -> FaceDetection:
    """The one face of an image and its 68 landmarks, with the crop stage's detector settings (`crop`; None:
    the defaults). Raises ``NoFaceError`` / ``ManyFacesError``.

    dlib is not thread-safe: call this from one thread per process.
    """
    cc = crop or CropConfig()
    min_face_score, second_face_ratio = cc.min_face_score, cc.second_face_ratio
    image = as_rgb_uint8(image_rgb, what)
    h, w = image.shape[:2]
    faces = search_faces(image, cc.detect_max_side, cc.min_face_px, min_face_score)
    if not faces:
        raise NoFaceError(f"no face found in {what} (faces from {cc.min_face_px} px across are looked for)")
    box, score = faces[0]
    side = box_side(box)
    # Count faces where a face `second_face_ratio` times this one still measures HOG_MIN_FACE pixels.
    target = HOG_MIN_FACE / max(second_face_ratio, 1e-3)
    count_scale = min(target / max(side, 1.0), MAX_COUNT_SIDE / max(h, w))
    extra = [f for f in detect_scaled(image, count_scale, 0) if f[1] >= min_face_score]
    candidates = sorted(faces + extra, key=lambda f: -f[1])
    others = [f for f in candidates
              if iou(f[0], box) < SAME_FACE_IOU and box_side(f[0]) >= second_face_ratio * side]
    if others:
        o_box, o_score = others[0]
        raise ManyFacesError(
            f"several faces in {what} (another face with score {o_score:.2f}, "
            f"{box_side(o_box) / side:.0%} of the main face's size); use a portrait with one face"
        )
    landmarks = landmarks68(image, box)
    return FaceDetection(box=box, score=float(score), landmarks=landmarks, candidates=candidates)


def prepare_reference(
    image: np.ndarray | str | os.PathLike,
    resolution: int,
    scale: float | None = None,
    what: str | None = None,
    crop: CropConfig | None = None,
) -> dict:
    """Crop a portrait as the crop stage does (`crop`'s detector settings and scale; `scale` overrides the
    latter): see the module docstring for the returned dict."""
    if isinstance(image, (str, os.PathLike)):
        what = what or str(image)
        image = load_image(image)
    what = what or "the image"
    image = as_rgb_uint8(image, what)
    base = crop or CropConfig()
    det = find_face(image, what, base)
    cc = base.model_copy(update={"resolution": int(resolution),
                                 "scale": float(base.scale if scale is None else scale)})
    lm_src = det.landmarks.astype(np.float64)[None]  # (1, 68, 2)
    geo = crop_geometry(lm_src, np.ones(1, dtype=bool), cc)
    crop = crop_frame(image, geo.centres[0], geo.side, cc.resolution)
    landmarks = to_crop(lm_src, geo.centres, geo.side, cc.resolution).astype(np.float32)
    masks = make_masks(landmarks, cc.resolution, INFERENCE_FACE_EXPAND, INFERENCE_LIP_EXPAND)
    return {
        "image": crop,
        "landmarks": landmarks[0],
        "masks": masks,
        "crop_box": tuple(float(v) for v in geo.boxes()[0]),
        "crop_centre": np.asarray(geo.centres[0], np.float64),
        "crop_side": float(geo.side),
        "source_size": (int(image.shape[1]), int(image.shape[0])),
        "score": det.score,
        "source_landmarks": det.landmarks,
    }
