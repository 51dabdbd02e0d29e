"""`singer ablate`: the plan, the Table-3 report over seeds, stale runs, and `dvc repro ablate` for real
(two variants trained through `accelerate launch`, evaluated, nested MLflow runs, a second repro does nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from dvc_project import make_project, run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _config(overrides=()):
    from singer.config import load_config

    return load_config(ROOT / "params.yaml", overrides=list(overrides))


def test_plan_covers_variants_times_seeds_and_rejects_unknown():
    from singer.ablation import planned_runs

    runs = planned_runs(_config(["ablate.seeds=[0,1]"]))
    assert [r.name for r in runs] == ["full-s0", "full-s1", "no_msm-s0", "no_msm-s1", "no_sfm-s0", "no_sfm-s1",
                                      "no_both-s0", "no_both-s1"]
    with pytest.raises(ValueError, match="unknown variant"):
        planned_runs(_config(["ablate.variants=[full,no_attention]"]))


def test_run_overrides_give_every_variant_the_same_budget(tmp_path):
    from singer.ablation import AblationRun, run_overrides

    cfg = _config(["ablate.steps=7", "ablate.max_clips=2"])
    a = dict(o.split("=", 1) for o in run_overrides(cfg, AblationRun("full", 0), tmp_path / "a"))
    b = dict(o.split("=", 1) for o in run_overrides(cfg, AblationRun("no_both", 0), tmp_path / "b"))
    assert a["train.steps"] == b["train.steps"] == "7"
    assert a["evaluate.max_clips"] == b["evaluate.max_clips"] == "2"
    assert (a["train.variant"], b["train.variant"]) == ("full", "no_both")
    assert a["evaluate.model_dir"].endswith("models/full") and b["evaluate.model_dir"].endswith("models/no_both")
    # without ablate.steps the budget is train.steps
    unset = _config(["ablate.steps=null"])
    plain = dict(o.split("=", 1) for o in run_overrides(unset, AblationRun("no_sfm", 3), tmp_path))
    assert plain["train.steps"] == str(unset.train.steps) and plain["train.seed"] == "3"


def _fake_run(cfg, run, metrics: dict, unavailable: dict | None = None, loss: float = 0.3):
    """A finished run's folder as run_one leaves it (what the report reads)."""
    from singer.ablation import RUN_FILE, ablation_key, run_dir

    d = run_dir(cfg, run) / "metrics"
    d.mkdir(parents=True)
    prefix = "" if run.variant == "full" else f"{run.variant}-"
    (d / f"{prefix}eval.json").write_text(json.dumps({**metrics, "unavailable": unavailable or {}}))
    (d / f"{prefix}train.json").write_text(json.dumps({"final_loss": loss, "seconds": 1.0}))
    (run_dir(cfg, run) / RUN_FILE).write_text(json.dumps({"ablation_key": ablation_key(cfg)}))


def test_report_table_has_table3_shape_and_seed_spread(tmp_path, monkeypatch):
    from singer.ablation import AblationRun, aggregate, markdown_table

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = _config(["ablate.seeds=[0,1]", "ablate.variants=[full,no_msm]", "paths.metrics=metrics"])
    fvd_reason = {"fvd": "no I3D weights given"}
    _fake_run(cfg, AblationRun("full", 0), {"lmd": 2.0, "bas": 0.3, "diversity": 5.0, "fvd": None}, fvd_reason)
    _fake_run(cfg, AblationRun("full", 1), {"lmd": 4.0, "bas": 0.5, "diversity": 7.0, "fvd": None}, fvd_reason)
    _fake_run(cfg, AblationRun("no_msm", 0), {"lmd": 5.0, "bas": 0.2, "diversity": 6.0, "fvd": None}, fvd_reason)
    _fake_run(cfg, AblationRun("no_msm", 1), {"lmd": 5.0, "bas": 0.2, "diversity": 6.0, "fvd": None}, fvd_reason)

    result = aggregate(cfg)
    full = result["variants"]["full"]["metrics"]
    assert full["lmd"]["mean"] == pytest.approx(3.0)
    assert full["lmd"]["std"] == pytest.approx(2 ** 0.5)  # sample std of (2, 4)
    assert full["lmd"]["values"] == [2.0, 4.0]
    assert result["variants"]["no_msm"]["metrics"]["lmd"]["std"] == 0.0
    assert "fvd" not in full and "I3D" in result["variants"]["full"]["unavailable"]["fvd"]

    table = markdown_table(result)
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert header.split("|")[2:6] == [" Diversity↑ ", " BAS↑ ", " LMD↓ ", " FVD↓ "]
    rows = [line for line in table.splitlines() if line.startswith("| without") or line.startswith("| SINGER")]
    assert [r.split("|")[1].strip() for r in rows] == ["without MSM", "SINGER"]  # Table 3's row order
    assert "3.00 ± 1.41" in rows[1] and "n/a" in rows[1]
    assert "LMD: full beats all" in table and "BAS: full beats all" in table
    assert "Diversity: full does not beat" in table


