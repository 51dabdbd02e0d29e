"""Synthetic singer faces: VARIANTS of a real photo, animated by their 68 landmarks.

The only colour portrait shipped offline is `skimage.data.astronaut()` (one real face). Subject 0 is that
photo, cropped and scaled. Every other subject is a *variant* of it, not a new person: mirrored or not,
its face shape morphed by landmarks toward the geometry of a real face from `skimage.data.lfw_subset()`,
skin tone and clothing hue shifted, background replaced by a procedural one, framed at another scale and
position. All of it is deterministic from (seed, subject).

Animation, per frame (`FaceAnimator.render`):
1. the lower lip and the jaw landmarks move along the face's vertical axis so that the inner-lip gap is
   the asked opening (the photo's own smile is first closed, so opening 0 is a closed mouth), and the lip
   landmarks (48-67) scale along the face's horizontal axis about the mouth's centre by the asked width
   (1 = the photo's own width; rounded vowels narrower, spread ones wider);
2. a piecewise-affine warp over a Delaunay triangulation of the landmarks plus the canvas border carries
   the photo along (one `cv2.remap` per frame, built from a rasterised triangle-index map: `synth_warp`);
3. a global affine (the head pose: roll, and nod/turn rendered as shift and foreshortening about the
   head centre) places the head in the output frame; it is folded into the same remap;
4. the inner-lip polygon is filled dark (the mouth interior).
The landmarks after steps 1 and 3 are exact ground truth for the rendered frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import Delaunay

from singer.data.synth_warp import (
    PiecewiseAffine,
    border_points,
    face_axes,
    signed_areas,
    similarity_fit,
    warp_image,
)
from singer.faces import detect_faces, detect_landmarks

# Share of the lower-lip displacement that each moving landmark follows (the rest stay still).
LIP_JAW_WEIGHTS = {
    65: 1.0,
    66: 1.0,
    67: 1.0,
    60: 0.3,
    64: 0.3,  # inner lower lip, inner corners
    55: 0.8,
    56: 0.97,
    57: 1.0,
    58: 0.97,
    59: 0.8,
    48: 0.3,
    54: 0.3,  # outer lower lip, corners
    8: 0.72,
    7: 0.66,
    9: 0.66,
    6: 0.5,
    10: 0.5,
    5: 0.3,
    11: 0.3,
    4: 0.1,
    12: 0.1,  # jaw
}
MIN_GAP = 0.03  # closed mouth: inner-lip gap in eye distances (keeps the warp non-degenerate)
WIDTH_RANGE = (0.66, 1.25)  # lip widths a variant must render without folding (synth_audio's spreads lie inside)
CANVAS_MARGIN = 0.14  # canvas is this much larger than the frame on each side, room for head motion
MOUTH_COLOUR = (38, 14, 16)


@functools.lru_cache(maxsize=1)
def _astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., :3])


@functools.lru_cache(maxsize=2)
def _astronaut_landmarks(mirrored: bool) -> np.ndarray:
    image = _astronaut()[:, ::-1] if mirrored else _astronaut()
    found = detect_landmarks(np.ascontiguousarray(image), (0,))
    if found is None:
        raise RuntimeError("dlib found no face in skimage.data.astronaut()")
    return found[0]


@functools.lru_cache(maxsize=128)
def _lfw_landmarks(index: int) -> np.ndarray | None:
    """dlib landmarks of face `index` of skimage's LFW subset (25x25 greyscale), upscaled to 100x100."""
    from skimage import data

    faces = data.lfw_subset()
    grey = cv2.resize(
        (faces[index] * 255).round().astype(np.uint8), (100, 100), interpolation=cv2.INTER_CUBIC
    )
    found = detect_landmarks(np.stack([grey] * 3, axis=-1), (0, 1))
    if found is None or found[2] < 0.5:
        return None
    return found[0] / 4.0  # back to the 25x25 photo's pixels (scale is irrelevant after alignment)


# --------------------------------------------------------------------------------------- variants


