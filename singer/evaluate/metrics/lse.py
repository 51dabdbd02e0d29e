"""LSE-D and LSE-C: lip-sync error distance and confidence with SyncNet (syncnet_python's evaluation).

Reference (joonson/syncnet_python `run_pipeline.py` for the input, `SyncNetInstance.evaluate` for the
scores, as used by Wav2Lip's LSE scripts):

- video at 25 fps (another rate is converted, nearest frame), then the face-track crop of `run_pipeline.py`
  (`singer.evaluate.metrics.syncnet_crop`: a track of face boxes, median-smoothed, rows from the box centre
  - s to + 1.8 s, columns +- 1.4 s, grey 110 padding, 224x224), and the audio cut to the track; the crops as
  raw 0-255 float BGR values (`cv2.imread`): here frames are given RGB (project convention) and flipped;
- audio 16 kHz mono, int16 scale (`scipy.io.wavfile.read` of a pcm_s16le wav); MFCC by
  python_speech_features defaults (25 ms frames, 10 ms step, 26 mel filters, 512-point FFT,
  pre-emphasis 0.97, lifter 22, c0 replaced by the log frame energy, no window), 13 coefficients at
  100 Hz. `psf_mfcc` re-implements that function exactly in numpy/scipy (the package is not installed;
  the code follows its public source line by line: same framing with zero padding of the last frame,
  same filterbank rounding). Float audio in [-1, 1] is scaled by 32768 and rounded like ffmpeg's
  s16 conversion; other sample rates are resampled with librosa (the reference lets ffmpeg resample:
  a small difference);
- min_length = min(#frames, floor(#samples / 640)); windows at video frames i = 0 .. min_length - 6
  (the reference's `range(0, min_length - 5)`): frames i..i+4 against MFCC frames 4i..4i+19;
- both embedded to 1024-d; the audio features zero-padded by `vshift` = 15 at each end;
  dists[i, j] = ||v_i - a_{i + j - vshift}||, j = 0 .. 2 vshift; mdist = mean over i;
  LSE-D = min(mdist), LSE-C = median(mdist) - min(mdist), AV offset = vshift - argmin(mdist)
  (positive: video frame i matches audio frame i - offset).

Weights are the user's `syncnet_v2.model` (`SINGER_SYNCNET_PATH` or an argument); without them both
metrics are "unavailable" with the reason. The details record the track (frames, detections), the
`min_track` and `min_face_size` used, the input fps and the face detector.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dct

from singer.evaluate.metrics import syncnet_crop
from singer.evaluate.metrics.base import MetricResult, as_video
from singer.evaluate.networks.i3d import WeightsUnavailable
from singer.evaluate.networks.syncnet import ENV_VAR, SyncNet, load_syncnet

FPS = 25
SAMPLE_RATE = 16000
VSHIFT = 15
WINDOW = 5  # video frames per SyncNet window
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
MFCC_WINDOW = 20
SIZE = 224


# --------------------------------------------------------------------------- MFCC (python_speech_features)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _hz2mel(hz):
    return 2595 * np.log10(1 + np.asarray(hz, np.float64) / 700.0)


def _mel2hz(mel):
    return 700 * (10 ** (np.asarray(mel, np.float64) / 2595.0) - 1)


def psf_filterbanks(
    nfilt: int = 26, nfft: int = 512, samplerate: int = 16000, lowfreq: float = 0, highfreq=None
) -> np.ndarray:
    """python_speech_features.get_filterbanks: triangular mel filters on FFT bins (nfilt, nfft//2+1)."""
    highfreq = highfreq or samplerate / 2
    melpoints = np.linspace(_hz2mel(lowfreq), _hz2mel(highfreq), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel2hz(melpoints) / samplerate)
    fbank = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(int(bins[j]), int(bins[j + 1])):
            fbank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(int(bins[j + 1]), int(bins[j + 2])):
            fbank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    return fbank


def psf_mfcc(
    signal: np.ndarray,
    samplerate: int = 16000,
    winlen: float = 0.025,
    winstep: float = 0.01,
    numcep: int = 13,
    nfilt: int = 26,
    nfft: int = 512,
    preemph: float = 0.97,
    ceplifter: int = 22,
) -> np.ndarray:
    """python_speech_features.mfcc with its defaults (appendEnergy, rectangular window) -> (frames, numcep)."""
    sig = np.asarray(signal, np.float64).reshape(-1)
    sig = np.append(sig[0], sig[1:] - preemph * sig[:-1])
    frame_len, frame_step = _round_half_up(winlen * samplerate), _round_half_up(winstep * samplerate)
    slen = len(sig)
    numframes = 1 if slen <= frame_len else 1 + int(math.ceil((slen - frame_len) / frame_step))
    padlen = (numframes - 1) * frame_step + frame_len
    padded = np.concatenate([sig, np.zeros(padlen - slen)])
    idx = np.arange(frame_len)[None, :] + (np.arange(numframes) * frame_step)[:, None]
    frames = padded[idx]
    pspec = np.square(np.abs(np.fft.rfft(frames, nfft))) / nfft
    eps = np.finfo(float).eps
    energy = pspec.sum(1)
    energy = np.where(energy == 0, eps, energy)
    feat = pspec @ psf_filterbanks(nfilt, nfft, samplerate).T
    feat = np.where(feat == 0, eps, feat)
    feat = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :numcep]
    if ceplifter > 0:
        feat = feat * (1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter))
    feat[:, 0] = np.log(energy)
    return feat