def test_report_refuses_missing_and_stale_runs(tmp_path, monkeypatch):
    from singer.ablation import AblationError, AblationRun, aggregate

    monkeypatch.chdir(tmp_path)
    cfg = _config(["ablate.variants=[full]"])
    with pytest.raises(AblationError, match="full-s0 has no"):
        aggregate(cfg)
    _fake_run(cfg, AblationRun("full", 0), {"lmd": 1.0})
    assert aggregate(cfg)["variants"]["full"]["metrics"]["lmd"]["mean"] == 1.0
    changed = _config(["ablate.variants=[full]", "evaluate.inference_steps=3"])
    with pytest.raises(AblationError, match="other parameters"):
        aggregate(changed)


# -------------------------------------------------------------------------- the written report, checked


BAR_COLORS = {"full": (0x4C, 0x72, 0xB0), "other": (0xA0, 0xA0, 0xA0)}  # singer.ablation.report.bar_plot


def _number_close(cell: str, value: float) -> None:
    """A table cell written with d decimals is `value` to within half of the last digit."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    assert decimals >= 2 and abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12, (cell, value)


def _assert_report_is_the_runs(root: Path, cfg, result: dict, client=None, parent_id: str | None = None) -> None:
    """metrics/ablation.json (`result`), reports/ablation.{md,csv,png} and the parent MLflow run hold the
    numbers of the runs' own eval.json / train.json, read here from the run folders under `root`."""
    import pandas as pd
    from PIL import Image

    from singer.ablation import planned_runs, run_dir

    runs = planned_runs(cfg)
    variants = list(dict.fromkeys(r.variant for r in runs))
    assert list(result["variants"]) == variants
    columns = [c["metric"] for c in result["columns"]]
    expected_rows = []
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        prefix = "" if variant == "full" else f"{variant}-"
        evals = [json.loads((root / run_dir(cfg, r) / "metrics" / f"{prefix}eval.json").read_text()) for r in mine]
        trains = [json.loads((root / run_dir(cfg, r) / "metrics" / f"{prefix}train.json").read_text()) for r in mine]
        entry = result["variants"][variant]
        assert entry["seeds"] == [r.seed for r in mine]
        for metric in columns:
            values = [float(e[metric]) for e in evals if isinstance(e.get(metric), (int, float))]
            if not values:
                assert metric not in entry["metrics"] and metric in entry["unavailable"], (variant, metric)
                continue
            stat = entry["metrics"][metric]
            assert stat["values"] == values and stat["n"] == len(values), (variant, metric, stat)
            assert stat["mean"] == pytest.approx(float(np.mean(values)))
            assert stat["std"] == (pytest.approx(float(np.std(values, ddof=1))) if len(values) > 1 else None)
            expected_rows.append((variant, metric, stat["mean"]))
        assert entry["final_loss"]["values"] == [float(t["final_loss"]) for t in trains]
    assert expected_rows, "no metric at all in the runs"

    # the markdown table: one row per variant, its cells the means (n/a where unavailable)
    reports = root / cfg.paths.reports
    lines = (reports / "ablation.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| variant"))
    labels = [c.strip().rstrip("↑↓") for c in header.strip("|").split("|")[1:]]
    assert labels == [c["label"] for c in result["columns"]]
    rows = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in lines[lines.index(header) + 2:] if line.startswith("| ")}
    assert set(rows) == {result["variants"][v]["label"] for v in variants}
    for variant in variants:
        entry, cells = result["variants"][variant], rows[result["variants"][variant]["label"]]
        for metric, cell in zip(columns, cells, strict=True):
            if metric not in entry["metrics"]:
                assert cell == "n/a", (variant, metric, cell)
                continue
            stat = entry["metrics"][metric]
            mean, _, std = cell.partition(" ± ")
            _number_close(mean, stat["mean"])
            if stat["std"] is None:
                assert not std, (variant, metric, cell)
            else:
                _number_close(std, stat["std"])

    # the CSV behind the plot: the same means
    table = pd.read_csv(reports / "ablation.csv")
    assert [(r.variant, r.metric) for r in table.itertuples()] == [(v, m) for v, m, _ in expected_rows]
    assert table["mean"].to_numpy() == pytest.approx([x for _, _, x in expected_rows])

    # the plot: a PNG of one 3 x 3 inch panel per metric at 100 dpi (tight bounding box), with the full model's
    # bars in blue and the ablated variants' in grey
    n_panels = len(dict.fromkeys(m for _, m, _ in expected_rows))
    with Image.open(reports / "ablation.png") as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert abs(width - 300 * n_panels) <= 30 and abs(height - 300) <= 30, (image.size, n_panels)
    # each panel's bars left to right in the variants' order: the full model first
    order = [v for v in variants if any(row[0] == v for row in expected_rows)]
    for i in range(n_panels):
        panel = pixels[:, i * width // n_panels:(i + 1) * width // n_panels]
        xs = {}
        for name, rgb in BAR_COLORS.items():
            found = np.nonzero((panel == np.array(rgb)).all(axis=-1))[1]
            xs[name] = float(found.mean()) if found.size else None
        assert xs["full"] is not None, f"panel {i}: no bar of the full model"
        if len(order) > 1:
            assert order[0] == "full" and xs["other"] is not None and xs["full"] < xs["other"], (i, xs)

    # the parent MLflow run: every mean, as `<variant>.<metric>`
    if client is not None:
        parent = client.get_run(parent_id)
        logged = {k: v for k, v in parent.data.metrics.items() if "." in k}
        assert logged == pytest.approx({f"{v}.{m}": x for v, m, x in expected_rows})


def test_written_report_holds_the_runs_numbers(tmp_path, monkeypatch):
    import mlflow

    from singer.ablation import AblationRun, write_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = _config(["ablate.seeds=[0,1]", "ablate.variants=[full,no_msm]",
                   f"tracking.artifact_location={tmp_path / 'mlartifacts'}"])
    _fake_run(cfg, AblationRun("full", 0), {"lmd": 2.0, "ssim": 0.41234, "fvd": None}, {"fvd": "no I3D weights"}, 0.3)
    _fake_run(cfg, AblationRun("full", 1), {"lmd": 4.5, "ssim": 0.43}, {"fvd": "no I3D weights"}, 0.25)
    _fake_run(cfg, AblationRun("no_msm", 0), {"lmd": 5.0, "ssim": 0.2}, {"fvd": "no I3D weights"}, 0.5)
    _fake_run(cfg, AblationRun("no_msm", 1), {"lmd": 6.0, "ssim": 0.1}, {"fvd": "no I3D weights"}, 0.45)
    result = write_report(cfg)
    written = json.loads((tmp_path / "metrics" / "ablation.json").read_text())
    assert written == {k: v for k, v in result.items() if k != "mlflow_run_id"} and result["mlflow_run_id"]
    assert result["variants"]["full"]["metrics"]["lmd"]["mean"] == 3.25  # the numbers above, by hand
    assert result["variants"]["no_msm"]["metrics"]["ssim"]["values"] == [0.2, 0.1]
    assert result["variants"]["full"]["final_loss"]["values"] == [0.3, 0.25]
    _assert_report_is_the_runs(tmp_path, cfg, result, mlflow.MlflowClient(), result["mlflow_run_id"])
    assert "| SINGER | n/a | n/a | 3.25 ± 1.77 | n/a |" in (tmp_path / "reports" / "ablation.md").read_text()


# ------------------------------------------------------------------------------------ dvc repro ablate


@pytest.mark.slow
def test_dvc_repro_ablate_trains_evaluates_and_reports(tiny_project, tmp_path):
    repo = make_project(tiny_project, tmp_path / "repo", {
        "train": {"steps": 2, "batch_size": 1, "checkpoint_every": 2, "validate_every": 0},
        "evaluate": {"max_clips": 1, "inference_steps": 2, "identity_max_frames": 2, "cpbd_every": 10, "num_workers": 0},
        "ablate": {"variants": ["full", "no_both"], "seeds": [0], "sample_videos": 0, "steps": 2, "max_clips": 1,
                   "inference_steps": 2}})

    out = run(["dvc", "repro", "ablate"], repo)
    ran = [line for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert [r.split("'")[1] for r in ran] == ["ablate-run@full-0", "ablate-run@no_both-0", "ablate"]
    for name in ("full-s0", "no_both-s0"):
        run_dir = repo / "ablation" / name
        assert (run_dir / "run.json").exists() and (run_dir / "eval" / "per_clip.parquet").exists()
        assert (run_dir / "models" / name.split("-s")[0] / "model_index.json").exists()
    assert not list((repo / "ablation").glob("*.partial"))

    from singer.config import load_config

    result = json.loads((repo / "metrics" / "ablation.json").read_text())
    assert list(result["variants"]) == ["full", "no_both"]
    assert result["budget"]["steps"] == 2
    ssim = result["variants"]["full"]["metrics"]["ssim"]  # computed on the generated frames
    assert ssim["n"] == 1 and -1.0 <= ssim["mean"] <= 1.0
    repo_cfg = load_config(repo / "params.yaml")

    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "ablation.json" in shown

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("singer")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "ablate"]
    assert len(parents) == 1
    # the table, the CSV, the plot and the parent run's metrics hold the numbers of the runs' own files
    _assert_report_is_the_runs(repo, repo_cfg, result, client, parents[0].info.run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["ablate-full-s0", "ablate-no_both-s0"]
    for child in children:  # training and evaluation logged into the same child run: the runs' numbers
        name = child.info.run_name.removeprefix("ablate-")
        variant = name.split("-s")[0]
        prefix = "" if variant == "full" else f"{variant}-"
        metrics = repo / "ablation" / name / "metrics"
        evaluated = json.loads((metrics / f"{prefix}eval.json").read_text())
        trained = json.loads((metrics / f"{prefix}train.json").read_text())
        assert child.data.metrics["ssim"] == pytest.approx(evaluated["ssim"])
        assert child.data.metrics["final_loss"] == pytest.approx(trained["final_loss"])
        assert "loss" in child.data.metrics and np.isfinite(child.data.metrics["loss"])
    assert any(a.path == "ablation" for a in client.list_artifacts(parents[0].info.run_id))

    again = run(["dvc", "repro", "ablate"], repo)
    assert "Running stage" not in again.stdout
