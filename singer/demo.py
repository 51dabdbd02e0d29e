"""Inputs for the demo's last step: a held-out singer's portrait and song, from the synthetic corpus.

    python -m singer.demo --out outputs        # writes outputs/portrait.png and outputs/song.wav, prints them

The portrait is the first frame of the first test subject's raw video (a person the model never trained
on), the song the first `--seconds` of that video's audio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from singer.config import load_config
    from singer.media import read_audio, read_frames, write_wav

    cfg = load_config(args.params)
    subject = json.loads((Path(cfg.paths.split) / "split.json").read_text())["test_subjects"][0]
    video = sorted((Path(cfg.paths.raw) / subject).glob("*.mp4"))[0]
    frames, _ = read_frames(video, 0.0, 0.2)
    audio, rate = read_audio(video, sample_rate=None, mono=True, end_s=args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frames[0]).save(args.out / "portrait.png")
    write_wav(args.out / "song.wav", audio, rate)
    print(f"{args.out / 'portrait.png'} {args.out / 'song.wav'}  (held-out {subject}, {video.name})")


if __name__ == "__main__":
    main()
