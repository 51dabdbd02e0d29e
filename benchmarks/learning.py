"""Does it learn? Train the tiny model on synthetic singers and check, on held-out subjects, that the mouth
follows the song: the project's own commands end to end, with audio controls, over several seeds.

    python benchmarks/learning.py                       # seeds 0 1 2, variant full (about 1 h on 2 cores)
    python benchmarks/learning.py --seeds 0 --variants full no_msm no_sfm no_both --controls none
    python benchmarks/learning.py --report-only         # the table again from what is on disk
    python benchmarks/learning.py --seeds 0 --controls none shuffled --sampling dpm_solver:5   # + a sampler

What it runs, in `benchmarks/results/learning/` (a project folder of its own):
1. `params.yaml` = the repository's params.yaml with `benchmarks/learning.yaml` merged over it (corpus size,
   model width, steps, learning rate: the budget is chosen there, not here).
2. `singer synth` (subjects of `synth.subjects`), then `singer ingest|clip|crop|split`: the split is by
   subject, so the test clips are singers the model never saw.
3. Per variant x seed: `singer train` (i.e. `accelerate launch -m singer.train`) into `runs/<variant>-s<seed>/`.
4. Per trained model, `singer evaluate` three times: the clip's own audio, the `shuffled` control (another
   test clip's audio, of another subject) and the `silent` control; landmarks are detected on the generated
   frames by dlib, the ground-truth mouth opening comes from the synthesizer's sidecar.
5. The ground-truth identity row: the identity metric between the ground-truth frames and the reference.

Output: a table (mean ± std over seeds of the clip means), `benchmarks/results/learning.json`, and the
figure `benchmarks/figures/learning.png` (mouth opening of one held-out clip: ground truth, generated from
its audio, generated from shuffled audio). Targets (issue 6): mouth r >= 0.6, shuffled r <= 0.2, identity
>= ground-truth identity - 0.1. The exit code is 0 either way: the table says what passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

METRICS = ["mouth_correlation", "mouth_width_correlation", "lmd", "bas", "identity", "ssim", "psnr"]
CONTROLS = ["none", "shuffled", "silent"]
TARGETS = {"mouth_r": 0.6, "shuffled_r": 0.2, "identity_margin": 0.1}


def singer(args: list[str], cwd: Path, log: Path) -> float:
    """Run `singer <args>` in the benchmark's project folder; returns the wall time. Fails loudly."""
    exe = Path(sys.executable).parent / "singer"
    cmd = [str(exe) if exe.exists() else "singer", *args]
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"})
    if code != 0:
        raise SystemExit(f"`{' '.join(args)}` failed (exit {code}); see {log}")
    return time.perf_counter() - started


def project_params(spec: Path) -> dict:
    from singer.config import deep_merge

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    return deep_merge(base, yaml.safe_load(spec.read_text()) or {})


