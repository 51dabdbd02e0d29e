"""Stage `split`: train/test lists of crop clips, divided by subject so no person is on both sides.

    singer split             # paths.crops -> paths.split/{train,test}.txt + split.json, params split.*

Subjects are shuffled with `split.seed` and the first round(n * test_fraction) go to test, kept within
[1, n - 1] so neither side is empty: the share of test subjects is the k / n nearest to test_fraction that
whole subjects allow (within 1 / (2n) of it unless a side would be empty), which is what the split suite in
`validate.py` accepts. The split is by subject, so the clip ratio follows the subjects' clip counts rather
than being exact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from singer.config import Config
from singer.data.common import StageError, write_stats
from singer.io import atomic_dir, write_json_atomic, write_text_atomic


def split_subjects(subjects: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded subject-level split -> (train_subjects, test_subjects), both sorted."""
    unique = sorted(set(subjects))
    if len(unique) < 2:
        raise StageError(f"split: need at least 2 subjects for a subject-disjoint split, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = min(len(unique) - 1, max(1, int(round(len(unique) * test_fraction))))
    test = sorted(unique[i] for i in order[:n_test])
    train = sorted(unique[i] for i in order[n_test:])
    return train, test


def run_split(cfg: Config, progress: bool = True) -> dict:
    manifest_path = cfg.paths.crops / "manifest.parquet"
    if not manifest_path.exists():
        raise StageError(f"split: {manifest_path} not found; run `singer crop` first")
    clips = pd.read_parquet(manifest_path)
    if clips.empty:
        raise StageError("split: the crop manifest has no clips")
    train_subjects, test_subjects = split_subjects(clips["subject"].tolist(), cfg.split.test_fraction, cfg.split.seed)
    train = sorted(clips.loc[clips["subject"].isin(train_subjects), "clip_id"])
    test = sorted(clips.loc[clips["subject"].isin(test_subjects), "clip_id"])
    with atomic_dir(cfg.paths.split) as out:
        write_text_atomic(out / "train.txt", "".join(f"{c}\n" for c in train))
        write_text_atomic(out / "test.txt", "".join(f"{c}\n" for c in test))
        write_json_atomic(out / "split.json", {"train_subjects": train_subjects, "test_subjects": test_subjects,
                                               "seed": cfg.split.seed, "test_fraction": cfg.split.test_fraction})
    stats = {
        "n_train_clips": len(train),
        "n_test_clips": len(test),
        "n_train_subjects": len(train_subjects),
        "n_test_subjects": len(test_subjects),
        "test_clip_fraction": round(len(test) / max(1, len(train) + len(test)), 4),
    }
    write_stats(cfg.paths.metrics, "split", stats)
    return stats


def read_split(cfg: Config) -> dict[str, list[str]]:
    """{'train': [...clip ids], 'test': [...]} as written by `run_split`."""
    return {side: (cfg.paths.split / f"{side}.txt").read_text().split() for side in ("train", "test")}
