"""Pipeline tests: `dvc repro` runs the data stages through the CLI; a second repro does nothing; a changed
parameter reruns only what depends on it; a stage with nothing usable exits non-zero with one clear line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(cwd / ".dvc-site-cache")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def repo(tmp_path):
    """A throwaway copy of the project: git + DVC, the pipeline files and the code the stages depend on."""
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "singer", tmp_path / "singer", ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    return tmp_path


@pytest.mark.slow
def test_repro_runs_the_data_stages_then_does_nothing(repo):
    run(["singer", "synth", "--out", "data/raw", "--subjects", "3", "--seconds", "4.2", "--size", "192",
         "--no-progress"], repo)
    first = run(["dvc", "repro", "split"], repo)
    for stage in ("ingest", "clip", "crop", "split"):
        assert f"Running stage '{stage}'" in first.stdout
        assert (repo / f"reports/{stage}.validation.md").read_text().startswith(f"# Validation of `{stage}`: PASSED")
    train = (repo / "data/split/train.txt").read_text().split()
    test = (repo / "data/split/test.txt").read_text().split()
    crops = pd.read_parquet(repo / "data/crops/manifest.parquet").set_index("clip_id")
    assert len(train) + len(test) == len(crops) == 6  # 3 subjects x two 2-s clips
    assert not set(crops.loc[train, "subject"]) & set(crops.loc[test, "subject"])

    again = run(["dvc", "repro", "split"], repo)
    assert "Running stage" not in again.stdout and "didn't change" in again.stdout

    old = (repo / "params.yaml").read_text()
    params = old.replace("split:\n  test_fraction: 0.2         # 4:1 by subject\n  seed: 0",
                            "split:\n  test_fraction: 0.2         # 4:1 by subject\n  seed: 7")
    assert params != old
    (repo / "params.yaml").write_text(params)
    changed = run(["dvc", "repro", "split"], repo)
    assert "Running stage 'split'" in changed.stdout
    assert "Running stage 'crop'" not in changed.stdout and "Running stage 'ingest'" not in changed.stdout


@pytest.mark.slow
def test_stage_with_nothing_usable_exits_non_zero_with_one_line(repo):
    (repo / "data/raw").mkdir(parents=True)
    (repo / "data/raw/empty.mp4").write_bytes(b"")
    proc = run(["singer", "ingest", "--no-progress"], repo, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no usable video among 1 candidate" in proc.stderr
