"""`singer evaluate` (singer.evaluate.runner / report): outputs, unavailable metrics, serial == Ray, MLflow."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pandas as pd
import pytest

OVERRIDES = ["evaluate.inference_steps=2", "evaluate.identity_max_frames=2", "evaluate.cpbd_every=10",
             "evaluate.max_clips=2", "evaluate.sample_videos=1"]


def _config(extra=()):
    from singer.config import load_config

    return load_config(overrides=[*OVERRIDES, *extra])


@pytest.fixture
def eval_project(project_copy, monkeypatch):
    """project_copy with a fresh tiny model in models/full and no FVD/LSE weights in the environment."""
    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    monkeypatch.delenv("SINGER_I3D_PATH", raising=False)
    monkeypatch.delenv("SINGER_SYNCNET_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = _config()
    SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution), cfg.crop.resolution).save_pretrained(
        project_copy / "models" / "full")
    return project_copy


@pytest.fixture(scope="module")
def serial_result(tiny_project, tmp_path_factory):
    """One serial evaluation of the tiny project (shared by the output checks)."""
    import shutil

    from singer.models.singer import SingerModel
    from singer.pipeline import SingerPipeline

    dest = tmp_path_factory.mktemp("evalproj") / "project"
    shutil.copytree(tiny_project, dest, symlinks=True)
    mp = pytest.MonkeyPatch()
    mp.chdir(dest)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{dest / 'mlflow.db'}")
    for var in ("MLFLOW_RUN_ID", "SINGER_I3D_PATH", "SINGER_SYNCNET_PATH", "RAY_ADDRESS"):
        mp.delenv(var, raising=False)
    try:
        from singer.evaluate.runner import run_evaluate

        cfg = _config(["evaluate.num_workers=0"])
        SingerPipeline.from_model(SingerModel.build(cfg.model, cfg.crop.resolution),
                                  cfg.crop.resolution).save_pretrained(dest / "models" / "full")
        (dest / "metrics").mkdir(exist_ok=True)
        (dest / "metrics" / "train.json").write_text(json.dumps({"mlflow_run_id": "abc123",
                                                                  "model_dir": "models/full"}))
        summary = run_evaluate(cfg, progress=False)
        yield dest, cfg, summary
    finally:
        mp.undo()


PER_CLIP = ["ssim", "psnr", "cpbd", "lmd", "diversity", "bas", "identity", "mouth_correlation",
            "mouth_width_correlation", "LSE-D", "LSE-C"]


def test_outputs_exist_and_agree(serial_result):
    root, cfg, summary = serial_result
    out = root / "eval"
    df = pd.read_parquet(out / "per_clip.parquet")
    test_ids = (root / "data/split/test.txt").read_text().split()[:2]
    assert df["clip_id"].tolist() == test_ids
    assert set(df["subject"]) and all(df["subject"].astype(str).str.len() > 0)
    for m in PER_CLIP:
        assert {m, f"{m}_status", f"{m}_reason"} <= set(df.columns), m
    for m in ["ssim", "psnr", "cpbd"]:  # always computable on two same-shaped videos
        assert (df[f"{m}_status"] == "ok").all() and np.isfinite(df[m]).all()

    ev = json.loads((root / "metrics" / "eval.json").read_text())
    assert ev["n_clips"] == 2 and ev == {k: summary[k] for k in ev}
    for m in PER_CLIP:
        ok = df[m][df[f"{m}_status"] == "ok"]
        if len(ok):
            assert ev[m] == pytest.approx(float(ok.mean())), m
            assert m not in ev["unavailable"]
        else:
            assert ev[m] is None and ev["unavailable"][m]

    curves = pd.read_csv(out / "plots" / "mouth_curves.csv")
    assert list(curves.columns) == ["clip_id", "frame", "generated", "truth"]
    for cid in test_ids:
        c = curves[curves["clip_id"] == cid]
        assert len(c) == int(df.set_index("clip_id").loc[cid, "n_frames"]) == 50
        assert np.isfinite(c["truth"]).all()  # the synthetic corpus knows its mouth opening
    assert (df["truth_source"] == "truth.json").all() and (df["width_truth_source"] == "truth.json").all()
    pm = pd.read_csv(out / "plots" / "per_metric.csv")
    assert {"ssim", "psnr"} <= set(pm["metric"])
    for png in ("mouth_curves.png", "per_metric.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    samples = sorted((out / "samples").glob("*.mp4"))
    assert [p.stem for p in samples] == test_ids[:1]
    from singer.media import read_frames

    frames, _ = read_frames(samples[0])  # reference | ground truth | generated, 64^2 panels shown at 256^2
    assert frames.shape[:3] == (50, 256, 3 * 256)
    assert samples[0].with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # its mouth-opening plot
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporaries


def test_unavailable_metrics_carry_reasons_never_numbers(serial_result):
    root, _, summary = serial_result
    df = pd.read_parquet(root / "eval" / "per_clip.parquet")
    ev = json.loads((root / "metrics" / "eval.json").read_text())
    for m in ("fvd", "LSE-D", "LSE-C"):
        assert ev[m] is None
        assert isinstance(ev["unavailable"][m], str) and ev["unavailable"][m]
    assert "I3D" in ev["unavailable"]["fvd"] or "SINGER_I3D_PATH" in ev["unavailable"]["fvd"]
    for m in ("LSE-D", "LSE-C"):
        assert (df[f"{m}_status"] == "unavailable").all()
        assert df[m].isna().all()
        assert df[f"{m}_reason"].str.len().gt(0).all()
    # JSON null, not NaN
    assert "NaN" not in (root / "metrics" / "eval.json").read_text()


def test_mlflow_run_has_table_metrics_and_training_link(serial_result):
    import mlflow

    root, _, summary = serial_result
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.tags["stage"] == "evaluate" and run.info.run_name == "evaluate-full"
    assert run.data.tags["train_run_id"] == "abc123"
    assert run.data.metrics["ssim"] == pytest.approx(summary["ssim"])
    assert run.data.metrics["n_clips"] == 2
    assert "fvd" not in run.data.metrics and "unavailable.fvd" in run.data.tags
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval", "plots", "samples", "metrics"} <= top
    ev = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "eval/per_clip.json" in ev
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/mouth_curves.png", "plots/per_metric.png"} <= plots


def test_unknown_metric_and_missing_model_fail_clearly(eval_project):
    from singer.evaluate.runner import run_evaluate

    with pytest.raises(ValueError, match="unknown evaluate.metrics"):
        run_evaluate(_config(["evaluate.metrics=[ssim,bogus]"]), progress=False)
    with pytest.raises(FileNotFoundError, match="no saved model"):
        run_evaluate(_config(["evaluate.num_workers=0", "evaluate.model_dir=models/none"]), progress=False)


@pytest.mark.slow
def test_ray_parallel_equals_serial(serial_result, tmp_path, monkeypatch):
    """Same seeds -> the same per-clip values with 2 Ray actors as in-process."""
    import ray

    from singer.evaluate.runner import run_evaluate

    root, _, _ = serial_result
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    serial = pd.read_parquet(root / "eval" / "per_clip.parquet")
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("HOME", ray_tmp)  # token auth writes ~/.ray/auth_token
    # off in every Ray of this file: after a token-auth session, a later one in the same process lost its
    # actors (Ray 2.60), and under another HOME its GCS could not load the token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "HOME": ray_tmp}})
    try:
        run_evaluate(_config(["evaluate.num_workers=2", "evaluate.out_dir=eval_ray", "evaluate.sample_videos=0"]),
                     progress=False)
    finally:
        ray.shutdown()
    parallel = pd.read_parquet(root / "eval_ray" / "per_clip.parquet")
    pd.testing.assert_frame_equal(serial, parallel)
    a = pd.read_csv(root / "eval" / "plots" / "mouth_curves.csv")
    b = pd.read_csv(root / "eval_ray" / "plots" / "mouth_curves.csv")
    pd.testing.assert_frame_equal(a, b)


def test_shuffled_partner_prefers_another_subject():
    from singer.evaluate.runner import shuffled_partner

    clips = [{"index": i, "clip_id": f"c{i}", "subject": s} for i, s in enumerate("aabbc")]
    partners = [shuffled_partner(clips, i) for i in range(len(clips))]
    assert partners == ["c2", "c2", "c4", "c4", "c0"]
    assert all(p != c["clip_id"] for p, c in zip(partners, clips))
    same = [{"index": i, "clip_id": f"c{i}", "subject": "a"} for i in range(3)]
    assert [shuffled_partner(same, i) for i in range(3)] == ["c1", "c2", "c0"]  # one subject: the next clip


def test_audio_controls_drive_generation_with_other_or_no_audio(eval_project):
    from singer.evaluate.runner import ClipEvaluator, test_clips

    cfg = _config(["evaluate.audio_control=shuffled", "evaluate.metrics=[ssim]"])
    clips = test_clips(cfg)
    evaluator = ClipEvaluator(cfg)
    own = evaluator._read(clips[0]["clip_id"])[2]
    # the partner clip's encoder audio: its vocals.wav where the clip stage separated them (as Hallo's encoder)
    partner = evaluator._read(clips[0]["audio_from"])[0].encoder_audio(clips[0]["audio_from"])
    assert clips[0]["audio_from"] != clips[0]["clip_id"]
    driving = evaluator._driving_audio(clips[0], own)
    assert len(driving) == len(own)
    m = min(len(own), len(partner))
    np.testing.assert_array_equal(driving[:m], partner[:m])
    assert not np.array_equal(driving, own)

    silent = ClipEvaluator(_config(["evaluate.audio_control=silent", "evaluate.metrics=[ssim]"]))
    assert not silent._driving_audio(clips[0], own).any()
    plain = ClipEvaluator(_config(["evaluate.metrics=[ssim]"]))
    np.testing.assert_array_equal(plain._driving_audio(clips[0], own), own)


def test_single_local_clip_runs_in_process(eval_project, monkeypatch):
    """One clip and no RAY_ADDRESS: no Ray cluster is started for it (the demo's ablation scores one clip)."""
    import singer.evaluate.fanout as fanout
    import singer.evaluate.runner as runner

    def no_ray(_workers):
        raise AssertionError("Ray started for a single local clip")

    monkeypatch.setattr(fanout, "_init_ray", no_ray)
    cfg = _config(["evaluate.num_workers=2", "evaluate.metrics=[ssim,psnr]"])
    clips = runner.test_clips(cfg)[:1]
    stats: dict = {}
    rows = runner.run_clips(cfg, clips, progress=False, stats=stats)
    assert [r["clip_id"] for r in rows] == [clips[0]["clip_id"]] and rows[0]["results"]["ssim"]["status"] == "ok"
    assert stats["mode"] == "in-process" and stats["seconds"] >= stats["load_seconds"] > 0
    assert rows[0]["worker"]["end"] >= rows[0]["worker"]["start"] and rows[0]["worker"]["cpu_seconds"] > 0
    # with RAY_ADDRESS set the clip goes to the cluster, whatever its count
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(AssertionError, match="Ray started"):
        runner.run_clips(cfg, clips, progress=False)


def test_numba_warm_up_thread_hands_its_error_to_join(monkeypatch):
    """The driver's librosa warm-up runs in a thread alongside ray.init; its failure is not lost."""
    import singer.evaluate.metrics.bas as bas
    from singer.evaluate.fanout import _WarmUp

    def broken():
        raise RuntimeError("numba cache corrupt")

    monkeypatch.setattr(bas, "warm_up", broken)
    warm = _WarmUp(True)
    with pytest.raises(RuntimeError, match="numba cache corrupt"):
        warm.join()
    _WarmUp(False).join()  # not needed: nothing runs, nothing raises


@pytest.mark.slow
def test_local_ray_workers_run_at_the_drivers_priority(monkeypatch):
    """Ray's default worker niceness (15) makes local actors yield to everything else on the machine; the Ray
    the runner starts itself runs them at the driver's priority, with the worker environment."""
    import os
    import shutil

    import ray

    from singer.evaluate.fanout import NICENESS_VAR, _init_ray

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    for var in ("RAY_ADDRESS", NICENESS_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # see test_ray_parallel_equals_serial
    assert not ray.is_initialized()
    try:
        assert _init_ray(1) is True
        assert NICENESS_VAR not in os.environ  # set for the raylet only

        @ray.remote(num_cpus=1)
        def probe():
            return os.nice(0), os.environ.get("OMP_WAIT_POLICY")

        assert ray.get(probe.remote()) == (os.nice(0), "PASSIVE")
        assert _init_ray(1) is False  # already running: not ours to shut down
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_runner_started_ray_shares_the_clips_with_the_driver(eval_project, monkeypatch):
    """A local Ray the runner starts: the driver scores clips too (from ray.init on) and 1 actor the
    rest; the per-clip values are those of the serial run, whichever process scored a clip."""
    import os
    import shutil

    import ray

    from singer.evaluate import runner
    from singer.evaluate.report import per_clip_frame

    cfg = _config(["evaluate.metrics=[ssim,psnr,lmd,identity]", "evaluate.max_clips=3"])
    clips = runner.test_clips(cfg)
    assert len(clips) >= 2
    serial = runner.run_clips(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"num_workers": 0})}), clips, progress=False)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # see test_ray_parallel_equals_serial
    assert not ray.is_initialized()
    stats: dict = {}
    try:
        rows = runner.run_clips(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
            update={"num_workers": 2})}), clips, progress=False, stats=stats)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not ray.is_initialized()  # started here, shut down here
    assert stats["mode"] == "ray" and stats["driver_startup"]["pid"] == os.getpid()
    assert [r["index"] for r in rows] == [c["index"] for c in clips]
    by_driver = sum(r["worker"]["pid"] == os.getpid() for r in rows)
    assert by_driver == stats["driver_clips"] >= 1
    assert len(stats["startup"]) <= 1  # one actor (its start-up is not waited for when nothing is left)
    names = list(serial[0]["results"])
    pd.testing.assert_frame_equal(per_clip_frame(serial, names), per_clip_frame(rows, names))