def audio_to_int16_scale(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono 16 kHz samples on the int16 scale the reference reads from its wav (float64 array)."""
    a = np.asarray(audio)
    if a.ndim == 2:  # (S, C) or (C, S) -> mono
        a = a.mean(axis=int(np.argmin(a.shape)))
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64) / (32768.0 if a.dtype == np.int16 else float(np.iinfo(a.dtype).max) + 1)
    a = a.astype(np.float64)
    if sample_rate != SAMPLE_RATE:
        import librosa

        a = librosa.resample(a, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    return np.clip(np.round(a * 32768.0), -32768, 32767)


# --------------------------------------------------------------------------- offset search


def sync_distances(
    video_feats: np.ndarray | torch.Tensor, audio_feats: np.ndarray | torch.Tensor, vshift: int = VSHIFT
) -> tuple[np.ndarray, np.ndarray]:
    """syncnet_python's `calc_pdist` + mean: -> (offsets (2 vshift + 1,), mdist (2 vshift + 1,)).

    Audio features are zero-padded by `vshift` rows at each end; entry j compares video frame i with
    audio frame i + j - vshift; offsets[j] = vshift - j (the reference's AV offset convention).
    """
    v = torch.as_tensor(np.asarray(video_feats, np.float32))
    a = torch.as_tensor(np.asarray(audio_feats, np.float32))
    if v.ndim != 2 or a.shape != v.shape:
        raise ValueError(f"need equal (T, D) feature arrays, got {tuple(v.shape)} and {tuple(a.shape)}")
    win = 2 * vshift + 1
    ap = F.pad(a, (0, 0, vshift, vshift))
    # (T, win, D): the reference's per-frame window, with pairwise_distance's eps 1e-6 on the difference
    windows = ap.unfold(0, win, 1)[: v.shape[0]].permute(0, 2, 1)
    dists = torch.linalg.vector_norm(v[:, None, :] - windows + 1e-6, dim=-1)
    mdist = dists.mean(0).double().numpy()
    return vshift - np.arange(win), mdist


def lse_from_distances(offsets: np.ndarray, mdist: np.ndarray) -> dict[str, float | int]:
    """{"lse_d": min, "lse_c": median - min, "offset": offset at the min} of a distance curve."""
    mdist = np.asarray(mdist, np.float64)
    j = int(np.argmin(mdist))
    # torch.median (the reference) gives the lower middle for an even count; mdist has 2 vshift + 1 entries.
    median = float(np.sort(mdist)[(len(mdist) - 1) // 2])
    return {
        "lse_d": float(mdist[j]),
        "lse_c": median - float(mdist[j]),
        "offset": int(np.asarray(offsets)[j]),
    }


# --------------------------------------------------------------------------- features


def prepare_frames(frames: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (1, 3, T, size, size) float 0-255 BGR (the reference's input)."""
    v = torch.from_numpy(np.ascontiguousarray(as_video(frames)[..., ::-1])).permute(0, 3, 1, 2).float()
    if v.shape[-2:] != (size, size):
        v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)
    return v.permute(1, 0, 2, 3).unsqueeze(0)


@torch.no_grad()
def syncnet_features(
    model: SyncNet, frames: np.ndarray, audio: np.ndarray, sample_rate: int, batch_size: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Video and audio embeddings (T', 1024) each, windows as in the reference's `evaluate`."""
    return embed_windows(model, frames, audio_to_int16_scale(audio, sample_rate), batch_size)


@torch.no_grad()
def embed_windows(model: SyncNet, frames: np.ndarray, sig: np.ndarray, batch_size: int = 20
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`syncnet_features` of 25 fps frames and 16 kHz mono audio already on the int16 scale."""
    imtv = prepare_frames(frames)
    cct = torch.from_numpy(psf_mfcc(sig, SAMPLE_RATE).T.copy()).float()[None, None]  # (1, 1, 13, M)
    min_length = min(imtv.shape[2], len(sig) // (SAMPLE_RATE // FPS))
    lastframe = min_length - WINDOW
    vfeat, afeat = [], []
    for i in range(0, max(lastframe, 0), batch_size):
        idx = range(i, min(lastframe, i + batch_size))
        vfeat.append(model.forward_lip(torch.cat([imtv[:, :, f : f + WINDOW] for f in idx], 0)))
        cc = [cct[:, :, :, f * MFCC_PER_FRAME : f * MFCC_PER_FRAME + MFCC_WINDOW] for f in idx]
        afeat.append(model.forward_aud(torch.cat(cc, 0)))
    if not vfeat:
        return np.zeros((0, 1024), np.float32), np.zeros((0, 1024), np.float32)
    return torch.cat(vfeat).numpy(), torch.cat(afeat).numpy()


def lse(
    frames: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    syncnet_path: str | os.PathLike | None = None,
    model: SyncNet | None = None,
    vshift: int = VSHIFT,
    boxes: np.ndarray | None = None,
    min_track: int = syncnet_crop.MIN_TRACK,
    min_face_size: float = 0.0,
) -> dict[str, MetricResult]:
    """{"LSE-D": ..., "LSE-C": ...} for one video (T, H, W, 3) uint8 RGB at `fps` and its audio.

    The frames are taken to 25 fps and cropped along their face track as the reference pipeline does;
    `boxes` ((T, 4) per input frame, NaN where no face) skips the detection. `model` wins over
    `syncnet_path`, which wins over `$SINGER_SYNCNET_PATH`. Both results carry the same `details`.
    """
    def unavailable(reason: str, **details) -> dict[str, MetricResult]:
        return {k: MetricResult.unavailable(reason, **details) for k in ("LSE-D", "LSE-C")}

    if model is None:
        try:
            model = load_syncnet(syncnet_path)
        except WeightsUnavailable as exc:
            return unavailable(str(exc), env_var=ENV_VAR)
    video = as_video(frames)
    keep = syncnet_crop.to_25_fps(len(video), fps) if float(fps) != FPS else np.arange(len(video))
    video = video[keep]
    settings = {"fps_in": float(fps), "min_track": int(min_track), "min_face_size": float(min_face_size),
                "crop_scale": syncnet_crop.CROP_SCALE, "boxes": "dlib HOG" if boxes is None else "given"}
    boxes = syncnet_crop.detect_boxes(video) if boxes is None else np.asarray(boxes, np.float64)[keep]
    track = syncnet_crop.face_track(boxes, min_track, min_face_size)
    with_face = int(np.isfinite(boxes).all(axis=1).sum())
    if track is None:
        return unavailable(f"no face track of more than {min_track} frames ({with_face} of {len(video)} frames "
                           "at 25 fps have a face)", **settings)
    crops = syncnet_crop.crop_track(video[track.start:track.end + 1], track.boxes)
    per_frame = SAMPLE_RATE // FPS  # the audio of the track's frames only, as the reference cuts it
    sig = audio_to_int16_scale(audio, sample_rate)[track.start * per_frame:(track.end + 1) * per_frame]
    v, a = embed_windows(model.eval(), crops, sig)
    settings.update(track_start=track.start, track_end=track.end, track_detections=track.n_detected)
    if len(v) == 0:
        return unavailable(f"too short for SyncNet: needs more than {WINDOW} frames of video and audio", **settings)
    scores = lse_from_distances(*sync_distances(v, a, vshift))
    details = {"offset": scores["offset"], "n_windows": int(len(v)), **settings}
    return {
        "LSE-D": MetricResult.ok(scores["lse_d"], **details),
        "LSE-C": MetricResult.ok(scores["lse_c"], **details),
    }


__all__ = [
    "audio_to_int16_scale",
    "embed_windows",
    "lse",
    "lse_from_distances",
    "prepare_frames",
    "psf_filterbanks",
    "psf_mfcc",
    "sync_distances",
    "syncnet_features",
]
