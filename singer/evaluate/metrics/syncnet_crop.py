"""The face-track crop that LSE-D / LSE-C are computed on, made as syncnet_python makes it.

Published LSE numbers (Wav2Lip's `evaluation/scores_LSE/`, and the papers that use it) come from
joonson/syncnet_python's `run_pipeline.py`, which turns a video into face-track crops before SyncNet sees
it. SyncNet was trained on those crops, so the mouth must sit where they put it. The steps, with the
reference's settings:

1. The video at 25 fps (`ffmpeg -r 25`). Here: `to_25_fps` takes, for output frame k, the input frame
   nearest to time k / 25 (ffmpeg's fps conversion does the same up to its rounding of ties).
2. A face box per frame (S3FD there; dlib's HOG detector here, `detect_boxes`: the one face detector this
   project ships. Its boxes are tighter than S3FD's, so the face fills a little less of the crop than in the
   reference: a difference that remains).
3. A track (`face_track`): consecutive detections joined while the next one is at most 25 frames later
   (`num_failed_det`) and overlaps the last by IoU > 0.5; the boxes of frames in between interpolated
   linearly; kept when longer than `min_track` frames. The reference's `min_track` is 100 (4 s), which would
   reject every 2-s clip of this project: here it is `MIN_TRACK` = 25 frames (1 s, 20 SyncNet windows), and
   it is recorded with the result. The reference also drops tracks whose mean box side is under 100 px; the
   tiny preset's faces are ~50 px, so `min_face_size` defaults to 0 here (also recorded).
4. The crop (`crop_track`): per box, s = max(w, h) / 2 and its centre, each smoothed over the track by a
   13-frame median filter (`scipy.signal.medfilt`, zero-padded at the ends as there); the frame padded with
   grey 110 by int(s (1 + 2 cs)); rows [cy - s, cy + s (1 + 2 cs)), columns [cx - s (1 + cs), cx + s (1 + cs)),
   cs = 0.4 (the crop scale), i.e. from the brows' height to well below the chin, 2.8 s wide; `cv2.resize`
   (bilinear) to 224 x 224.
5. The audio cut to the track: [first / 25, (last + 1) / 25) s.
The reference then writes the crops as an XVID video and reads them back as JPEGs; those two lossy codecs
are not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FPS = 25
CROP_SCALE = 0.4
MEDIAN_KERNEL = 13
PAD_VALUE = 110
MAX_GAP = 25  # the reference's num_failed_det
IOU_THRESHOLD = 0.5
MIN_TRACK = 25  # frames; the reference's 100 would reject a 2-s clip
SIZE = 224


@dataclass(frozen=True)
class FaceTrack:
    """Frames start .. end (inclusive) of the 25 fps video, one box (x0, y0, x1, y1) per frame."""

    start: int
    end: int
    boxes: np.ndarray  # (end - start + 1, 4) float64
    n_detected: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def to_25_fps(n_frames: int, fps: float) -> np.ndarray:
    """Indices of the input frames that make the 25 fps video: for output frame k, the input frame nearest
    to time k / 25. (n_out,) int, n_out = round(n_frames * 25 / fps)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    n_out = max(1, int(round(n_frames * FPS / float(fps))))
    return np.clip(np.floor(np.arange(n_out) * float(fps) / FPS + 0.5).astype(int), 0, n_frames - 1)


def detect_boxes(frames: np.ndarray) -> np.ndarray:
    """The best dlib face box of every (T, H, W, 3) uint8 RGB frame -> (T, 4) float64, NaN rows where none
    is found (searched coarse to fine as for portraits, so small frames are upsampled)."""
    from singer.faces.detect import search_faces

    boxes = np.full((len(frames), 4), np.nan)
    for i, frame in enumerate(frames):
        found = search_faces(np.ascontiguousarray(frame), min_face_px=24)
        if found:
            boxes[i] = found[0][0]
    return boxes


def face_track(boxes: np.ndarray, min_track: int = MIN_TRACK, min_face_size: float = 0.0,
               max_gap: int = MAX_GAP) -> FaceTrack | None:
    """The longest track through per-frame boxes ((T, 4), NaN rows: no face), joined and interpolated as
    the reference joins them; None when no track is longer than `min_track` frames with a mean box side
    above `min_face_size`."""
    from singer.faces.detect import iou

    boxes = np.asarray(boxes, np.float64)
    remaining = [i for i in range(len(boxes)) if np.isfinite(boxes[i]).all()]
    runs: list[list[int]] = []
    while remaining:  # the reference's passes: each takes the first free detection and follows it
        run: list[int] = []
        for i in list(remaining):
            if not run or (i - run[-1] <= max_gap and iou(tuple(boxes[i]), tuple(boxes[run[-1]])) > IOU_THRESHOLD):
                run.append(i)
                remaining.remove(i)
            elif i - run[-1] > max_gap:
                break  # an overlapping but unmatched box is skipped; a gap ends the track
        runs.append(run)
    best = None
    for run in runs:
        frames = np.arange(run[0], run[-1] + 1)
        if len(run) <= min_track:  # the reference counts detections, not the frames they span
            continue
        filled = np.stack([np.interp(frames, run, boxes[run, j]) for j in range(4)], axis=1)
        side = max(np.mean(filled[:, 2] - filled[:, 0]), np.mean(filled[:, 3] - filled[:, 1]))
        if side > min_face_size and (best is None or len(frames) > best.length):
            best = FaceTrack(int(frames[0]), int(frames[-1]), filled, len(run))
    return best


def crop_centres(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(half side s, centre x, centre y) per box, each median-filtered over the track -> 3 x (N,). At the
    track's ends the filter sees zeros, as the reference's `medfilt` does (its window then takes the smaller
    values)."""
    import warnings

    from scipy.signal import medfilt

    boxes = np.asarray(boxes, np.float64)
    s = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    x = (boxes[:, 0] + boxes[:, 2]) / 2
    y = (boxes[:, 1] + boxes[:, 3]) / 2
    with warnings.catch_warnings():  # "kernel_size exceeds volume extent" for a track under 13 frames
        warnings.simplefilter("ignore", UserWarning)
        return tuple(medfilt(v, kernel_size=MEDIAN_KERNEL) for v in (s, x, y))


def crop_track(frames: np.ndarray, boxes: np.ndarray, crop_scale: float = CROP_SCALE,
               size: int = SIZE) -> np.ndarray:
    """The reference's crop of each frame around its (smoothed) box: (N, H, W, 3) uint8 frames of the track
    and their (N, 4) boxes -> (N, size, size, 3) uint8."""
    s, x, y = crop_centres(boxes)
    out = np.empty((len(frames), size, size, 3), np.uint8)
    cs = crop_scale
    for i, frame in enumerate(frames):
        bs = s[i]
        pad = int(bs * (1 + 2 * cs))
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=PAD_VALUE)
        my, mx = y[i] + pad, x[i] + pad
        face = padded[int(my - bs):int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)):int(mx + bs * (1 + cs))]
        out[i] = cv2.resize(face, (size, size))
    return out


__all__ = ["CROP_SCALE", "FaceTrack", "MIN_TRACK", "crop_centres", "crop_track", "detect_boxes", "face_track",
           "to_25_fps"]