def synth_code() -> str:
    """sha256 of the synthesizer's source: a corpus made by other code is another corpus."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "singer" / "data").glob("synth*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare_data(work: Path, params: dict, log: Path) -> dict:
    """The corpus and the data stages, rerun only when the data parameters or the synthesizer changed."""
    data_keys = {k: params.get(k) for k in ("synth", "ingest", "clip", "crop", "split", "preset")}
    data_keys["synth_code"] = synth_code()
    stamp = work / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == data_keys \
            and (work / "data/split/test.txt").exists():
        return json.loads(stamp.read_text())
    timings = {"synth": singer(["synth", "--out", "data/raw", "--no-progress"], work, log)}
    for stage in ("ingest", "clip", "crop", "split"):
        timings[stage] = singer([stage, "--no-progress"], work, log)
    split = json.loads((work / "metrics/split.json").read_text())
    info = {"params": data_keys, "seconds": timings, "split": split}
    stamp.write_text(json.dumps(info, indent=2))
    return info


def run_overrides(run_dir: Path, variant: str, seed: int) -> list[str]:
    return ["-S", f"train.variant={variant}", "-S", f"train.seed={seed}",
            "-S", f"train.models_dir={run_dir / 'models'}", "-S", f"paths.metrics={run_dir / 'metrics'}"]


def label(control: str, sampling: str | None) -> str:
    """The table row's audio column: the control, and the sampler when it is not learning.yaml's."""
    return control if sampling is None else f"{control}@{sampling.replace(':', '')}"


def eval_overrides(run_dir: Path, variant: str, seed: int, control: str, sampling: str | None = None) -> list[str]:
    name = label(control, sampling)
    extra = []
    if sampling is not None:  # "dpm_solver:5": the same trained model sampled another way
        sampler, steps = sampling.split(":")
        extra = ["-S", f"evaluate.sampler={sampler}", "-S", f"evaluate.inference_steps={int(steps)}"]
    return [*run_overrides(run_dir, variant, seed),
            "-S", f"paths.metrics={run_dir / f'metrics-{name}'}",
            "-S", f"evaluate.model_dir={run_dir / 'models' / variant}",
            "-S", f"evaluate.out_dir={run_dir / f'eval-{name}'}",
            "-S", f"evaluate.audio_control={control}", "-S", f"evaluate.seed={seed}", *extra]


def eval_json(run_dir: Path, variant: str, control: str) -> Path:
    """control: a `label` (the control, with the sampler when it is not learning.yaml's)."""
    name = "eval.json" if variant == "full" else f"{variant}-eval.json"
    return run_dir / f"metrics-{control}" / name


def train_json(run_dir: Path, variant: str) -> Path:
    return run_dir / "metrics" / ("train.json" if variant == "full" else f"{variant}-train.json")


def train_and_evaluate(work: Path, variant: str, seed: int, log: Path, controls: list[str],
                       samplings: list[str | None] = (None,)) -> dict:
    run_dir = Path("runs") / f"{variant}-s{seed}"
    timings = {}
    if not (work / train_json(run_dir, variant)).exists():
        timings["train"] = singer(["train", *run_overrides(run_dir, variant, seed)], work, log)
    for sampling in samplings:
        for control in controls:
            name = label(control, sampling)
            if not (work / eval_json(run_dir, variant, name)).exists():
                timings[f"evaluate_{name}"] = singer(
                    ["evaluate", "--no-progress", *eval_overrides(run_dir, variant, seed, control, sampling)], work, log)
    return timings


def truth_identity(work: Path) -> float:
    """The identity metric between each held-out clip's ground-truth frames and its reference frame."""
    from singer.config import load_config
    from singer.data.dataset import SingerClipDataset
    from singer.evaluate.metrics.identity import identity_similarity

    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load_config("params.yaml")
        ids = (Path(cfg.paths.split) / "test.txt").read_text().split()
        if cfg.evaluate.max_clips is not None:
            ids = ids[: cfg.evaluate.max_clips]
        ds = SingerClipDataset(cfg, "test", clip_ids=ids, random_windows=False)
        values = []
        for cid in ids:
            frames, _, reference, _, _ = ds._read_clip(cid)
            res = identity_similarity(frames, reference, 1, cfg.evaluate.identity_max_frames)
            if res.value is not None:
                values.append(res.value)
        return float(sum(values) / len(values)) if values else float("nan")
    finally:
        os.chdir(cwd)


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def collect(work: Path, variants: list[str], seeds: list[int], controls: list[str]) -> dict:
    table = {}
    for variant in variants:
        # the training wall time of every run on disk, not only of the runs this invocation made
        trained = [work / train_json(Path("runs") / f"{variant}-s{seed}", variant) for seed in seeds]
        train_seconds = spread([json.loads(p.read_text()).get("seconds") for p in trained if p.exists()])
        for control in controls:
            per_seed = []
            for seed in seeds:
                path = work / eval_json(Path("runs") / f"{variant}-s{seed}", variant, control)
                if path.exists():
                    per_seed.append(json.loads(path.read_text()))
            row = {m: spread([e.get(m) for e in per_seed]) for m in METRICS}
            row["unavailable"] = {m: r for e in per_seed for m, r in (e.get("unavailable") or {}).items() if m in METRICS}
            row["clips"] = per_seed[0].get("n_clips") if per_seed else 0
            row["train_seconds"] = train_seconds
            table[f"{variant}/{control}"] = row
    return table


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def targets(table: dict, gt_identity: float) -> dict:
    full, shuffled = table.get("full/none"), table.get("full/shuffled")
    out = {}
    if full and full["mouth_correlation"]["mean"] is not None:
        out["mouth_r >= 0.6"] = full["mouth_correlation"]["mean"] >= TARGETS["mouth_r"]
    if shuffled and shuffled["mouth_correlation"]["mean"] is not None:
        out["shuffled_r <= 0.2"] = shuffled["mouth_correlation"]["mean"] <= TARGETS["shuffled_r"]
    if full and full["identity"]["mean"] is not None and math.isfinite(gt_identity):
        out[f"identity >= {gt_identity - TARGETS['identity_margin']:.3f}"] = (
            full["identity"]["mean"] >= gt_identity - TARGETS["identity_margin"])
    return out


def figure(work: Path, seed: int, out: Path) -> Path | None:
    """Mouth opening of the first held-out clip: truth, generated, generated from shuffled audio."""
    import pandas as pd
    from matplotlib.figure import Figure

    run = work / "runs" / f"full-s{seed}"
    own, shuffled = run / "eval-none/plots/mouth_curves.csv", run / "eval-shuffled/plots/mouth_curves.csv"
    if not own.exists():
        return None
    a = pd.read_csv(own)
    clip = a["clip_id"].iloc[0]
    per_clip = run / "eval-none/per_clip.parquet"
    if per_clip.exists():  # the clip with the median r: representative, neither the best nor the worst
        r = pd.read_parquet(per_clip)[["clip_id", "mouth_correlation"]].dropna().sort_values("mouth_correlation")
        if len(r):
            clip = r["clip_id"].iloc[(len(r) - 1) // 2]
            title_r = float(r["mouth_correlation"].iloc[(len(r) - 1) // 2])
    a = a[a["clip_id"] == clip]
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(a["frame"], a["truth"], label="ground truth", color="black")
    ax.plot(a["frame"], a["generated"], label="generated (its audio)", color="#4c72b0")
    if shuffled.exists():
        b = pd.read_csv(shuffled)
        b = b[b["clip_id"] == clip]
        ax.plot(b["frame"], b["generated"], label="generated (shuffled audio)", color="#dd8452", alpha=0.8)
    ax.set_xlabel("frame (25 fps)")
    ax.set_ylabel("mouth opening")
    label = f" (the median clip, r = {title_r:.2f})" if "title_r" in locals() else ""
    ax.set_title(f"held-out clip {clip}, seed {seed}{label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=HERE / "learning.yaml", help="merged over params.yaml")
    parser.add_argument("--work", type=Path, default=HERE / "results" / "learning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["full"])
    parser.add_argument("--controls", nargs="+", choices=CONTROLS, default=CONTROLS,
                        help="audio driving each model; the ablation needs only `none` (a third of the time)")
    parser.add_argument("--sampling", nargs="+", default=[],
                        help="more samplings of every trained model, SAMPLER:STEPS (e.g. dpm_solver:5), each a row "
                             "beside learning.yaml's (evaluate.sampler / inference_steps)")
    parser.add_argument("--name", default=None, help="results name (default: learning, or learning-ablation)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--figure", type=Path, default=HERE / "figures" / "learning.png")
    args = parser.parse_args()

    from common import report

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = project_params(args.params)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = work / "commands.log"
    timings: dict = {}
    data = json.loads((work / "data.json").read_text()) if (work / "data.json").exists() else {}
    if not args.report_only:
        data = prepare_data(work, params, log)
        for variant in args.variants:
            for seed in args.seeds:
                timings[f"{variant}-s{seed}"] = train_and_evaluate(work, variant, seed, log, args.controls,
                                                                   [None, *args.sampling])
                print(f"{variant} seed {seed}: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings[f"{variant}-s{seed}"].items()),
                      flush=True)

    labels = [label(c, s) for s in [None, *args.sampling] for c in args.controls]
    table = collect(work, args.variants, args.seeds, labels)
    gt_identity = truth_identity(work)
    passed = targets(table, gt_identity)
    fig = figure(work, args.seeds[0], args.figure)

    header = f"{'variant/audio':<28}" + "".join(f"{m:>20}" for m in METRICS) + f"{'training s':>14}"
    lines = [header] + [f"{k:<28}" + "".join(f"{fmt(v[m]):>20}" for m in METRICS) + f"{fmt(v['train_seconds'], 0):>14}"
                        for k, v in table.items()]
    lines.append(f"{'ground truth':<28}" + "".join(f"{(f'{gt_identity:.3f}' if m == 'identity' else '-'):>20}"
                                                   for m in METRICS))
    print("\n".join(lines))
    rows = [(name, "PASS" if ok else "FAIL") for name, ok in passed.items()]
    for variant in args.variants:
        seconds = table[f"{variant}/{args.controls[0]}"]["train_seconds"]
        if seconds["mean"] is not None:
            rows.append((f"training wall time, {variant}", f"{fmt(seconds, 0)} s"))
    name = args.name or ("learning" if args.variants == ["full"] else "learning-ablation")  # the seeds' table stays
    report(name, rows, {"table": table, "ground_truth_identity": gt_identity, "targets": passed,
                              "timings": timings, "data": data, "seeds": args.seeds, "variants": args.variants,
                              "controls": args.controls, "sampling": args.sampling,
                              "params": yaml.safe_load(args.params.read_text()), "figure": str(fig) if fig else None})


if __name__ == "__main__":
    main()
