"""`singer synth`: a deterministic synthetic corpus of singers whose ground truth is known.

Each take is `out/subject_XXX/take_YY.mp4` (H.264 + AAC) with two sidecars:

- `take_YY.truth.json`: per-frame mouth opening and mouth width (the units of `singer.faces.mouth_opening`
  and `mouth_width`: inner-lip gap and lip-corner distance over eye distance, measured on the exact landmarks
  each frame was rendered with),
  per-frame head pose, beat times, tempo, the sung syllables, a description of the face variant, ...
- `take_YY.vocals.wav`: the vocal stem, sample-aligned and at the same gain as in the mix;
- `take_YY.landmarks.npy`: (n_frames, 68, 2) float32, the rendered landmarks in output pixels.

Faces are the astronaut photo (subject 0) and VARIANTS of it (see `synth_face`); the song is synthesized
(see `synth_audio`). The voice drives the mouth (opening = vowel openness x vocal envelope; width = the
vowel's rounding or spreading, heard in its formants, x the envelope) and the
drum beat drives the head (a nod after each beat, a sway over two beats, a turn over a bar).
Everything is a function of (seed, subject, take): the same seed gives byte-identical sidecars and
identical decoded frames.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from singer.data import synth_audio as sa
from singer.data.synth_face import FaceAnimator, FaceVariant, Pose, make_variant
from singer.faces import mouth_opening, mouth_width
from singer.io import write_bytes_atomic, write_json_atomic
from singer.media.audio import write_wav
from singer.media.video import write_video

CRF = 18
PEAK = 0.8  # mix peak after normalisation, leaving headroom for the AAC encoder


def subject_name(i: int) -> str:
    return f"subject_{i:03d}"


def take_name(j: int) -> str:
    return f"take_{j:02d}"


def head_pose(rng: np.random.Generator, times: np.ndarray, song: sa.Song) -> dict[str, np.ndarray]:
    """Head pose in degrees at `times`, driven by the beat: a nod (pitch) that peaks a quarter beat after
    every beat, a roll sway with a two-beat period and a yaw turn with a one-bar period."""
    period = song.period
    nod = float(rng.uniform(2.5, 5.0))
    sway = float(rng.uniform(1.5, 3.5))
    turn = float(rng.uniform(2.0, 4.5))
    phase_r, phase_y = (float(v) for v in rng.uniform(0, 2 * np.pi, 2))
    tau = times[:, None] - song.beat_times[None, :]
    rise = 0.25 * period
    pulse = np.where(tau >= 0, (tau / rise) * np.exp(1 - tau / rise), 0.0).sum(axis=1)
    beat0 = song.beat_times[0] if len(song.beat_times) else 0.0
    pitch = nod * (pulse - 0.5)
    roll = sway * np.sin(np.pi * (times - beat0) / period + phase_r)
    yaw = turn * np.sin(2 * np.pi * (times - beat0) / (4 * period) + phase_y)
    return {"pitch": pitch, "yaw": yaw, "roll": roll}


def _rounded(values, digits: int = 6) -> list:
    return [round(float(v), digits) for v in np.asarray(values).ravel()]


def synthesize_take(
    out_dir: Path,
    variant: FaceVariant,
    voice: sa.Voice,
    subject: int,
    take: int,
    seconds: float,
    seed: int,
    size: int,
    fps: float,
    music_level: float,
    sample_rate: int,
) -> Path:
    """Render one take (video, vocal stem, landmarks, truth) into `out_dir`; returns the mp4 path."""
    rng = np.random.default_rng([seed, subject, take, 2])
    n_frames = max(1, round(seconds * fps))
    duration = n_frames / fps
    n_samples = round(duration * sample_rate)
    times = np.arange(n_frames) / fps

    song = sa.compose_song(rng, duration, voice)
    mix, vocals, sung = sa.mix_take(song, voice, sample_rate, n_samples, rng, music_level, PEAK)

    target = sa.mouth_track(sung, sample_rate, times, fps)
    target_width = sa.width_track(sung, sample_rate, times, fps)
    pose = head_pose(rng, times, song)
    animator = FaceAnimator(variant, size)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    landmarks = np.empty((n_frames, 68, 2), np.float32)
    for f in range(n_frames):
        p = Pose(pitch=pose["pitch"][f], yaw=pose["yaw"][f], roll=pose["roll"][f])
        frames[f], landmarks[f] = animator.render(float(target[f]), p, float(target_width[f]))

    name = take_name(take)
    out_dir.mkdir(parents=True, exist_ok=True)
    mp4 = write_video(out_dir / f"{name}.mp4", frames, fps, audio=mix, sample_rate=sample_rate, crf=CRF)
    write_wav(out_dir / f"{name}.vocals.wav", vocals, sample_rate)
    buf = io.BytesIO()
    np.save(buf, landmarks, allow_pickle=False)
    write_bytes_atomic(out_dir / f"{name}.landmarks.npy", buf.getvalue())
    truth = {
        "subject": subject_name(subject),
        "take": name,
        "variant": variant.description,
        "variant_params": variant.params,
        "seed": int(seed),
        "fps": float(fps),
        "n_frames": int(n_frames),
        "seconds": round(duration, 6),
        "size": int(size),
        "sample_rate": int(sample_rate),
        "audio_channels": 1,
        "music_level": float(music_level),
        "bpm": float(song.bpm),
        "beat_times": _rounded(song.beat_times),
        "key_midi": int(song.key_midi),
        "mode": song.mode,
        "syllables": [
            {
                "onset": round(s.onset, 6),
                "offset": round(s.offset, 6),
                "midi": s.midi,
                "vowel": s.vowel,
                "level": round(s.level, 6),
            }
            for s in song.syllables
        ],
        "mouth_opening": _rounded(mouth_opening(landmarks)),
        "mouth_opening_units": "mean inner-lip gap (61-67, 62-66, 63-65) / inter-ocular distance",
        "mouth_width": _rounded(mouth_width(landmarks)),
        "mouth_width_units": "outer lip-corner distance (48-54) / inter-ocular distance",
        "head_pose": {k: _rounded(v, 4) for k, v in pose.items()},
        "head_pose_units": "degrees; roll is an in-plane rotation, pitch and yaw are rendered as a shift "
        "and foreshortening of the head (a 2-D approximation)",
        "landmarks_file": f"{name}.landmarks.npy",
        "vocals": f"{name}.vocals.wav",
    }
    write_json_atomic(out_dir / f"{name}.truth.json", truth)
    return mp4


def synthesize_corpus(
    out: Path,
    subjects: int,
    seconds: float,
    seed: int,
    size: int = 256,
    fps: Sequence[float] = (25.0,),
    takes_per_subject: int = 1,
    music_level: float = 0.35,
    sample_rate: int = 44100,
    progress: bool = True,
) -> list[Path]:
    """Writes out/<subject>/<take>.mp4 + <take>.truth.json + <take>.vocals.wav; returns the mp4 paths.

    Subject folders are `subject_000`, ...; takes `take_00`, .... The frame rate of subject i, take j is
    `fps[(i * takes_per_subject + j) % len(fps)]`. Subject 0 is the astronaut photo; the others are
    variants of it. Deterministic in `seed`.
    """
    out = Path(out)
    fps_list = [float(f) for f in (fps if isinstance(fps, (list, tuple)) else [fps])] or [25.0]
    jobs = [(i, j) for i in range(int(subjects)) for j in range(int(takes_per_subject))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synth", unit="take")
    paths: list[Path] = []
    for i in range(int(subjects)):
        variant = make_variant(seed, i, size)
        voice = sa.draw_voice(np.random.default_rng([seed, i, 1]))
        for j in range(int(takes_per_subject)):
            rate = fps_list[(i * int(takes_per_subject) + j) % len(fps_list)]
            paths.append(
                synthesize_take(
                    out / subject_name(i),
                    variant,
                    voice,
                    i,
                    j,
                    seconds,
                    seed,
                    int(size),
                    rate,
                    music_level,
                    sample_rate,
                )
            )
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return paths
