"""Long songs: peak memory of `singer generate` for 10 s, 60 s and 180 s of audio, and compute per video second.

    python benchmarks/long_song.py [--seconds 10 60 180] [--steps 1] [--photo-side 1024]

Each length runs in a fresh process (`generate_video`, the code `singer generate` runs, in-process there), so
its peak RSS (`ru_maxrss`) is that length's alone: a photo of `--photo-side` pixels (the astronaut in a larger
canvas, so paste-back works at that size), a stereo 44.1 kHz song (a tone with a syllable envelope over
chords) of that length, an untrained tiny model (memory and speed do not depend on what the weights learned),
the default settings (paste-back, HPSS vocal separation, loudness), bf16 where the CPU has it. `--steps 1`
keeps 3 minutes of video affordable here: the memory of a window does not depend on the steps, its time does;
the seconds per video second at the model's own steps are measured on the shortest song (`--full-steps-seconds`).

Target (issue 16): the peak RSS is flat within 10 % from 10 s to 180 s. Writes
`benchmarks/results/long_song.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
args = json.loads(sys.argv[1])
from singer.config import load_config
from singer.generate import generate_video
cfg = load_config(args["params"])
info = generate_video(Path(args["photo"]), Path(args["song"]), Path(args["out"]), args["model"], steps=args["steps"],
                      progress=False, warn=lambda m: None, compute=cfg.compute, settings=cfg.generate, crop=cfg.crop)
info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(info, default=str))
"""


def make_inputs(folder: Path, seconds: list[float], side: int) -> tuple[Path, dict[float, Path], Path]:
    """The photo, one stereo 44.1 kHz song per length (m4a), and an untrained tiny model."""
    import av
    import numpy as np
    from PIL import Image
    from skimage import data
    from skimage.transform import resize

    from singer.config import load_config
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    canvas = np.full((side, side * 3 // 4 // 2 * 2, 3), 200, np.uint8)
    face = (resize(data.astronaut(), (side // 2, side // 2), anti_aliasing=True) * 255).astype(np.uint8)
    top, left = side // 8, (canvas.shape[1] - side // 2) // 2
    canvas[top:top + side // 2, left:left + side // 2] = face
    photo = folder / "photo.jpg"
    Image.fromarray(canvas).save(photo, quality=92)

    rate = 44100
    songs = {}
    for length in seconds:
        t = np.arange(int(length * rate)) / rate
        voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        chords = 0.1 * (np.sin(2 * np.pi * 110 * t) + np.sin(2 * np.pi * 165 * t))
        stereo = np.stack([voice + chords, voice + 0.5 * chords]).astype(np.float32)
        path = folder / f"song{int(length)}.m4a"
        with av.open(str(path), "w", format="mp4") as c:
            s = c.add_stream("aac", rate=rate)
            s.layout = "stereo"
            for i in range(0, stereo.shape[1], 1024):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, i:i + 1024]), format="fltp",
                                               layout="stereo")
                f.sample_rate, f.pts = rate, i
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        songs[length] = path

    cfg = load_config(HERE.parent / "params.yaml")
    model = folder / "model"
    SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution) \
        .save_pretrained(model)
    return photo, songs, model


def run_one(photo: Path, song: Path, model: Path, out: Path, steps: int | None) -> dict:
    arg = json.dumps({"photo": str(photo), "song": str(song), "model": str(model), "out": str(out),
                      "steps": steps, "params": str(HERE.parent / "params.yaml")})
    done = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"generation of {song.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0, 180.0])
    parser.add_argument("--steps", type=int, default=1, help="denoising steps of the memory rows")
    parser.add_argument("--full-steps-seconds", type=float, default=10.0,
                        help="also time this length at the model's own steps (0: skip)")
    parser.add_argument("--photo-side", type=int, default=1024)
    args = parser.parse_args()

    from common import report

    from singer.media import probe

    with tempfile.TemporaryDirectory(prefix="singer-long-song-") as tmp:
        folder = Path(tmp)
        lengths = sorted(set(args.seconds) | ({args.full_steps_seconds} if args.full_steps_seconds else set()))
        photo, songs, model = make_inputs(folder, lengths, args.photo_side)
        rows, runs = [], []
        for length in sorted(args.seconds):
            info = run_one(photo, songs[length], model, folder / f"out{int(length)}.mp4", args.steps)
            video = probe(folder / f"out{int(length)}.mp4")
            runs.append({"audio_seconds": length, "steps": args.steps, "peak_rss_mib": info["peak_rss_mib"],
                         "compute_per_video_second": info["compute_seconds"] / info["seconds"],
                         "video": {"width": video.width, "height": video.height, "frames": video.n_frames,
                                   "seconds": video.duration_s, "audio_channels": video.audio_channels,
                                   "audio_rate": video.audio_sr}})
            rows.append((f"{length:.0f} s, {args.steps} step(s)",
                         f"peak RSS {info['peak_rss_mib']:.0f} MiB, "
                         f"{runs[-1]['compute_per_video_second']:.2f} s per video second, "
                         f"{video.width}x{video.height}, {video.n_frames} frames, audio {video.audio_channels} ch "
                         f"{video.audio_sr} Hz"))
        peaks = [r["peak_rss_mib"] for r in runs]
        growth = max(peaks) / min(peaks) - 1
        rows.append(("peak RSS, largest over smallest", f"+{100 * growth:.1f} % (target: within 10 %)"))
        full = None
        if args.full_steps_seconds:
            info = run_one(photo, songs[args.full_steps_seconds], model, folder / "full.mp4", None)
            full = {"audio_seconds": args.full_steps_seconds, "compute_per_video_second":
                    info["compute_seconds"] / info["seconds"], "peak_rss_mib": info["peak_rss_mib"]}
            rows.append((f"{args.full_steps_seconds:.0f} s at the model's steps",
                         f"{full['compute_per_video_second']:.2f} s per video second"))
    report("long_song", rows, {"runs": runs, "peak_rss_growth": growth, "flat_within_10_percent": growth <= 0.10,
                               "model_steps": full, "photo_side": args.photo_side})
    return {"runs": runs}


if __name__ == "__main__":
    main()
