"""The GPU benchmark stays runnable here: without CUDA it says so and exits 0; its code path runs on the CPU
with the tiny preset (so a GPU session does not discover a bug in it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_without_a_gpu_says_so():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_paper.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "no GPU" in done.stdout


@pytest.mark.slow
def test_gpu_benchmark_code_path_on_cpu(tmp_path):
    """--dry-run: the GPU run's whole path (fabricated release, convert, model.pretrained, a bf16 training step with
    FLOP counting, a guided generation) on the CPU at shrunk widths."""
    out = tmp_path / "dry.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_paper.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["pretrained"].endswith("0 missing, 0 skipped")
    assert result["train_step_seconds"] > 0 and result["train_step_flops"] > 0
    # Utilisation against the bf16 matmul is bounded by 1 on a GPU only: on a CPU a 1024^2 matmul is no ceiling
    # (the dry run's oneDNN convolutions measured 1.26 of it on an AMD EPYC without AMX, under load)
    peak = result["bf16_matmul_peak_tflops"] * 1e12
    assert result["flop_utilisation"] == pytest.approx(result["train_step_flops"] / result["train_step_seconds"] / peak)
    assert result["flop_utilisation"] > 0 and result["generation_seconds_per_frame"] > 0
    assert result["gradient_checkpointing"] == ["denoising_unet"] and result["guidance_scale"] != 1


def _benchmark_module(name: str):
    """benchmarks/<name>.py as a module (the folder on sys.path, as when it is run: protocols imports learning)."""
    import importlib.util

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_report_aggregates_over_seeds_from_the_runs_on_disk(tmp_path):
    learning = _benchmark_module("learning")

    def run(variant, seed, mouth_r, identity, seconds):
        run_dir = Path("runs") / f"{variant}-s{seed}"
        evaluation = tmp_path / learning.eval_json(run_dir, variant, "none")
        evaluation.parent.mkdir(parents=True)
        evaluation.write_text(json.dumps({"mouth_correlation": mouth_r, "identity": identity, "n_clips": 10,
                                          "unavailable": {"fvd": "no I3D weights"}}))
        trained = tmp_path / learning.train_json(run_dir, variant)
        trained.parent.mkdir(parents=True)
        trained.write_text(json.dumps({"seconds": seconds}))

    run("full", 0, 0.8, 0.90, 100.0)
    run("full", 1, 0.6, 0.92, 200.0)
    run("no_msm", 0, 0.5, 0.91, 150.0)  # seed 1 of no_msm never ran: its cells hold one value

    table = learning.collect(tmp_path, ["full", "no_msm"], [0, 1], ["none"])
    full, no_msm = table["full/none"], table["no_msm/none"]
    assert full["mouth_correlation"]["mean"] == pytest.approx(0.7)
    assert full["mouth_correlation"]["std"] == pytest.approx(0.02 ** 0.5)  # sample std over seeds
    assert full["train_seconds"]["mean"] == pytest.approx(150.0) and full["train_seconds"]["n"] == 2
    assert full["ssim"]["n"] == 0 and learning.fmt(full["ssim"]) == "n/a"
    assert full["unavailable"] == {}  # only the benchmark's metrics are carried
    assert no_msm["mouth_correlation"] == {"mean": 0.5, "std": None, "n": 1, "values": [0.5]}

    # identity 0.91 against ground truth 0.987 - 0.1; there is no shuffled run, so no shuffled target
    assert learning.targets(table, 0.987) == {"mouth_r >= 0.6": True, "identity >= 0.887": True}
    assert learning.targets(table, 1.2) == {"mouth_r >= 0.6": True, "identity >= 1.100": False}


def test_learning_samples_one_trained_model_several_ways_each_in_its_own_row():
    """`--sampling dpm_solver:5`: the same model evaluated again with that sampler and step count, into its own
    folders (never over learning.yaml's own evaluation) and its own table row."""
    learning = _benchmark_module("learning")
    run_dir = Path("runs") / "full-s0"
    assert learning.label("none", None) == "none" and learning.label("none", "dpm_solver:5") == "none@dpm_solver5"
    plain = learning.eval_overrides(run_dir, "full", 0, "none")
    fast = learning.eval_overrides(run_dir, "full", 0, "none", "dpm_solver:5")
    assert "evaluate.sampler=dpm_solver" in fast and "evaluate.inference_steps=5" in fast
    assert not any(o.startswith("evaluate.sampler") for o in plain)
    assert f"evaluate.out_dir={run_dir / 'eval-none@dpm_solver5'}" in fast
    assert f"evaluate.out_dir={run_dir / 'eval-none'}" in plain
    assert f"evaluate.model_dir={run_dir / 'models' / 'full'}" in fast  # the same trained model
    assert learning.eval_json(run_dir, "full", "none@dpm_solver5") == run_dir / "metrics-none@dpm_solver5/eval.json"


def test_protocols_stage_two_overrides_load_the_base_and_train_only_the_listed_groups(tmp_path):
    protocols = _benchmark_module("protocols")
    params, spec = protocols.load_spec(ROOT / "benchmarks/spectral.yaml")
    assert "protocol" not in params and params["synth"]["seed"] == 1  # learning.yaml's benchmark corpus
    assert "mouth_width_correlation" in params["evaluate"]["metrics"]
    scratch = protocols.train_overrides("scratch", "no_msm", 2, tmp_path, spec)
    assert not any(o.startswith(("model.pretrained", "train.trainable")) for o in scratch)
    assert "train.variant=no_msm" in scratch and "train.seed=2" in scratch
    staged = protocols.train_overrides("two_stage", "no_msm", 2, tmp_path, spec)
    base = tmp_path / "runs" / f"scratch-no_both-s{spec['base']['seed']}" / "models" / "no_both"
    assert f"model.pretrained={base}" in staged
    assert "train.trainable=[audio_encoder,audio_projection,msm,sfm]" in staged
    assert f"train.steps={spec['finetune']['steps']}" in staged and "train.seed=2" in staged
    # the digest moves with stage 2's budget, and only for stage 2
    other = {**spec, "finetune": {**spec["finetune"], "steps": 1}}
    assert protocols.params_digest(params, spec) != protocols.params_digest(params, other)
    assert protocols.params_digest(params, None) == protocols.params_digest(params, None)


def test_protocols_ledger_tables_and_paired_differences(tmp_path):
    """Paired differences are per seed (a - b of the same seed), not differences of the means; entries of
    other parameters (another digest) are ignored."""
    protocols = _benchmark_module("protocols")
    ledger = protocols.Ledger(tmp_path / "ledger")
    values = {("full", 0): 0.80, ("full", 1): 0.60, ("no_msm", 0): 0.70, ("no_msm", 1): 0.56, ("no_msm", 2): 0.9}
    for (arm, seed), r in values.items():
        ledger.put({"protocol": "two_stage", "arm": arm, "seed": seed, "digest": "d2", "train_seconds": 10.0,
                    "evals": {"none": {m: (r if m == "mouth_correlation" else 0.5) for m in protocols.METRICS}}})
    ledger.put({"protocol": "two_stage", "arm": "full", "seed": 2, "digest": "stale",
                "evals": {"none": {m: 9.0 for m in protocols.METRICS}}})
    assert ledger.get("two_stage", "full", 2, "d2") is None and ledger.get("two_stage", "full", 2)["digest"] == "stale"
    digests = {"scratch": "d1", "two_stage": "d2"}
    tables = protocols.table(ledger, digests, [0, 1, 2])
    assert list(tables) == ["two_stage"]
    assert tables["two_stage"]["full/none"]["mouth_correlation"]["values"] == [0.8, 0.6]
    assert tables["two_stage"]["no_msm/none"]["seeds"] == [0, 1, 2]
    pairs = protocols.paired(ledger, digests, [0, 1, 2])["two_stage"]
    msm = pairs["MSM, with SFM (full - no_msm)"]["mouth_correlation"]
    assert msm["n"] == 2 and msm["mean"] == pytest.approx(0.07) and msm["std"] == pytest.approx((0.03 ** 2 * 2) ** 0.5)
    assert pairs["MSM, with SFM (full - no_msm)"]["identity"]["mean"] == pytest.approx(0.0)
    assert "both (full - no_both)" not in pairs  # no no_both run
