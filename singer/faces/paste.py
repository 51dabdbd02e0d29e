"""Generated face crops -> frames of the whole photo: the face pasted back where it was found.

    ref = prepare_reference(photo, resolution=64)          # the crop the model sees, and where it came from
    paste = PasteBack(photo, ref, feather=0.1, max_side=None)
    paste.size                                              # (width, height) of the video: the photo's, even
    frame = paste(generated_crop)                           # (R, R, 3) uint8 -> (H, W, 3) uint8

How:
1. **Geometry.** The crop is the square of `crop_side` source pixels around `crop_centre`, resized to R²
   (``singer.faces.crop.crop_frame``). Its inverse, scaled to the output size (`max_side`: the long side; None:
   the photo's own size, made even for H.264), is one affine map; ``cv2.warpAffine`` applies it to each
   generated crop, inside the crop's bounding rectangle only (a 1080p frame costs what the face costs).
2. **Mask.** The face, not the square: the convex hull of the 68 landmarks with the brows raised by a third
   of the brow-to-chin height (the forehead the crop also generates), grown by half the feather width, then
   blurred with a Gaussian whose width is `feather` x the crop side, and kept inside the crop square (which
   is itself faded over the same width). Everything outside the square is the photo, byte for byte.
3. **Colour at the seam.** Per frame, the mean colour of the generated crop in the seam band (where the mask
   is between 0.05 and 0.95) is shifted to the photo's mean there, so a generated face whose tone drifts
   does not show its outline. A greyscale photo gets greyscale faces.
4. **Blend.** ``photo * (1 - mask) + face * mask`` (float32, vectorised), rounded to uint8.

The photo's pixels and the mask are computed once; a frame costs one warp and one blend of the crop's box.
"""

from __future__ import annotations

import cv2
import numpy as np

SEAM_BAND = (0.05, 0.95)   # mask values that count as the seam for the colour match
FOREHEAD = 1 / 3           # the brows are raised by this much of the brow-to-chin height


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) of the video: the photo's, or scaled so the long side is `max_side`; both even."""
    scale = 1.0 if max_side is None else float(max_side) / max(width, height)
    w, h = max(2, round(width * scale)), max(2, round(height * scale))
    return w - w % 2, h - h % 2


def face_mask(landmarks: np.ndarray, resolution: int, feather: float) -> np.ndarray:
    """(68, 2) crop-pixel landmarks -> (R, R) float32 in [0, 1]: the face and forehead, feathered, zero at
    the crop's border."""
    width = max(1.0, feather * resolution)
    points = np.asarray(landmarks, np.float64).copy()
    brows, chin = points[17:27], points[8]
    lift = FOREHEAD * max(1.0, chin[1] - brows[:, 1].min())
    top = brows - [0, lift]
    hull = cv2.convexHull(np.concatenate([points, top]).astype(np.float32)).round().astype(np.int32)
    mask = np.zeros((resolution, resolution), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0, lineType=cv2.LINE_AA)
    grow = int(round(width / 2))
    if grow:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=width / 3)
    # fade to zero at the square's edge over the same width, so the warp never shows the crop's border
    ramp = np.clip((np.arange(resolution) + 0.5) / width, 0, 1)
    edge = np.minimum(ramp, ramp[::-1])
    return (mask * np.minimum.outer(edge, edge)).astype(np.float32)


class PasteBack:
    """Generated face crops (R, R, 3) uint8 -> frames of the photo (H, W, 3) uint8 at `size` = (W, H)."""

    def __init__(self, photo: np.ndarray, reference: dict, feather: float = 0.1, max_side: int | None = None):
        photo = np.asarray(photo)
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise ValueError(f"photo must be (H, W, 3) uint8, got {photo.shape} {photo.dtype}")
        src_h, src_w = photo.shape[:2]
        if tuple(reference.get("source_size", (src_w, src_h))) != (src_w, src_h):
            raise ValueError(f"the reference was cropped from a {reference['source_size']} image, not this "
                             f"{src_w}x{src_h} photo")
        self.size = output_size(src_w, src_h, max_side)
        w, h = self.size
        sx, sy = w / src_w, h / src_h
        self.grey = bool(np.array_equal(photo[..., 0], photo[..., 1]) and np.array_equal(photo[..., 1], photo[..., 2]))
        frame = photo if (w, h) == (src_w, src_h) else cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA)
        self.frame = np.ascontiguousarray(frame)

        resolution = int(reference["image"].shape[0])
        centre, side = np.asarray(reference["crop_centre"], np.float64), float(reference["crop_side"])
        # crop pixel u -> source x = (u + 0.5) * side / R + x0 (crop_frame's map inverted), then source x ->
        # output X = (x + 0.5) * s - 0.5 (pixel centres are integers on both sides)
        k = side / resolution
        x0, y0 = centre - side / 2
        to_out = np.float64([[k * sx, 0, (0.5 * k + x0 + 0.5) * sx - 0.5],
                             [0, k * sy, (0.5 * k + y0 + 0.5) * sy - 0.5]])
        corners = np.float64([[-0.5, -0.5, 1], [resolution - 0.5, resolution - 0.5, 1]]) @ to_out.T
        bx0, by0 = np.floor(corners.min(0)).astype(int)
        bx1, by1 = np.ceil(corners.max(0)).astype(int) + 1
        self.box = (max(0, int(bx0)), max(0, int(by0)), min(w, int(bx1)), min(h, int(by1)))  # x0, y0, x1, y1 (output)
        ox, oy = self.box[:2]
        self.warp = to_out - np.float64([[0, 0, ox], [0, 0, oy]])          # into the box
        self.box_wh = (self.box[2] - ox, self.box[3] - oy)
        mask = face_mask(reference["landmarks"], resolution, feather)
        self.mask = self._warp(mask)[..., None]                                # (bh, bw, 1) float32
        self.under = self.frame[oy:self.box[3], ox:self.box[2]].astype(np.float32)
        band = (self.mask[..., 0] > SEAM_BAND[0]) & (self.mask[..., 0] < SEAM_BAND[1])
        self.band = band if band.any() else self.mask[..., 0] > 0
        self.target = self.under[self.band].mean(0) if self.band.any() else np.zeros(3, np.float32)

    def _warp(self, image: np.ndarray) -> np.ndarray:
        flags = cv2.INTER_LINEAR
        return cv2.warpAffine(image, self.warp, self.box_wh, flags=flags, borderMode=cv2.BORDER_REPLICATE)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """(R, R, 3) uint8 generated crop -> (H, W, 3) uint8 frame of the photo."""
        if self.box_wh[0] <= 0 or self.box_wh[1] <= 0:   # the crop lies outside the frame: nothing to paste
            return self.frame.copy()
        face = self._warp(np.ascontiguousarray(crop)).astype(np.float32)
        if self.grey:
            face = np.repeat(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
        if self.band.any():
            face += self.target - face[self.band].mean(0)
        blended = self.under + self.mask * (face - self.under)
        out = self.frame.copy()
        ox, oy, x1, y1 = self.box
        out[oy:y1, ox:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        return out
