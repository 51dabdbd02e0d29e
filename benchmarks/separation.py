"""Vocal separation before the audio encoder: quality against the true vocal stem, speed and memory.

    nice -n 5 python benchmarks/separation.py [--clips 4 --seconds 30 --levels 0.35 2.0 4.0
                                               --rss-seconds 10 60 180] [--separator-model FILE.onnx]

Quality: songs from the synthetic corpus's generator (`singer.data.synth_audio`, mixed as
`singer.data.synth.synthesize_take` mixes them: music at `music_level` x the voice's RMS, peak 0.8) at 16 kHz,
the rate the encoder hears; for each method (`none` is the mix itself) the SDR (dB, `fast_bss_eval.sdr`, BSS-eval
v4 with a 512-tap distortion filter) of its estimate against the true vocal stem, mean over `--clips` songs
(subjects 0.. of seed 0), at the default music level 0.35 and with loud backing (2.0, 4.0: the music louder
than the voice). Speed: compute seconds per second of audio over those runs. Memory: each method on songs of
each `--rss-seconds` length, each in a fresh process: the peak RSS, and its rise over the process before the
call (after imports, a warm-up call, the input allocated and `malloc_trim`), so the table shows what the
separation itself holds (the input and output of a 180 s song are 11.5 MB each). `--separator-model` adds the "model" method (an MDX-Net .onnx such as Kim_Vocal_2).

Prints a table and writes `benchmarks/results/separation.json` atomically. Whether separation raises mouth r on
loud-backing songs through generation is not measured here (it needs a trained model and the generation code).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RATE = 16000
LIBROSA_METHODS = ("none", "hpss", "repet_sim")


def synth_stems(subject: int, seconds: float, music_level: float, seed: int = 0, rate: int = RATE):
    """One synthetic song: (mix, vocals), each (S,) float32 at `rate`, mixed as `synthesize_take` mixes them
    (same random streams per seed/subject, take 0; music scaled to `music_level` x the voiced RMS; peak 0.8)."""
    from singer.data import synth_audio as sa
    from singer.data.synth import PEAK

    voice = sa.draw_voice(np.random.default_rng([seed, subject, 1]))
    rng = np.random.default_rng([seed, subject, 0, 2])
    n = round(seconds * rate)
    song = sa.compose_song(rng, n / rate, voice)
    mix, vocals, _ = sa.mix_take(song, voice, rate, n, rng, music_level, PEAK)
    return mix, vocals


def sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """BSS-eval SDR (dB) of an (S,) estimate against the (S,) reference."""
    import fast_bss_eval

    return float(fast_bss_eval.sdr(reference[None].astype(np.float64), estimate[None].astype(np.float64))[0])


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_child(method: str, seconds: float, model: str | None) -> dict:
    """In this (fresh) process: warm up, then separate `seconds` of song; peak RSS and its rise (MB)."""
    from singer.media import separate_vocals

    separate_vocals(synth_stems(0, 3.0, 0.35)[0], RATE, method, model)  # imports, numba/onnx warm-up
    base_song, _ = synth_stems(0, min(seconds, 30.0), 0.35)
    song = np.resize(base_song, round(seconds * RATE)).astype(np.float32)  # a long song: the clip, repeated
    del base_song
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reused pages do not hide new allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = separate_vocals(song, RATE, method, model)
    elapsed = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    assert out.shape == song.shape
    return {"peak_rss_mb": round(peak / 1024, 1), "rise_mb": round((peak - before) / 1024, 1),
            "input_mb": round(song.nbytes / 2**20, 1), "seconds_per_audio_second": round(elapsed / seconds, 4)}


def measure_rss(method: str, seconds: float, model: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(seconds)] + (["--separator-model", model] if model else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        raise RuntimeError(f"rss child {method} {seconds}s failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each quality clip")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.35, 2.0, 4.0], help="music_level values")
    parser.add_argument("--rss-seconds", type=float, nargs="*", default=[10.0, 60.0, 180.0])
    parser.add_argument("--separator-model", default=None, help="an MDX-Net .onnx file: adds the 'model' method")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/separation.json")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(rss_child(args.child[0], float(args.child[1]), args.separator_model)))
        return {}

    from singer.io import write_json_atomic
    from singer.media import separate_vocals

    methods = LIBROSA_METHODS + (("model",) if args.separator_model else ())
    separate_vocals(synth_stems(0, 3.0, 0.35)[0], RATE, "repet_sim")  # warm-up outside the timings
    sdrs = {m: {str(level): [] for level in args.levels} for m in methods}
    compute = {m: [0.0, 0.0] for m in methods}  # compute seconds, audio seconds
    for level in args.levels:
        for clip in range(args.clips):
            mix, vocals = synth_stems(clip, args.seconds, level)
            for m in methods:
                t0 = time.perf_counter()
                est = separate_vocals(mix, RATE, m, args.separator_model)
                compute[m][0] += time.perf_counter() - t0
                compute[m][1] += len(mix) / RATE
                sdrs[m][str(level)].append(sdr(est, vocals))
        print(f"music_level {level}: done", flush=True)
    rss = {m: {f"{s:g}": measure_rss(m, s, args.separator_model) for s in args.rss_seconds} for m in methods}

    mean = {m: {lv: round(float(np.mean(v)), 2) for lv, v in per.items()} for m, per in sdrs.items()}
    result = {
        "rate": RATE, "clips": args.clips, "clip_seconds": args.seconds, "music_levels": args.levels,
        "sdr_db_mean": mean,
        "sdr_db_per_clip": {m: {lv: [round(x, 2) for x in v] for lv, v in per.items()} for m, per in sdrs.items()},
        "sdr_gain_over_mix_db": {m: {lv: round(mean[m][lv] - mean["none"][lv], 2) for lv in mean[m]} for m in methods},
        "compute_seconds_per_audio_second": {m: round(c / a, 4) for m, (c, a) in compute.items()},
        "memory": rss,
        "separator_model": args.separator_model,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1min": round(os.getloadavg()[0], 2)},
    }
    levels = [str(level) for level in args.levels]
    head = " ".join(f"{'SDR@' + lv:>10}" for lv in levels)
    mem = " ".join(f"{'RSS@' + k + 's':>11}" for k in rss[methods[0]])
    print(f"\n{'method':<10} {head} {'s/audio s':>10} {mem}  (peak RSS MB, rise in parentheses)")
    for m in methods:
        cells = " ".join(f"{mean[m][lv]:>10.2f}" for lv in levels)
        mems = " ".join(f"{r['peak_rss_mb']:>5.0f} ({r['rise_mb']:>3.0f})" for r in rss[m].values())
        print(f"{m:<10} {cells} {result['compute_seconds_per_audio_second'][m]:>10.4f} {mems}")
    print(f"({args.clips} clips of {args.seconds:g} s at {RATE} Hz per level; SDR in dB against the true vocal stem; "
          f"'none' is the mix itself)")
    write_json_atomic(args.out, result)
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
