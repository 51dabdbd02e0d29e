"""One home for faces: detection, 68 landmarks, crop geometry, masks and the identity embedding, used alike by
the crop stage (`singer.data.crop`), by generation (`singer.generate`, the training loop's face embeddings) and
by the metrics (`singer.evaluate.metrics`). Offline: dlib (`dlib-bin`) with the weights of
`face_recognition_models` (DESIGN.md section 6).

    detect      dlib's HOG detector, `detect_faces`, detection in a rescaled region, box helpers
    landmarks   the 68-point predictor, `detect_landmarks`, `mouth_opening`, `mouth_width`, `inter_ocular`, landmark groups
    track       following one face through a clip's frames (`track_faces`), `fill_missing`
    crop        crop geometry (`crop_geometry`, `crop_frame`, `to_crop`): "scale 0.8 around the face"
    masks       Hallo's soft full / face / lip masks and the hard face_region box (`make_masks`)
    portrait    one image with one face: `find_face`, `load_image`, `prepare_reference` (crop + masks, as in
                training) and the one-line `InputError` family
    identity    identity embedders (`DlibFaceEmbedder`, `InsightFaceEmbedder`, `make_face_embedder`)

This package imports neither `singer.data` nor `singer.models` (tests/test_architecture.py). dlib is not
thread-safe: use it from one thread per process.
"""

from singer.faces.crop import Geometry, crop_frame, crop_geometry, face_size, to_crop
from singer.faces.detect import Box, box_side, detect_faces, detect_region, detect_scaled, iou, model_dir
from singer.faces.identity import (
    ARCFACE_TEMPLATE,
    DlibFaceEmbedder,
    InsightFaceEmbedder,
    five_points,
    make_face_embedder,
    similarity_transform,
)
from singer.faces.landmarks import detect_landmarks, inter_ocular, landmarks68, mouth_opening, mouth_width
from singer.faces.masks import INFERENCE_FACE_EXPAND, INFERENCE_LIP_EXPAND, face_outline, make_masks
from singer.faces.portrait import (
    FaceDetection,
    InputError,
    ManyFacesError,
    NoFaceError,
    as_rgb_uint8,
    find_face,
    load_image,
    prepare_reference,
)
from singer.faces.track import Track, fill_missing, track_faces

__all__ = [
    "ARCFACE_TEMPLATE",
    "INFERENCE_FACE_EXPAND",
    "INFERENCE_LIP_EXPAND",
    "Box",
    "DlibFaceEmbedder",
    "FaceDetection",
    "Geometry",
    "InputError",
    "InsightFaceEmbedder",
    "ManyFacesError",
    "NoFaceError",
    "Track",
    "as_rgb_uint8",
    "box_side",
    "crop_frame",
    "crop_geometry",
    "detect_faces",
    "detect_landmarks",
    "detect_region",
    "detect_scaled",
    "face_outline",
    "face_size",
    "fill_missing",
    "find_face",
    "five_points",
    "inter_ocular",
    "iou",
    "landmarks68",
    "load_image",
    "make_face_embedder",
    "make_masks",
    "model_dir",
    "mouth_opening",
    "mouth_width",
    "prepare_reference",
    "similarity_transform",
    "to_crop",
    "track_faces",
]