@dataclass
class FaceVariant:
    """A subject's still portrait on a canvas larger than the output frame, with its dlib landmarks."""

    subject: int
    canvas: np.ndarray  # (C, C, 3) uint8
    landmarks: np.ndarray  # (68, 2) canvas pixels, dlib on the canvas
    work: int  # frame size the canvas is drawn for (>= 256 so dlib sees the face well)
    description: str
    params: dict

    @property
    def offset(self) -> float:
        """Canvas coordinate of the output frame's top-left corner (both axes)."""
        return (self.canvas.shape[0] - self.work) / 2.0


def _skin_mask(lm: np.ndarray, shape: tuple[int, int], blur: float) -> np.ndarray:
    """Soft mask of the face (jaw line closed over a forehead arc) and the neck below it."""
    _across, down, iod = face_axes(lm)
    jaw = lm[0:17]
    top = lm[17:27][::-1] - down * 0.3 * iod
    neck = np.array([lm[4] + down * 1.6 * iod, lm[12] + down * 1.6 * iod])
    poly = np.concatenate([jaw, top])
    mask = np.zeros(shape, np.float32)
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
    neck_poly = np.array([lm[5], lm[11], neck[1], neck[0]])
    cv2.fillPoly(mask, [np.round(neck_poly * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
    return cv2.GaussianBlur(mask, (0, 0), blur)


def _person_mask(lm: np.ndarray, image: np.ndarray, blur: float) -> np.ndarray:
    """Soft mask of head (hair included: an ellipse, less the photo's pale grey backdrop showing inside it)
    and shoulders (a trapezoid down to the bottom)."""
    across, down, iod = face_axes(lm)
    shape = image.shape[:2]
    h, w = shape
    centre = lm[27:36].mean(0) - down * 0.55 * iod
    axes = (round(1.7 * iod), round(2.15 * iod))
    angle = float(np.degrees(np.arctan2(across[1], across[0])))
    mask = np.zeros(shape, np.float32)
    cv2.ellipse(mask, (round(centre[0]), round(centre[1])), axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    rgb = image.astype(np.float32)
    value = rgb.max(axis=2)
    saturation = (value - rgb.min(axis=2)) / np.maximum(value, 1.0)
    backdrop = ((saturation < 0.14) & (value > 150)).astype(np.float32)
    backdrop = cv2.morphologyEx(backdrop, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    yy = np.mgrid[0:h, 0:w][0]
    above_chin = (yy < lm[8][1]).astype(np.float32)
    mask = mask * (1 - backdrop * above_chin * (1 - _skin_mask(lm, shape, 0.05 * iod)))
    chin = lm[8]
    neck_y = chin[1] + 0.5 * iod
    shoulders_y = chin[1] + 1.3 * iod
    torso = np.array(
        [
            [chin[0] - 0.9 * iod, neck_y],
            [chin[0] + 0.9 * iod, neck_y],
            [chin[0] + 3.2 * iod, shoulders_y],
            [chin[0] + 3.6 * iod, h + 10],
            [chin[0] - 3.6 * iod, h + 10],
            [chin[0] - 3.2 * iod, shoulders_y],
        ]
    )
    cv2.fillPoly(mask, [np.round(torso).astype(np.int32)], 1.0, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(mask, (0, 0), blur)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A procedural backdrop: a two-colour gradient with soft out-of-focus blobs or soft stripes."""
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    g = np.clip((np.cos(angle) * xx + np.sin(angle) * yy - 0.5) / 1.2 + 0.5, 0, 1)[..., None]
    img = c0 * (1 - g) + c1 * g
    kind = str(rng.choice(["bokeh", "stripes", "plain"]))
    if kind == "bokeh":
        layer = np.zeros((size, size, 3), np.float32)
        for _ in range(int(rng.integers(6, 14))):
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            radius = int(rng.uniform(0.04, 0.12) * size)
            cv2.circle(
                layer, centre, radius, tuple(float(v) for v in rng.uniform(-70, 70, 3)), -1, cv2.LINE_AA
            )
        img = img + cv2.GaussianBlur(layer, (0, 0), 0.03 * size)
    elif kind == "stripes":
        period = rng.uniform(0.12, 0.3)
        phase = np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy
        img = img * (0.85 + 0.15 * np.sin(2 * np.pi * phase / period))[..., None]
    desc = f"{kind} backdrop, colours {tuple(int(v) for v in c0)}->{tuple(int(v) for v in c1)}"
    return np.clip(img, 0, 255).astype(np.float32), desc


def _hue_rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate hue about the grey axis (keeps luminance roughly), rgb float 0-255."""
    theta = np.radians(degrees)
    c, s = np.cos(theta), np.sin(theta)
    k = 1 / 3
    sq = np.sqrt(1 / 3)
    m = np.array(
        [
            [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
            [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
            [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
        ]
    )
    return rgb @ m.T


SKIN_TONES = {
    "unchanged": (1.0, 1.0, 1.0),
    "lighter": (1.08, 1.06, 1.05),
    "olive": (0.9, 0.86, 0.72),
    "tan": (0.86, 0.74, 0.62),
    "brown": (0.68, 0.54, 0.44),
    "dark brown": (0.5, 0.38, 0.31),
    "rosy": (1.05, 0.9, 0.9),
}


def make_variant(seed: int, subject: int, size: int, max_tries: int = 12) -> FaceVariant:
    """The portrait of `subject`: subject 0 is the astronaut photo itself, framed; others are variants.

    Draws are retried (deterministically) until dlib finds exactly one face on the variant at rest,
    mouth wide open and head turned (see `FaceAnimator.check`)."""
    work = max(int(size), 256)
    for attempt in range(max_tries):
        rng = np.random.default_rng([seed, subject, attempt, 0xFACE])
        variant = _draw_variant(rng, subject, work, base=(subject == 0 and attempt == 0))
        if variant is not None and FaceAnimator(variant).check():
            if attempt:
                variant.description += f" (draw {attempt})"
            return variant
    raise RuntimeError(f"could not draw a detectable variant for subject {subject} (seed {seed})")


def _draw_variant(rng: np.random.Generator, subject: int, work: int, base: bool) -> FaceVariant | None:
    canvas_size = round(work * (1 + 2 * CANVAS_MARGIN) / 2) * 2
    off = (canvas_size - work) / 2
    if base:
        mirrored, face_frac, dx, dy = False, 0.44, 0.0, 0.02
    else:
        mirrored = bool(rng.random() < 0.5)
        face_frac = float(rng.uniform(0.38, 0.5))
        dx, dy = (float(v) for v in rng.uniform(-0.06, 0.06, 2))
    photo = _astronaut()[:, ::-1] if mirrored else _astronaut()
    lm_photo = _astronaut_landmarks(mirrored).astype(np.float64)

    # framing: the face's eye distance is face_frac * 0.42 of the frame; face centre near the middle
    _, _, iod = face_axes(lm_photo)
    scale = face_frac * 0.42 * work / iod
    centre = lm_photo[27:36].mean(0)
    target = np.array([off + work * (0.5 + dx), off + work * (0.5 + dy)])
    frame_m = np.array([[scale, 0, target[0] - scale * centre[0]], [0, scale, target[1] - scale * centre[1]]])
    canvas = cv2.warpAffine(
        photo,
        frame_m,
        (canvas_size, canvas_size),
        flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    lm = lm_photo @ frame_m[:, :2].T + frame_m[:, 2]
    parts = [f"{'mirrored ' if mirrored else ''}skimage.data.astronaut() photo"]
    params: dict = {
        "mirrored": mirrored,
        "face_fraction": round(face_frac, 4),
        "offset": [round(dx, 4), round(dy, 4)],
    }

    if not base:
        # face-shape morph toward a real LFW face's landmark geometry
        lfw_index, lfw = None, None
        for _ in range(20):
            cand = int(rng.integers(0, 100))
            lfw = _lfw_landmarks(cand)
            if lfw is not None:
                lfw_index = cand
                break
        alpha = float(rng.uniform(0.45, 0.8))
        if lfw_index is not None:
            stable = list(range(17, 48))  # brows, nose, eyes: align on these
            m = similarity_fit(lfw[stable], lm[stable])
            full = lfw @ m[:, :2].T + m[:, 2]
            target_lm = lm.copy()
            target_lm[0:36] = lm[0:36] + alpha * (full[0:36] - lm[0:36])  # jaw, brows, nose
            for eye in (slice(36, 42), slice(42, 48)):  # eyes move rigidly (keep their own shape)
                target_lm[eye] = lm[eye] + alpha * (full[eye].mean(0) - lm[eye].mean(0))
            mouth_shift = alpha * (full[48:60].mean(0) - lm[48:60].mean(0))
            width_ratio = (np.linalg.norm(full[54] - full[48]) / np.linalg.norm(lm[54] - lm[48])) ** alpha
            mc = lm[48:68].mean(0)
            target_lm[48:68] = mc + mouth_shift + (lm[48:68] - mc) * [width_ratio, 1.0]
            ctrl_src = np.concatenate([lm, border_points(canvas_size, canvas_size)])
            ctrl_dst = np.concatenate([target_lm, border_points(canvas_size, canvas_size)])
            tris = Delaunay(ctrl_src).simplices
            if np.all(np.sign(signed_areas(ctrl_src, tris)) == np.sign(signed_areas(ctrl_dst, tris))):
                canvas = warp_image(canvas, ctrl_src, ctrl_dst, tris)
                lm = target_lm
                parts.append(f"face shape morphed {alpha:.2f} of the way toward lfw_subset face #{lfw_index}")
                params.update(lfw_face=lfw_index, morph=round(alpha, 4))

        img = canvas.astype(np.float32)
        _, _, iod_c = face_axes(lm)
        skin = _skin_mask(lm, img.shape[:2], 0.12 * iod_c)[..., None]
        person = _person_mask(lm, canvas, 0.1 * iod_c)[..., None]
        tone_name = str(rng.choice(list(SKIN_TONES)))
        tone = np.asarray(SKIN_TONES[tone_name], np.float32)
        img = img * (1 - skin) + (img * tone) * skin
        cloth_hue = float(rng.uniform(-25, 25) if rng.random() < 0.7 else rng.uniform(60, 300))
        brightness = float(rng.uniform(0.45, 1.2))
        img = img * skin + brightness * _hue_rotate(img, cloth_hue) * (1 - skin)
        backdrop, bg_desc = _background(rng, canvas_size)
        img = img * person + backdrop * (1 - person)
        gamma = float(rng.uniform(0.85, 1.15))
        img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** gamma
        canvas = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        parts += [
            f"skin tone {tone_name}",
            f"hair/clothes hue rotated {cloth_hue:.0f} deg, brightness x{brightness:.2f}",
            bg_desc,
            f"gamma {gamma:.2f}",
        ]
        params.update(
            skin_tone=tone_name,
            hue=round(cloth_hue, 2),
            brightness=round(brightness, 4),
            gamma=round(gamma, 4),
            background=bg_desc,
        )
    parts.append(f"face {face_frac:.2f} of the frame, offset ({dx:+.2f}, {dy:+.2f})")

    # the landmarks the animation starts from are dlib's on the variant itself
    view = canvas[int(off) : int(off) + work, int(off) : int(off) + work]
    faces = [f for f in detect_faces(view, 0) if f[1] > 0]
    if len(faces) != 1:
        return None
    found = detect_landmarks(np.ascontiguousarray(view), (0,))
    if found is None:
        return None
    lm_final = found[0].astype(np.float64) + off
    kind = "base photo" if base else "variant"
    return FaceVariant(subject, canvas, lm_final, work, f"{kind}: " + ", ".join(parts), params)


# --------------------------------------------------------------------------------------- animation


@dataclass(frozen=True)
class Pose:
    pitch: float  # degrees, positive = nodding down
    yaw: float  # degrees, positive = turning toward the image's right
    roll: float  # degrees, positive = tilting clockwise in the image


class FaceAnimator:
    """Renders a variant with a given mouth opening and head pose at the output size."""

    def __init__(self, variant: FaceVariant, size: int | None = None):
        self.variant = variant
        self.size = int(size or variant.work)
        lm = variant.landmarks
        c = variant.canvas.shape[0]
        self.across, self.down, self.iod = face_axes(lm)
        self.borders = border_points(c, c, per_side=6)
        self.src = np.concatenate([lm, self.borders])
        self.triangles = Delaunay(self.src).simplices
        self.warper = PiecewiseAffine(self.triangles, (c, c))
        self.weights = np.zeros(len(self.src))
        for k, w in LIP_JAW_WEIGHTS.items():
            self.weights[k] = w
        # the photo's own inner-lip gap along the face's vertical axis
        self.gap0 = float(
            np.mean([np.dot(lm[b] - lm[a], self.down) for a, b in ((61, 67), (62, 66), (63, 65))])
        )
        self.head_centre = lm[27:36].mean(0) - self.down * 0.2 * self.iod
        self.head_radius = 2.0 * self.iod
        ratio = variant.work / self.size
        self.image = variant.canvas
        if ratio > 1.01:  # anti-alias before sampling a smaller frame
            self.image = cv2.GaussianBlur(variant.canvas, (0, 0), 0.45 * ratio)
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float64)
        self.out_grid = np.stack([xx, yy], axis=-1)

    def landmarks_at(self, opening: float, width: float = 1.0) -> np.ndarray:
        """Canvas landmarks (68, 2) with the inner-lip gap set to `opening` eye distances and the lips (48-67)
        `width` times their rest width along the face's horizontal axis."""
        d = max(opening, MIN_GAP) * self.iod - self.gap0
        lm = self.variant.landmarks + self.weights[:68, None] * d * self.down
        if width != 1.0:
            lips = lm[48:68]
            centre = 0.5 * (lips[0] + lips[6])  # between the outer corners 48 and 54
            along = (lips - centre) @ self.across
            lm[48:68] = lips + (width - 1.0) * along[:, None] * self.across
        return lm

    def pose_matrix(self, pose: Pose) -> np.ndarray:
        """2x3 affine from canvas pixels to output pixels."""
        v = self.variant
        k = self.size / v.work
        r = np.radians(pose.roll)
        rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
        fore = np.diag([np.cos(np.radians(pose.yaw)), np.cos(np.radians(pose.pitch))])
        shift = self.head_radius * np.array([np.sin(np.radians(pose.yaw)), np.sin(np.radians(pose.pitch))])
        lin = k * rot @ fore
        c = self.head_centre
        t = k * (c - v.offset + shift) - lin @ c
        return np.concatenate([lin, t[:, None]], axis=1)

    def render(self, opening: float, pose: Pose, width: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """-> (frame (size, size, 3) uint8, landmarks (68, 2) in output pixels)."""
        lm = self.landmarks_at(opening, width)
        dst = np.concatenate([lm, self.borders])
        g = self.pose_matrix(pose)
        g_inv = cv2.invertAffineTransform(g)
        query = self.out_grid @ g_inv[:, :2].T + g_inv[:, 2]
        coords = self.warper.maps(self.src, dst, query).astype(np.float32)
        frame = cv2.remap(
            self.image, coords[..., 0], coords[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        out_lm = lm @ g[:, :2].T + g[:, 2]
        inner = np.round(out_lm[60:68] * 16).astype(np.int32)
        cv2.fillPoly(frame, [inner], MOUTH_COLOUR, lineType=cv2.LINE_AA, shift=4)
        return frame, out_lm.astype(np.float32)

    def folds(self, opening: float, width: float = 1.0) -> bool:
        """True when the warp at this opening and width would flip a triangle (it must not, up to wide open)."""
        dst = np.concatenate([self.landmarks_at(opening, width), self.borders])
        a0, a1 = signed_areas(self.src, self.triangles), signed_areas(dst, self.triangles)
        return bool(np.any(np.sign(a0) != np.sign(a1)))

    def check(self) -> bool:
        """dlib finds exactly one face (score > 0) when closed, wide open, and with the head turned."""
        if any(self.folds(opening, width) for opening in (0.0, 0.7) for width in (1.0, *WIDTH_RANGE)):
            return False
        for opening, pose in ((0.0, Pose(0, 0, 0)), (0.6, Pose(6, 5, 4)), (0.3, Pose(-3, -5, -4))):
            frame, _ = self.render(opening, pose)
            if len([f for f in detect_faces(frame, 0) if f[1] > 0]) != 1:
                return False
        return True
