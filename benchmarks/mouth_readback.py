"""Can the evaluation's instrument read the mouth back? dlib's landmarks on ground-truth crops against the
synthesizer's truth, per crop resolution: the mouth opening and the mouth width.

    python benchmarks/mouth_readback.py                          # dev corpus (synth seed 0), 64 96 128 px
    python benchmarks/mouth_readback.py --resolutions 64 --subjects 4

The learning benchmark scores a generated mouth against the truth through `singer evaluate`'s landmarks
(`video_landmarks`, cubic upsampling below 96 px). A metric is only worth reading when the same instrument,
given the ground-truth frames themselves, recovers the truth: this measures that bound (Pearson r per clip,
then the mean over clips) for every resolution asked, on the project's own stages (`singer synth`, `ingest`,
`clip`, then `crop` at each resolution). The corpus is learning.yaml's with `--seed` (default 0, the development
corpus; the benchmark's seed 1 is never used for a choice). Output: a table and
`benchmarks/results/mouth_readback.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from learning import project_params, singer, synth_code  # noqa: E402  (the benchmarks' shared runner)

TARGET_R = 0.9


def clip_reads(crops: Path) -> list[dict]:
    """Per crop folder with a truth.json: r of dlib's opening and width curves against the truth's."""
    from singer.evaluate.metrics.base import video_landmarks
    from singer.evaluate.metrics.mouth import curve_correlation, opening_curve, width_curve
    from singer.media.video import read_frames

    rows = []
    for folder in sorted(p for p in crops.iterdir() if (p / "truth.json").exists()):
        truth = json.loads((folder / "truth.json").read_text())
        frames, _ = read_frames(folder / "frames.mp4")
        landmarks = video_landmarks(frames)
        n = len(frames)
        row = {"clip_id": folder.name, "frames": n, "size": int(frames.shape[1]),
               "no_face": int((~np.isfinite(landmarks).all(axis=(1, 2))).sum())}
        for name, curve in (("opening", opening_curve), ("width", width_curve)):
            truth_curve = np.asarray(truth[f"mouth_{name}"][:n], np.float64)
            result = curve_correlation(curve(landmarks), truth_curve)
            row[f"{name}_r"] = result.value
            row[f"{name}_truth_range"] = [float(truth_curve.min()), float(truth_curve.max())]
        rows.append(row)
    return rows


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
    if not values:
        return {"mean": None, "median": None, "min": None, "n": 0}
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "min": float(np.min(values)),
            "share_at_target": float(np.mean([v >= TARGET_R for v in values])), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=HERE / "learning.yaml", help="merged over params.yaml")
    parser.add_argument("--seed", type=int, default=0, help="synth seed (0: the development corpus)")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--work", type=Path, default=HERE / "results" / "mouth_readback")
    args = parser.parse_args()

    from common import report

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = project_params(args.params)
    params["synth"] = {**params.get("synth", {}), "seed": args.seed, "subjects": args.subjects}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = work / "commands.log"
    stamp, made_by = work / "data.json", {"synth": params["synth"], "synth_code": synth_code()}
    if not stamp.exists() or json.loads(stamp.read_text()) != made_by:  # other parameters or code: another corpus
        for folder in ("data", *(f"metrics-{size}" for size in args.resolutions)):
            shutil.rmtree(work / folder, ignore_errors=True)
        singer(["synth", "--out", "data/raw", "--no-progress"], work, log)
        for stage in ("ingest", "clip"):
            singer([stage, "--no-progress"], work, log)
        stamp.write_text(json.dumps(made_by))
    table, rows_out = {}, []
    for size in args.resolutions:
        crops = Path(f"data/crops-{size}")
        if not (work / crops).exists():
            singer(["crop", "--no-progress", "-S", f"crop.resolution={size}", "-S", f"paths.crops={crops}",
                    "-S", f"paths.metrics=metrics-{size}"], work, log)
        rows = clip_reads(work / crops)
        rows_out += rows
        table[size] = {"opening": summary(rows, "opening_r"), "width": summary(rows, "width_r"),
                       "clips": len(rows), "frames_without_face": sum(r["no_face"] for r in rows)}

    lines = []
    for size, row in table.items():
        for name in ("opening", "width"):
            s = row[name]
            if s["mean"] is None:
                lines.append((f"{size} px, {name} r", "n/a"))
                continue
            lines.append((f"{size} px, {name} r (mean / median / min over {s['n']} clips)",
                          f"{s['mean']:.3f} / {s['median']:.3f} / {s['min']:.3f}  "
                          f"({s['share_at_target']:.0%} of clips >= {TARGET_R})"))
    passing = [size for size, row in table.items() if (row["width"]["mean"] or 0) >= TARGET_R
               and (row["opening"]["mean"] or 0) >= TARGET_R]
    lines.append(("smallest resolution where both read back (mean r >= 0.9)", f"{min(passing)} px" if passing else "none"))
    report("mouth_readback", lines, {"table": table, "clips": rows_out, "synth": params["synth"],
                                     "target_r": TARGET_R, "smallest_passing": min(passing) if passing else None})


if __name__ == "__main__":
    main()
