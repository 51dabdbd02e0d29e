"""A throwaway git + DVC copy of the project for tests that run `dvc repro` on the session's tiny corpus.

    repo = make_project(tiny_project, tmp_path / "repo", {"train": {"steps": 2}})
    run(["dvc", "repro", "evaluate"], repo)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com"}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` with the venv's tools first on PATH, the project's own MLflow store and no inherited run."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(cwd / ".dvc-site-cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           **GIT_IDENTITY}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_project(tiny_project: Path, repo: Path, params_update: dict[str, dict]) -> Path:
    """`repo`: dvc.yaml, the code, the corpus of `tiny_project` and params.yaml with `params_update` merged
    per section; git and DVC initialised, the data stages' outputs recorded (not rerun: their reports and
    counts are not what these tests are about)."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("singer", "infra"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_project / "data", repo / "data")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in params_update.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    for stage in ("ingest", "clip", "crop", "split"):
        for path in (f"reports/{stage}.validation.json", f"reports/{stage}.validation.md", f"metrics/{stage}.json"):
            (repo / path).parent.mkdir(exist_ok=True)
            if not (repo / path).exists():
                (repo / path).write_text("{}\n")
    run(["dvc", "commit", "-f", "-q", "ingest", "clip", "crop", "split"], repo)
    return repo
