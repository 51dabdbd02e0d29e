"""Face identity (dlib / InsightFace-style ONNX embedders, the token projection) and a user's portrait -> crop."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from factories import CHECKPOINT_MANIFESTS
from skimage import data

from singer.config import load_config
from singer.faces import (
    ARCFACE_TEMPLATE,
    DlibFaceEmbedder,
    InputError,
    InsightFaceEmbedder,
    ManyFacesError,
    NoFaceError,
    find_face,
    five_points,
    load_image,
    make_face_embedder,
    prepare_reference,
    similarity_transform,
)
from singer.models.face import FaceEncoder

MANIFESTS = CHECKPOINT_MANIFESTS


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def dlib_embedder():
    return DlibFaceEmbedder()


@pytest.fixture(scope="module")
def astronaut_embedding(dlib_embedder, astronaut):
    return dlib_embedder.embed(astronaut)


def _shift(image, dx, dy):
    h, w = image.shape[:2]
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------- FaceEncoder
def test_face_encoder_tiny_shapes():
    cfg = load_config("params.yaml", preset="tiny").model
    enc = FaceEncoder.from_model_config(cfg)
    out = enc(torch.randn(3, cfg.face_embed_dim))
    assert out.shape == (3, cfg.face_tokens, cfg.cross_attention_dim) == (3, 4, 64)
    assert torch.allclose(out.mean(-1), torch.zeros(3, 4), atol=1e-5)
    with pytest.raises(ValueError, match="face embedding"):
        enc(torch.randn(3, 512))


def test_face_encoder_paper_shapes_match_hallo_manifest(tmp_path):
    manifest = json.loads((MANIFESTS / "hallo_net.pth.imageproj.json").read_text())["params"]
    cfg = load_config("params.yaml", preset="paper").model
    enc = FaceEncoder.from_model_config(cfg)
    shapes = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert shapes == manifest and list(shapes) == list(manifest)
    assert enc(torch.randn(1, 512)).shape == (1, 4, 768)
    enc.save_pretrained(tmp_path / "face")
    again = FaceEncoder.from_pretrained(tmp_path / "face")
    x = torch.randn(2, 512)
    assert torch.equal(again(x), enc(x))


# ----------------------------------------------------------------------------------------- dlib
def test_dlib_embedding_is_stable_under_small_shifts(dlib_embedder, astronaut, astronaut_embedding):
    v0 = astronaut_embedding
    assert v0.shape == (128,) and v0.dtype == np.float32 and np.isfinite(v0).all()
    for dx, dy in [(3, 1), (-5, 4), (8, -6)]:
        v = dlib_embedder.embed(_shift(astronaut, dx, dy))
        assert _cos(v0, v) > 0.9
        assert np.linalg.norm(v - v0) < 0.3  # dlib: the same person is within 0.6


def test_dlib_embedding_of_the_small_crop_matches(dlib_embedder, astronaut, astronaut_embedding):
    ref = prepare_reference(astronaut, 64)
    found = dlib_embedder.embed(ref["image"])
    given = dlib_embedder.embed(ref["image"], landmarks=ref["landmarks"])
    for v in (found, given):
        assert _cos(astronaut_embedding, v) > 0.9
        assert np.linalg.norm(v - astronaut_embedding) < 0.4


def test_dlib_embedding_differs_for_other_people(dlib_embedder, astronaut_embedding):
    faces = data.lfw_subset()[:8]  # 25x25 greyscale faces of other people
    distances = []
    for face in faces:
        image = cv2.resize((face * 255).round().astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC)
        try:
            v = dlib_embedder.embed(image)
        except NoFaceError:
            continue
        distances.append(float(np.linalg.norm(v - astronaut_embedding)))
    assert len(distances) >= 4
    assert min(distances) > 0.6, distances


def test_dlib_errors(dlib_embedder, astronaut):
    with pytest.raises(NoFaceError, match="no face found in the image"):
        dlib_embedder.embed(np.full((128, 128, 3), 127, np.uint8))
    with pytest.raises(ManyFacesError):
        dlib_embedder.embed(np.concatenate([astronaut, astronaut], axis=1))
    with pytest.raises(InputError, match="uint8"):
        dlib_embedder.embed(astronaut.astype(np.float32))


def test_make_face_embedder(tmp_path):
    tiny = load_config("params.yaml", preset="tiny").model
    assert isinstance(make_face_embedder(tiny), DlibFaceEmbedder)
    with pytest.raises(ValueError, match="face_embed_dim"):
        make_face_embedder(tiny.model_copy(update={"face_embed_dim": 512}))
    paper = load_config("params.yaml", preset="paper").model.model_copy(
        update={"face_encoder_path": str(tmp_path / "glintr100.onnx")})
    with pytest.raises(FileNotFoundError) as err:
        make_face_embedder(paper)
    assert "glintr100.onnx" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown"):
        make_face_embedder(tiny.model_copy(update={"face_encoder": "mediapipe"}))


# ----------------------------------------------------------------------------------------- InsightFace
def _tiny_arcface(path: Path, sub_mul_first: bool = False, seed: int = 0):
    """Conv1x1(3->8) -> GlobalAveragePool -> Flatten -> MatMul(8x512): 1x3x112x112 -> 1x512."""
    import onnx  # the dev extra: it builds the test model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(size=(8, 3, 1, 1)).astype(np.float32)
    mat = rng.normal(size=(8, 512)).astype(np.float32)
    inits = [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(mat, "mat")]
    nodes, source = [], "input.1"
    if sub_mul_first:  # an mxnet-converted model normalises inside the graph
        inits += [numpy_helper.from_array(np.float32(127.5), "mean"), numpy_helper.from_array(np.float32(1 / 127.5), "scale")]
        nodes += [helper.make_node("Sub", [source, "mean"], ["sub"], name="Sub_0"),
                  helper.make_node("Mul", ["sub", "scale"], ["mul"], name="Mul_1")]
        source = "mul"
    nodes += [
        helper.make_node("Conv", [source, "conv_w"], ["c"], name="Conv_2"),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="GAP_3"),
        helper.make_node("Flatten", ["g"], ["f"], name="Flatten_4"),
        helper.make_node("MatMul", ["f", "mat"], ["683"], name="MatMul_5"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return conv_w[:, :, 0, 0], mat


def test_insightface_embedder_with_a_tiny_onnx_model(tmp_path, astronaut):
    conv_w, mat = _tiny_arcface(tmp_path / "arc.onnx")
    emb = InsightFaceEmbedder(tmp_path / "arc.onnx")
    assert (emb.input_size, emb.dim, emb.input_mean, emb.input_std) == (112, 512, 127.5, 127.5)
    det = find_face(astronaut)
    chip = emb.align(astronaut, det.landmarks)
    assert chip.shape == (112, 112, 3) and chip.dtype == np.uint8
    v = emb.embed(astronaut)
    assert v.shape == (512,) and v.dtype == np.float32
    # The model saw RGB, (x - 127.5) / 127.5, NCHW: recompute the graph in numpy.
    blob = (chip.astype(np.float64) - 127.5) / 127.5
    expected = (conv_w @ blob.reshape(-1, 3).mean(0)) @ mat
    assert np.allclose(v, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(v, (conv_w @ blob[..., ::-1].reshape(-1, 3).mean(0)) @ mat, rtol=1e-3)
    # Raw by default (Hallo feeds face["embedding"]); normalize=True gives a unit vector in the same direction.
    unit = InsightFaceEmbedder(tmp_path / "arc.onnx", normalize=True).embed(astronaut)
    assert np.isclose(np.linalg.norm(unit), 1.0, atol=1e-5)
    assert np.allclose(unit, v / np.linalg.norm(v), atol=1e-5)


def test_insightface_graph_that_normalises_itself_gets_raw_pixels(tmp_path, astronaut):
    _tiny_arcface(tmp_path / "mx.onnx", sub_mul_first=True)
    _tiny_arcface(tmp_path / "plain.onnx")
    mx = InsightFaceEmbedder(tmp_path / "mx.onnx")
    assert (mx.input_mean, mx.input_std) == (0.0, 1.0)
    # Same weights, normalisation inside vs outside the graph: same embedding.
    assert np.allclose(mx.embed(astronaut), InsightFaceEmbedder(tmp_path / "plain.onnx").embed(astronaut), atol=1e-4)


def test_insightface_alignment_puts_the_five_points_on_the_template(astronaut):
    lm = find_face(astronaut).landmarks
    pts = five_points(lm)
    assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # image-left eye / mouth corner first
    m = similarity_transform(pts, ARCFACE_TEMPLATE)
    mapped = pts @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 6.0  # a real face is close to the mean template
    # Same as scikit-image's SimilarityTransform (what InsightFace uses), and exact on a similar copy.
    from skimage.transform import SimilarityTransform

    ref = SimilarityTransform.from_estimate(pts, ARCFACE_TEMPLATE)
    assert np.allclose(m, np.asarray(ref.params)[:2], atol=1e-8)
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert np.allclose(similarity_transform(pts, pts @ rot.T + shift), np.c_[rot, shift], atol=1e-8)


def test_insightface_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        InsightFaceEmbedder(tmp_path / "missing.onnx")
    assert "missing.onnx" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        InsightFaceEmbedder(None)


# ----------------------------------------------------------------------------------------- reference
def test_prepare_reference_on_the_astronaut(astronaut):
    ref = prepare_reference(astronaut, 64)
    image, lm, masks = ref["image"], ref["landmarks"], ref["masks"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    assert (lm >= 0).all() and (lm <= 63).all()
    # Hallo's masks (singer.faces.masks; tests/test_hallo_semantics.py checks the rule): soft full / face / lip,
    # the hard face box
    assert set(masks) == {"full", "face", "lip", "face_region"}
    for k in ("full", "face", "lip"):
        assert masks[k].shape == (64, 64) and masks[k].dtype == np.float32
        assert masks[k].min() >= 0 and masks[k].max() <= 1
    region = masks["face_region"]
    assert region.shape == (64, 64) and region.dtype == np.uint8 and set(np.unique(region)) == {0, 1}
    mouth = np.round(lm[48:60].mean(0)).astype(int)
    assert masks["lip"][mouth[1], mouth[0]] > 0.9 and masks["face"][mouth[1], mouth[0]] < 0.1
    assert region[np.round(lm[:, 1]).astype(int), np.round(lm[:, 0]).astype(int)].all()  # the box holds the face
    # The face spans `scale` of the crop (landmark extent / side), as in the crop stage.
    extent = (lm.max(0) - lm.min(0)).max()
    assert abs(extent / 64 - 0.8) < 0.02
    # Cropping the crop again finds the same face at the same place.
    again = prepare_reference(image, 64)
    assert np.abs(again["landmarks"] - lm).mean() < 1.0


def test_prepare_reference_matches_the_crop_stage_geometry(astronaut):
    """Same crop as crop_geometry / crop_frame / to_crop on a one-frame track."""
    from singer.config import CropConfig
    from singer.faces import crop_frame, crop_geometry, to_crop

    ref = prepare_reference(astronaut, 96, scale=0.7)
    src = ref["source_landmarks"].astype(np.float64)[None]
    geo = crop_geometry(src, np.ones(1, bool), CropConfig(resolution=96, scale=0.7))
    assert np.array_equal(ref["image"], crop_frame(astronaut, geo.centres[0], geo.side, 96))
    assert np.allclose(ref["landmarks"], to_crop(src, geo.centres, geo.side, 96)[0], atol=1e-4)


def test_prepare_reference_errors(astronaut, tmp_path):
    with pytest.raises(ManyFacesError, match="several faces"):
        prepare_reference(np.concatenate([astronaut, astronaut], axis=1), 64)
    with pytest.raises(NoFaceError, match="no face found in the image"):
        prepare_reference(np.zeros((200, 300, 3), np.uint8), 64)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(InputError) as err:
        prepare_reference(text, 64)
    assert "notes.txt" in str(err.value) and "\n" not in str(err.value)
    assert not isinstance(err.value, (NoFaceError, ManyFacesError))
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 120, 3), 200, np.uint8))
    with pytest.raises(NoFaceError, match="blank.png"):
        prepare_reference(blank, 64)
    assert issubclass(NoFaceError, InputError) and issubclass(InputError, ValueError)


def test_load_image_reads_rgb_and_grey(astronaut, tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    assert np.array_equal(load_image(path), astronaut)
    grey = tmp_path / "g.png"
    cv2.imwrite(str(grey), astronaut[..., 0])
    img = load_image(grey)
    assert img.shape == (512, 512, 3) and np.array_equal(img[..., 2], astronaut[..., 0])
