"""Does the paper's claim hold under the paper's protocol? MSM and SFM ablated two ways on the corpus whose mouth
width follows the vowel, 3 seeds per arm, with paired differences per seed.

    python benchmarks/protocols.py --protocol scratch --seeds 0 1 2             # 4 arms, each from scratch
    python benchmarks/protocols.py --protocol two_stage --seeds 0 1 2           # the paper's: base, then 4 arms
    python benchmarks/protocols.py --protocol scratch two_stage --arms full --seeds 0 --controls shuffled
    python benchmarks/protocols.py --report-only                                # the tables from the ledger
    python benchmarks/protocols.py --synth-seed 0 --work benchmarks/results/spectral-dev ...   # budget choice

Protocols (arms: full = MSM + SFM, no_msm, no_sfm, no_both):
- `scratch`: every arm trains the whole model from scratch (learning.yaml's budget).
- `two_stage` (paper section 4.1): stage 1 is the scratch protocol's `no_both` run of `protocol.base.seed`, the
  "Hallo" of this scale. Stage 2 loads it (`model.pretrained`), freezes its UNets and face encoder and trains only
  `protocol.finetune.trainable` (the audio encoder, the audio projection and the arm's own MSM / SFM, which start
  as exact identities) for `protocol.finetune.steps` at `protocol.finetune.lr`. One base for every seed; the seed
  sets the data order and the noise, so the arms of one seed are paired (same base, same batches).

Budgets: `benchmarks/spectral.yaml`, merged over params.yaml after learning.yaml. Every run is evaluated on the
held-out singers with its own song (`none`) and, where asked, the `shuffled` control (another clip's song).

Resuming: every finished run is written to the ledger (`<work>-ledger/<protocol>-<arm>-s<seed>.json`,
committed): its metrics per control, training time, the sha256 of its weights and, for stage 2, of the base it
started from. A later invocation skips what the ledger holds for the same parameters; a run whose model is gone
(another machine) is retrained only when an evaluation is still missing. A base retrained on another machine
that differs from the ledger's is reported (`base_sha256` per run), since its arms would not be paired.

Output: the table (mean ± sample std over seeds), the paired differences (mean ± std over seeds of the per-seed
difference, beside the seed spread), `benchmarks/results/<name>.json` (default `spectral`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import learning  # noqa: E402  (the learning benchmark's runner: data stages, overrides, file names)

ARMS = ["full", "no_msm", "no_sfm", "no_both"]
PROTOCOLS = ["scratch", "two_stage"]
METRICS = ["mouth_correlation", "mouth_width_correlation", "lmd", "identity", "ssim", "psnr"]
# the effect of a module = the arm with it minus the arm without it, the other module held fixed
PAIRS = {
    "MSM, with SFM (full - no_msm)": ("full", "no_msm"),
    "MSM, without SFM (no_sfm - no_both)": ("no_sfm", "no_both"),
    "SFM, with MSM (full - no_sfm)": ("full", "no_sfm"),
    "SFM, without MSM (no_msm - no_both)": ("no_msm", "no_both"),
    "both (full - no_both)": ("full", "no_both"),
}


def load_spec(path: Path) -> tuple[dict, dict]:
    """-> (params: params.yaml <- learning.yaml <- the spec without `protocol`, the spec's `protocol`)."""
    from singer.config import deep_merge

    spec = yaml.safe_load(path.read_text()) or {}
    protocol = spec.pop("protocol")
    return deep_merge(learning.project_params(HERE / "learning.yaml"), spec), protocol


def run_dir(protocol: str, arm: str, seed: int) -> Path:
    return Path("runs") / f"{protocol}-{arm}-s{seed}"


def weights_sha256(models: Path) -> str | None:
    """sha256 over a saved model's safetensors (names and bytes); None when there is no model."""
    files = sorted(models.rglob("*.safetensors")) if models.exists() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(models).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def params_digest(params: dict, protocol_spec: dict | None) -> str:
    """What a ledger entry was made with: the merged parameters and the synthesizer's code (+ stage 2's spec)."""
    payload = {"params": params, "synth_code": learning.synth_code(), "protocol": protocol_spec}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_overrides(protocol: str, arm: str, seed: int, work: Path, spec: dict) -> list[str]:
    out = learning.run_overrides(run_dir(protocol, arm, seed), arm, seed)
    if protocol == "two_stage":
        ft, base = spec["finetune"], spec["base"]
        base_models = work / run_dir("scratch", base["variant"], base["seed"]) / "models" / base["variant"]
        out += ["-S", f"model.pretrained={base_models}", "-S", f"train.trainable=[{','.join(ft['trainable'])}]",
                "-S", f"train.steps={int(ft['steps'])}", "-S", f"train.lr={float(ft['lr'])}"]
    return out


class Ledger:
    """One JSON per finished run under `folder` (committed, so a new machine resumes from it)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, protocol: str, arm: str, seed: int) -> Path:
        return self.folder / f"{protocol}-{arm}-s{seed}.json"

    def get(self, protocol: str, arm: str, seed: int, digest: str | None = None) -> dict | None:
        path = self.path(protocol, arm, seed)
        if not path.exists():
            return None
        entry = json.loads(path.read_text())
        return entry if digest is None or entry.get("digest") == digest else None

    def put(self, entry: dict) -> None:
        from singer.io import write_json_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(entry["protocol"], entry["arm"], entry["seed"]), entry)


class Runner:
    def __init__(self, work: Path, params: dict, spec: dict, ledger: Ledger):
        self.work, self.params, self.spec, self.ledger = work, params, spec, ledger
        self.log = work / "commands.log"

    def digest(self, protocol: str) -> str:
        return params_digest(self.params, self.spec if protocol == "two_stage" else None)

    def stamp(self, protocol: str, arm: str, seed: int) -> Path:
        """The digest a run folder's model was trained with (written once its training finished)."""
        return self.work / run_dir(protocol, arm, seed) / "digest.txt"

    def trained(self, protocol: str, arm: str, seed: int) -> bool:
        """A finished training of these parameters is on disk (not one of another budget in the same folder)."""
        stamp = self.stamp(protocol, arm, seed)
        return stamp.exists() and stamp.read_text().strip() == self.digest(protocol) and \
            (self.work / learning.train_json(run_dir(protocol, arm, seed), arm)).exists() and \
            any(self.models(protocol, arm, seed).rglob("*.safetensors"))

    def models(self, protocol: str, arm: str, seed: int) -> Path:
        return self.work / run_dir(protocol, arm, seed) / "models" / arm

    def base(self) -> tuple[str, str]:
        """The stage-1 model, trained (or retrained) when absent -> (its sha256, a note)."""
        b = self.spec["base"]
        if not self.trained("scratch", b["variant"], b["seed"]):
            self.train("scratch", b["variant"], b["seed"])
        sha = weights_sha256(self.models("scratch", b["variant"], b["seed"]))
        known = self.ledger.get("scratch", b["variant"], b["seed"], self.digest("scratch"))
        note = "" if known is None or known.get("model_sha256") in (None, sha) else (
            f"the base was retrained and differs from the ledger's ({known['model_sha256'][:12]})")
        return sha, note

    def train(self, protocol: str, arm: str, seed: int) -> float:
        """`singer train` into an emptied run folder (no evaluation of other weights survives in it); an
        interrupted run still resumes from its newest whole checkpoint, which lives under checkpoints/."""
        folder = self.work / run_dir(protocol, arm, seed)
        if folder.exists():
            shutil.rmtree(folder)
        seconds = learning.singer(["train", *train_overrides(protocol, arm, seed, self.work, self.spec)],
                                  self.work, self.log)
        self.stamp(protocol, arm, seed).write_text(self.digest(protocol) + "\n")
        return seconds

    def run(self, protocol: str, arm: str, seed: int, controls: list[str]) -> dict:
        """Train (when needed) and evaluate one arm and seed; returns its ledger entry."""
        digest = self.digest(protocol)
        entry = self.ledger.get(protocol, arm, seed, digest) or {
            "protocol": protocol, "arm": arm, "seed": seed, "digest": digest, "evals": {}}
        missing = [c for c in controls if c not in entry["evals"]]
        if not missing:
            return entry
        base_sha, note = self.base() if protocol == "two_stage" else (None, "")
        if not self.trained(protocol, arm, seed):
            self.train(protocol, arm, seed)
            entry["evals"] = {}  # a retrained model: the old evaluations were of other weights
            missing = list(controls)
        folder = run_dir(protocol, arm, seed)
        trained = json.loads((self.work / learning.train_json(folder, arm)).read_text())
        entry.update({"train_seconds": trained.get("seconds"), "steps": trained.get("steps"),
                      "trainable_parameters": trained.get("trainable_parameters"),
                      "model_sha256": weights_sha256(self.models(protocol, arm, seed))})
        if protocol == "two_stage":
            entry.update({"base_sha256": base_sha, "base_note": note})
        for control in missing:
            path = self.work / learning.eval_json(folder, arm, control)
            if not path.exists():
                learning.singer(["evaluate", "--no-progress", *learning.eval_overrides(folder, arm, seed, control)],
                                self.work, self.log)
            result = json.loads(path.read_text())
            entry["evals"][control] = {**{m: result.get(m) for m in METRICS}, "n_clips": result.get("n_clips"),
                                       "unavailable": {m: r for m, r in (result.get("unavailable") or {}).items()
                                                       if m in METRICS}}
        self.ledger.put(entry)
        return entry


def table(ledger: Ledger, digests: dict[str, str], seeds: list[int]) -> dict:
    """{protocol: {arm/control: {metric: spread}}} and the per-seed values, from the ledger only."""
    out: dict = {}
    for protocol in PROTOCOLS:
        rows: dict = {}
        for arm in ARMS:
            entries = [e for s in seeds if (e := ledger.get(protocol, arm, s, digests[protocol]))]
            for control in sorted({c for e in entries for c in e["evals"]}):
                have = [e for e in entries if control in e["evals"]]
                rows[f"{arm}/{control}"] = {
                    **{m: learning.spread([e["evals"][control][m] for e in have]) for m in METRICS},
                    "seeds": [e["seed"] for e in have],
                    "train_seconds": learning.spread([e.get("train_seconds") for e in have]),
                    "trainable_parameters": have[0].get("trainable_parameters") if have else None,
                    "base_sha256": sorted({e["base_sha256"] for e in have if e.get("base_sha256")}),
                }
        if rows:
            out[protocol] = rows
    return out


def paired(ledger: Ledger, digests: dict[str, str], seeds: list[int], control: str = "none") -> dict:
    """{protocol: {pair: {metric: spread of (a - b) over the seeds where both ran}}}."""
    out: dict = {}
    for protocol in PROTOCOLS:
        rows = {}
        for name, (a, b) in PAIRS.items():
            diffs: dict[str, list[float]] = {m: [] for m in METRICS}
            for s in seeds:
                ea, eb = ledger.get(protocol, a, s, digests[protocol]), ledger.get(protocol, b, s, digests[protocol])
                if not ea or not eb or control not in ea["evals"] or control not in eb["evals"]:
                    continue
                for m in METRICS:
                    va, vb = ea["evals"][control][m], eb["evals"][control][m]
                    if va is not None and vb is not None:
                        diffs[m].append(va - vb)
            if any(diffs.values()):
                rows[name] = {m: learning.spread(v) for m, v in diffs.items()}
        if rows:
            out[protocol] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=HERE / "spectral.yaml")
    parser.add_argument("--work", type=Path, default=HERE / "results" / "spectral")
    parser.add_argument("--ledger", type=Path, default=None, help="default: <work>-ledger")
    parser.add_argument("--synth-seed", type=int, default=None, help="another corpus (0: the development one)")
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=PROTOCOLS)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controls", nargs="+", choices=learning.CONTROLS, default=["none"])
    parser.add_argument("--name", default=None, help="results name (default: spectral, or <work's name>)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    from common import report

    work = args.work.resolve()
    ledger = Ledger((args.ledger or work.with_name(work.name + "-ledger")).resolve())
    params, spec = load_spec(args.params)
    if args.synth_seed is not None:
        params["synth"] = {**params["synth"], "seed": args.synth_seed}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runner = Runner(work, params, spec, ledger)
    if not args.report_only:
        learning.prepare_data(work, params, work / "commands.log")
        for protocol in args.protocol:
            for seed in args.seeds:
                for arm in args.arms:
                    entry = runner.run(protocol, arm, seed, args.controls)
                    print(f"{protocol} {arm} s{seed}: " + ", ".join(
                        f"{c} mouth r {e['mouth_correlation']}, width r {e['mouth_width_correlation']}"
                        for c, e in entry["evals"].items()), flush=True)

    digests = {p: runner.digest(p) for p in PROTOCOLS}
    seeds = sorted({json.loads(f.read_text())["seed"] for f in ledger.folder.glob("*.json")}) or args.seeds
    tables, pairs = table(ledger, digests, seeds), paired(ledger, digests, seeds)
    gt_identity = learning.truth_identity(work) if (work / "data/split/test.txt").exists() else None
    rows = []
    for protocol, t in tables.items():
        for key, row in t.items():
            rows.append((f"{protocol} {key}", "  ".join(f"{m} {learning.fmt(row[m])}" for m in METRICS)))
    for protocol, p in pairs.items():
        for name, row in p.items():
            rows.append((f"{protocol} paired {name}",
                         "  ".join(f"{m} {learning.fmt(row[m])} (n {row[m]['n']})" for m in METRICS)))
    name = args.name or ("spectral" if work.name == "spectral" else work.name)
    report(name, rows or [("ledger", "empty")],
           {"tables": tables, "paired": pairs, "ground_truth_identity": gt_identity, "seeds": seeds,
            "digests": digests, "params": yaml.safe_load(args.params.read_text()),
            "synth_seed": params["synth"]["seed"], "synth_code": learning.synth_code(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})


if __name__ == "__main__":
    main()
