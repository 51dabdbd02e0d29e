"""The paper path rehearsed on CPU with fabricated weights: Hallo's ``pretrained_models/`` -> ``singer convert`` ->
``singer train -S preset=paper`` (released weights in, slim checkpoints out) -> ``singer generate``.

    python benchmarks/paper_rehearsal.py                       # FULL widths (2.4 B-parameter UNets), 128^2, 4+2 frames
    python benchmarks/paper_rehearsal.py --shrink --resolution 64 --steps 1     # every width shrunk (tests)
    python benchmarks/paper_rehearsal.py --workdir /big/disk/rehearsal --keep   # keep the files afterwards

1. a small synthetic corpus (``singer synth``, ``ingest|clip|crop|split`` at the rehearsal's resolution), or
   ``--corpus DIR`` (a project whose ``data/`` has crops at that resolution);
2. a fabricated ``pretrained_models/`` (``benchmarks/fabricate.py``): the released key names and full shapes from
   the manifests in tests/data/checkpoints (``--shrink``: a shrunk model's shapes), random values;
3. ``singer convert --dtype keep`` into ``pretrained_models/converted`` (the fabricated net.pth and motion module
   are deleted afterwards unless ``--keep``: the disk holds one copy of the UNets at a time);
4. ``singer train --profile cpu -S preset=paper -S model.pretrained=pretrained_models/converted`` for ``--steps``
   steps at the reduced size (full channel widths unless ``--shrink``);
5. ``singer generate`` of one window (``--frames`` frames) at ``--inference-steps`` steps from the trained model
   (``--shrink`` also from ``--pretrained``: Hallo + fresh MSM/SFM).

Each command runs as its own process; its peak RSS is the kernel's (``wait4``), its wall time measured around it.
Printed and written to ``benchmarks/results/paper_rehearsal[-shrunk].json``: peak RSS per command, seconds per
training step (MLflow's step timestamps), the checkpoint on disk against the trainable parameters' bytes and
Adam's two moments, the counts of loaded / new-by-design / missing tensors, and the disk each stage used.
Full widths need about 16 GB of RAM and 20 GB of disk (the trained model's save_pretrained folder alone is 10 GB
in fp32; the training run is told not to copy it into MLflow: ``tracking.log_model=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUMMARY = re.compile(r"(\d+) loaded, (\d+) new by design \(([^)]*)\), (\d+) missing, (\d+) skipped")


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run one command; -> {rc, seconds, peak_rss_gib, output}. The peak RSS is the largest of the process and
    the descendants it waited for (accelerate's worker), as the kernel counted it."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
    text = log.read_text()
    output = text[text.rfind(f"$ {' '.join(map(str, cmd))}"):]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}):\n{output[-4000:]}")
    return {"rc": proc.returncode, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "output": output}


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def disk_gib(path: Path) -> float:
    return disk_bytes(path) / 2**30


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def release_memory() -> None:
    """Hand freed heap back to the system (glibc keeps it after many mid-sized tensors), so this process does not
    sit on the fabrication's gigabytes while the commands run."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def seed_model_for_shrunk(work: Path, overrides: list[str]):
    """The shrunk paper model whose shapes the fabricated folder takes (a small random VAE stands in for the
    release's while it is built; wav2vec2 from the config's sizes)."""
    from diffusers import AutoencoderKL

    from singer.config import load_config
    from singer.models.singer import SingerModel

    vae = work / "seed-vae"
    AutoencoderKL(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  sample_size=64).save_pretrained(vae)
    cfg = load_config(work / "params.yaml", preset="paper",
                      overrides=overrides + [f"model.autoencoder_path={vae}", "model.audio_encoder_path=null"])
    model = SingerModel.build(cfg.model, cfg.crop.resolution)
    shutil.rmtree(vae)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the project is rehearsed (default: a "
                        "temporary folder, removed afterwards unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the fabricated release")
    parser.add_argument("--shrink", action="store_true", help="every width shrunk (benchmarks/fabricate.py)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--motion-frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--inference-steps", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=None, help="a project folder whose data/ to reuse")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import fabricate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="singer-rehearsal-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_WAIT_POLICY": "PASSIVE",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_RUN_ID", None)
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    singer = [str(BIN / "singer")]
    size = [f"crop.resolution={args.resolution}", f"model.num_frames={args.frames}",
            f"model.motion_frames={args.motion_frames}"]
    shrunk = fabricate.shrunk_paper_overrides("pretrained_models", args.resolution, args.frames) if args.shrink else []
    sets = [a for o in (["preset=paper"] + size + shrunk) for a in ("-S", o)]
    result: dict = {"shrink": args.shrink, "resolution": args.resolution, "frames": args.frames,
                    "motion_frames": args.motion_frames, "steps": args.steps, "inference_steps": args.inference_steps,
                    "workdir": str(work) if args.workdir else None, "commands": {}, "disk_gib": {}}
    commands = result["commands"]

    def note(name: str, measured: dict) -> dict:
        commands[name] = {k: v for k, v in measured.items() if k != "output"}
        print(f"  {name}: {measured['seconds']} s, peak RSS {measured['peak_rss_gib']} GiB", flush=True)
        return measured

    try:
        # 1. corpus
        if args.corpus:
            shutil.copytree(args.corpus / "data", work / "data", symlinks=True)
        else:
            started = time.perf_counter()
            run(singer + ["synth", "--out", "data/raw", "--subjects", "3", "--seconds", "4.2", "--size", "192",
                          "--no-progress"], work, env, log)
            for stage in ("ingest", "clip", "crop", "split"):
                run(singer + [stage, "--no-progress"] + sets, work, env, log)
            commands["corpus"] = {"seconds": round(time.perf_counter() - started, 1)}

        # 2. the fabricated release
        release = work / "pretrained_models"
        started = time.perf_counter()
        if args.shrink:
            sizes = fabricate.fabricate_from_model(release, seed_model_for_shrunk(work, shrunk + size))
        else:
            sizes = fabricate.fabricate_released(release)
        # in this process (its peak so far is the fabrication's: the corpus stages ran as children)
        commands["fabricate"] = {"seconds": round(time.perf_counter() - started, 1),
                                 "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        release_memory()
        result["fabricated_files_gib"] = {k: round(v / 2**30, 3) for k, v in sizes.items()}
        result["disk_gib"]["fabricated"] = round(disk_gib(release), 2)

        # 3. convert
        note("convert", run(singer + ["convert", "--pretrained", "pretrained_models", "--out",
                                      "pretrained_models/converted", "--dtype", "keep"], work, env, log))
        converted = json.loads((release / "converted/convert_report.json").read_text())
        result["convert"] = {c: v["num_keys"] for c, v in converted["components"].items()}
        result["disk_gib"]["converted"] = round(disk_gib(release / "converted"), 2)
        if not args.keep:  # the UNets live in converted/ now
            for name in ("hallo/net.pth", "motion_module/mm_sd_v15_v2.ckpt"):
                (release / name).unlink()

        # 4. train
        train_sets = sets + [a for o in ("model.pretrained=pretrained_models/converted", f"train.steps={args.steps}",
                                         f"train.checkpoint_every={args.steps}", "train.validate_every=0",
                                         "train.batch_size=1", "train.keep_last=1",
                                         f"tracking.log_model={str(args.shrink).lower()}") for a in ("-S", o)]
        trained = note("train", run(singer + ["train", "--profile", "cpu"] + train_sets, work, env, log))
        counts = SUMMARY.search(trained["output"])
        if counts is None:
            raise RuntimeError("the training log has no pretrained summary line:\n" + trained["output"][-3000:])
        result["tensors"] = {"loaded": int(counts[1]), "new_by_design": int(counts[2]), "new_groups": counts[3],
                             "missing": int(counts[4]), "skipped": int(counts[5])}
        metrics = json.loads((work / "metrics/train.json").read_text())
        step_dir = sorted((work / "checkpoints").glob(f"full-*/step-{args.steps:06d}"))[-1]
        manifest = json.loads((step_dir / "manifest.json").read_text())
        trainable_bytes = metrics["trainable_parameters"] * 4
        result["checkpoint"] = {
            "folder_bytes": disk_bytes(step_dir),
            "model_safetensors_bytes": disk_bytes(step_dir / "model.safetensors"),
            "optimizer_bytes": disk_bytes(step_dir / "optimizer.bin"),
            "trainable_parameters": metrics["trainable_parameters"],
            "trainable_bytes": trainable_bytes, "saved_bytes": manifest["saved_bytes"],
            "saved_tensors": len(manifest["saved"]), "frozen_from_pretrained": manifest["frozen_from_pretrained"],
            "pretrained_sha256": manifest["pretrained"]["sha256"],
        }
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        history = sorted(client.get_metric_history(metrics["mlflow_run_id"], "loss"), key=lambda m: m.step)
        gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(history, history[1:])]
        result["seconds_per_step"] = round(sorted(gaps)[len(gaps) // 2], 2) if gaps else metrics["seconds"]
        result["train_seconds_in_loop"] = metrics["seconds"]
        result["final_loss"] = metrics["final_loss"]
        result["disk_gib"]["model_dir"] = round(disk_gib(work / "models/full"), 2)

        # 5. generate one window
        seconds = args.frames / 25
        run([sys.executable, "-m", "singer.demo", "--out", "inputs", "--seconds", f"{seconds}"], work, env, log)
        gen = ["generate", "--image", "inputs/portrait.png", "--audio", "inputs/song.wav", "--steps",
               str(args.inference_steps), "--no-progress"]
        note("generate", run(singer + gen + ["--output", "trained.mp4", "--model", "models/full"], work, env, log))
        if args.shrink:
            note("generate_pretrained", run(singer + gen + ["--output", "pretrained.mp4", "--pretrained",
                                                            "pretrained_models/converted"] + sets, work, env, log))
        result["generated"] = {"frames": args.frames, "seconds_per_frame": round(
            commands["generate"]["seconds"] / args.frames, 2)}
    finally:
        result["disk_gib"]["workdir_at_end"] = round(disk_gib(work), 2)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    peak = max(c.get("peak_rss_gib", 0) for c in commands.values())
    result["peak_rss_gib"] = peak
    ck = result["checkpoint"]
    rows = [("widths", "shrunk" if args.shrink else "full (2.4 B-parameter UNets)"),
            ("size", f"{args.resolution}^2, {args.frames}+{args.motion_frames} frames, batch 1"),
            ("tensors", f"{result['tensors']['loaded']} loaded, {result['tensors']['new_by_design']} new by design "
                        f"({result['tensors']['new_groups']}), {result['tensors']['missing']} missing"),
            ("peak RSS", ", ".join(f"{k} {v['peak_rss_gib']} GiB" for k, v in commands.items() if "peak_rss_gib" in v)),
            ("seconds per step", f"{result['seconds_per_step']} s (train {commands['train']['seconds']} s in all)"),
            ("checkpoint", f"{gib(ck['folder_bytes'])} on disk: weights {gib(ck['model_safetensors_bytes'])}, "
                           f"optimizer {gib(ck['optimizer_bytes'])}; trainable parameters "
                           f"{gib(ck['trainable_bytes'])} fp32 (+ Adam's two moments: {gib(3 * ck['trainable_bytes'])})"),
            ("generate", f"{commands['generate']['seconds']} s for one {args.frames}-frame window at "
                         f"{args.inference_steps} steps (model load included)"),
            ("whole model", f"{result['disk_gib']['model_dir']} GiB (save_pretrained, fp32): what every "
                            f"checkpoint held before"),
            ("disk", ", ".join(f"{k} {v} GiB" for k, v in result["disk_gib"].items()))]
    name = "paper_rehearsal" + ("-shrunk" if args.shrink else "")
    report(name, rows, result, out=args.out)
    return result


if __name__ == "__main__":
    main()
