"""The README's before/after frame: a photo, then a frame of the video `singer generate` makes from it.

    python benchmarks/before_after.py --model benchmarks/results/learning/runs/full-s0/models/full \
        --song benchmarks/results/learning/data/raw/subject_002/take_00.mp4

The photo is scikit-image's astronaut in a 960x540 landscape frame (the rest of the frame is her own picture,
mirrored and blurred, so the face is a small part of a larger photo); the song is a held-out synthetic singer's
(voice over drums and chords; the video's sound track is it, as it was). Generation runs with the defaults
(paste-back, HPSS vocals, loudness), the model's own steps. The figure (`benchmarks/figures/
paste_back.png`) shows the photo, the frame where the mouth is most open, and both faces enlarged.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def landscape_photo() -> np.ndarray:  # noqa: F821 (numpy is imported inside: no import-time cost)
    import cv2
    import numpy as np
    from skimage import data

    face = cv2.resize(data.astronaut(), (540, 540), interpolation=cv2.INTER_AREA)
    backdrop = cv2.GaussianBlur(cv2.resize(face[:, ::-1], (960, 540)), (0, 0), 12)
    photo = backdrop.copy()
    photo[:, 380:920] = face
    return np.ascontiguousarray(photo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--song", required=True, type=Path)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=HERE / "figures" / "paste_back.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from singer.config import load_config
    from singer.faces import find_face, mouth_opening
    from singer.generate import generate_video
    from singer.media import read_audio, read_frames, write_wav

    cfg = load_config(HERE.parent / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        photo_path, song_path, video = Path(tmp) / "photo.jpg", Path(tmp) / "song.wav", Path(tmp) / "out.mp4"
        photo = landscape_photo()
        Image.fromarray(photo).save(photo_path, quality=95)
        audio, rate = read_audio(args.song, sample_rate=None, mono=False)
        write_wav(song_path, audio[:, : int(args.seconds * rate)], rate)
        info = generate_video(photo_path, song_path, video, args.model, progress=False, compute=cfg.compute,
                              settings=cfg.generate, crop=cfg.crop)
        frames, _ = read_frames(video)
    openings = []
    for frame in frames:
        try:
            openings.append(float(mouth_opening(find_face(frame).landmarks[None])[0]))
        except ValueError:
            openings.append(-1.0)
    best = int(np.argmax(openings))
    box = find_face(photo).box
    cx, cy, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0])
    zoom = (slice(int(cy - half), int(cy + half)), slice(int(cx - half), int(cx + half)))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4), gridspec_kw={"width_ratios": [16 / 9, 16 / 9, 1, 1]})
    for ax, image, title in zip(axes, [photo, frames[best], photo[zoom], frames[best][zoom]],
                                ["the photo (960x540)", f"frame {best} of the video ({info['width']}x{info['height']})",
                                 "the photo's face", "generated, pasted back"]):
        ax.imshow(image)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"{args.out}: frame {best} of {len(frames)} (mouth opening {openings[best]:.3f}); "
          f"{info['compute_seconds']:.1f} s of compute")


if __name__ == "__main__":
    sys.exit(main())
