"""Face identity embeddings of a reference face (computed once per clip, outside the training graph).

    embedder = make_face_embedder(cfg.model)              # DlibFaceEmbedder (128-d) or InsightFaceEmbedder (512-d)
    emb = embedder.embed(reference_rgb)                   # (D,) float32; NoFaceError / ManyFacesError
    emb = embedder.embed(crop_rgb, landmarks=lm68)        # skip detection when the 68 landmarks are known

The trainable projection of an embedding to cross-attention tokens is ``singer.models.face.FaceEncoder``.

Embedders
---------
* ``DlibFaceEmbedder`` (offline default): dlib's ResNet (``dlib_face_recognition_resnet_model_v1.dat`` from
  ``face_recognition_models``) on a 150 px chip aligned by dlib from the 68 landmarks (``compute_face_descriptor``,
  padding 0.25). Faces smaller than 150 px (the 64^2 crops of the tiny preset hold a ~50 px face) are upsampled
  (bicubic, by an integer factor) before the landmarks are fitted and the chip is cut, so they are aligned with
  sub-pixel precision. The face is found as ``singer.faces.portrait.find_face`` finds it (judged by score and
  size). Two photos of one person are usually within Euclidean distance 0.6 (dlib's threshold); the vectors are
  not centred, so cosine similarity between different people is high too: compare distances.
* ``InsightFaceEmbedder(onnx_path)``: an ArcFace-style ONNX model (e.g. InsightFace's ``glintr100.onnx``, as Hallo).
  Five points from dlib's 68 (image-left eye centre 36-41, image-right eye centre 42-47, nose tip 30, mouth
  corners 48 and 54: InsightFace's order) are mapped to the standard 112x112 ArcFace template by the
  least-squares similarity transform (Umeyama, what InsightFace's ``norm_crop`` computes with scikit-image's
  ``SimilarityTransform``), the chip is warped with ``cv2.warpAffine``, fed as RGB ``(x - 127.5) / 127.5`` NCHW
  (InsightFace's ``blobFromImages(..., swapRB=True)`` on a BGR chip), or raw 0-255 when the graph normalises
  itself (InsightFace's test: its first nodes are ``Sub`` and ``Mul``; needs the ``onnx`` package to look).
  ``normalize`` (default **False**): Hallo feeds the raw ``face["embedding"]`` (not ``normed_embedding``) to its
  image projection, so converted Hallo weights expect unnormalised vectors; ``normalize=True`` L2-normalises.

dlib is not thread-safe: embed from one thread per process (the data loader's worker processes are fine).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from singer.config import CropConfig
from singer.faces.detect import model_dir
from singer.faces.landmarks import landmarks68 as fit_landmarks68
from singer.faces.portrait import FaceDetection, as_rgb_uint8, find_face

__all__ = [
    "ARCFACE_TEMPLATE",
    "CHIP_FACE_PX",
    "DlibFaceEmbedder",
    "InsightFaceEmbedder",
    "five_points",
    "make_face_embedder",
    "similarity_transform",
]

# InsightFace's arcface_dst: left eye, right eye, nose tip, left and right mouth corners (image left/right).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
CHIP_FACE_PX = 150  # dlib's chip size: smaller faces are upsampled to at least this


# --------------------------------------------------------------------------------------------- geometry
def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """dlib 68 points -> InsightFace's 5 (5, 2): image-left eye, image-right eye, nose tip, mouth corners."""
    lm = np.asarray(landmarks68, np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be (68, 2), got {lm.shape}")
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src (N, 2) onto dst (N, 2), as
    a 2x3 matrix (Umeyama 1991; what scikit-image's SimilarityTransform.estimate returns)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    var_s = (s ** 2).sum() / len(src)
    scale = (sig * sign).sum() / var_s if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


# --------------------------------------------------------------------------------------------- dlib
@functools.lru_cache(maxsize=1)
def _dlib_recognizer():
    import dlib

    return dlib.face_recognition_model_v1(str(model_dir() / "dlib_face_recognition_resnet_model_v1.dat"))


def _detector(min_face_score: float, second_face_ratio: float) -> CropConfig:
    """The crop stage's detector settings with an embedder's own score and second-face thresholds."""
    return CropConfig(min_face_score=min_face_score, second_face_ratio=second_face_ratio)


class DlibFaceEmbedder:
    """dlib's 128-d face descriptor (offline). ``embed(image_rgb uint8 (H, W, 3)) -> (128,) float32``."""

    dim = 128
    name = "dlib"

    def __init__(self, num_jitters: int = 0, padding: float = 0.25, min_face_score: float = 0.3,
                 second_face_ratio: float = 0.5):
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        self.min_face_score = float(min_face_score)
        self.second_face_ratio = float(second_face_ratio)

    def detect(self, image_rgb: np.ndarray, what: str = "the image") -> FaceDetection:
        return find_face(image_rgb, what, _detector(self.min_face_score, self.second_face_ratio))

    def embed(self, image_rgb: np.ndarray, landmarks: np.ndarray | None = None, what: str = "the image") -> np.ndarray:
        """The descriptor of the one face in the image (or of the face at the given (68, 2) landmarks)."""
        import dlib

        image = as_rgb_uint8(image_rgb, what)
        if landmarks is None:
            det = self.detect(image, what)
            box, lm = det.box, det.landmarks
        else:
            lm = np.asarray(landmarks, np.float64)
            if lm.shape != (68, 2) or not np.isfinite(lm).all():
                raise ValueError(f"landmarks must be finite (68, 2), got shape {lm.shape}")
            box = (*lm.min(0), *lm.max(0))
        side = max(box[2] - box[0], box[3] - box[1], 1.0)
        k = max(1, math.ceil(CHIP_FACE_PX / side))
        if k > 1:
            h, w = image.shape[:2]
            image = cv2.resize(image, (w * k, h * k), interpolation=cv2.INTER_CUBIC)
            up = tuple((v + 0.5) * k - 0.5 for v in box)
            # without given landmarks, refit them on the sharper, larger face
            lm = fit_landmarks68(image, up) if landmarks is None else (lm + 0.5) * k - 0.5
        pts = np.round(np.asarray(lm)).astype(int)
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        shape = dlib.full_object_detection(
            dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), [dlib.point(int(x), int(y)) for x, y in pts]
        )
        desc = _dlib_recognizer().compute_face_descriptor(image, shape, self.num_jitters, self.padding)
        return np.asarray(desc, dtype=np.float32)


# --------------------------------------------------------------------------------------------- insightface
def _graph_normalises_itself(path: Path) -> bool:
    """InsightFace's ArcFaceONNX test: the first 8 nodes include a Sub and a Mul (mxnet-converted models)."""
    try:
        import onnx
    except ImportError:
        return False
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [n.name for n in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


class InsightFaceEmbedder:
    """An ArcFace ONNX recognition model run with onnxruntime. ``embed(image_rgb) -> (dim,) float32``."""

    name = "insightface"

    def __init__(self, onnx_path: str | os.PathLike, normalize: bool = False, input_mean: float | None = None,
                 input_std: float | None = None, providers: list[str] | None = None,
                 min_face_score: float = 0.3, second_face_ratio: float = 0.5):
        path = Path(onnx_path) if onnx_path else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"InsightFace recognition model not found: {onnx_path} "
                "(model.face_encoder_path: e.g. pretrained_models/face_analysis/models/glintr100.onnx)"
            )
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("InsightFaceEmbedder needs onnxruntime (pip install onnxruntime)") from exc
        self.path = path
        self.normalize = bool(normalize)
        self.min_face_score = float(min_face_score)
        self.second_face_ratio = float(second_face_ratio)
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        h, w = (inp.shape[2:4] if len(inp.shape) == 4 else (None, None))
        self.input_size = int(h) if isinstance(h, int) else 112
        if self.input_size % 112 != 0 or (isinstance(w, int) and w != h):
            raise ValueError(f"{path}: expected a square input of a multiple of 112 pixels, got {inp.shape}")
        self.output_name = self.session.get_outputs()[0].name
        self.dim = int(self.session.get_outputs()[0].shape[-1]) if isinstance(
            self.session.get_outputs()[0].shape[-1], int) else None
        if input_mean is None or input_std is None:
            raw = _graph_normalises_itself(path)
            input_mean = 0.0 if raw else 127.5
            input_std = 1.0 if raw else 127.5
        self.input_mean, self.input_std = float(input_mean), float(input_std)

    def align(self, image_rgb: np.ndarray, landmarks68: np.ndarray) -> np.ndarray:
        """The ArcFace chip (input_size, input_size, 3) uint8 RGB."""
        size = self.input_size
        m = similarity_transform(five_points(landmarks68), ARCFACE_TEMPLATE * (size / 112.0))
        return cv2.warpAffine(image_rgb, m, (size, size), borderValue=0.0)

    def embed_chip(self, chip_rgb: np.ndarray) -> np.ndarray:
        blob = (chip_rgb.astype(np.float32) - self.input_mean) / self.input_std
        blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
        out = np.asarray(self.session.run([self.output_name], {self.input_name: blob})[0], np.float32).reshape(-1)
        if self.normalize:
            out = out / max(float(np.linalg.norm(out)), 1e-12)
        return out

    def embed(self, image_rgb: np.ndarray, landmarks: np.ndarray | None = None, what: str = "the image") -> np.ndarray:
        image = as_rgb_uint8(image_rgb, what)
        if landmarks is None:
            landmarks = find_face(image, what, _detector(self.min_face_score, self.second_face_ratio)).landmarks
        return self.embed_chip(self.align(image, landmarks))


def make_face_embedder(model_cfg: Any) -> DlibFaceEmbedder | InsightFaceEmbedder:
    """``model.face_encoder``: "dlib" (128-d) or "insightface" (``face_encoder_path``); checks ``face_embed_dim``."""
    kind = str(model_cfg.face_encoder).lower()
    if kind == "dlib":
        embedder: DlibFaceEmbedder | InsightFaceEmbedder = DlibFaceEmbedder()
    elif kind == "insightface":
        embedder = InsightFaceEmbedder(model_cfg.face_encoder_path)
    else:
        raise ValueError(f"unknown model.face_encoder {model_cfg.face_encoder!r} (dlib | insightface)")
    if embedder.dim is not None and embedder.dim != model_cfg.face_embed_dim:
        raise ValueError(
            f"the {kind} face embedder gives {embedder.dim}-d vectors but model.face_embed_dim is "
            f"{model_cfg.face_embed_dim}"
        )
    return embedder
