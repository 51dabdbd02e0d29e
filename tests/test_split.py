"""The split stage: no subject on both sides, and the train/test ratio as close to `split.test_fraction` as
whole subjects allow, over many random corpora; its Great Expectations suite stops a split that leaks.

"Right" ratio: the split moves whole subjects, so with n subjects the share of test subjects can only be
k / n. A right split takes the k in [1, n - 1] (neither side empty) nearest to n * test_fraction; so it is
within 1 / (2n) of the target unless keeping both sides non-empty forces it further (5 subjects at 0.05:
1 of 5). Clips follow their subjects: the test clips are exactly the clips of the test subjects, so the clip
ratio is whatever those subjects' clip counts make it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from singer.config import load_config
from singer.data.common import StageError
from singer.data.split import read_split, run_split, split_subjects
from singer.data.validate import ValidationError, allowed_test_fractions, validate_stage

ROOT = Path(__file__).resolve().parents[1]


def random_corpus(rng: np.random.Generator, n_subjects: int) -> dict[str, int]:
    """{subject name: clip count}; names of mixed length and alphabet, so sorting is not the identity."""
    names: set[str] = set()
    while len(names) < n_subjects:
        names.add("".join(rng.choice(list(string.ascii_letters + string.digits + "_-"), rng.integers(1, 9))))
    return {name: int(rng.integers(1, 7)) for name in sorted(names, key=lambda _: rng.random())}


def nearest_counts(n: int, fraction: float) -> set[int]:
    """Every k in [1, n - 1] nearest to n * fraction (two at a tie), found by brute force."""
    distance = {k: abs(k - n * fraction) for k in range(1, n)}
    best = min(distance.values())
    return {k for k, d in distance.items() if d <= best + 1e-9}


def test_no_subject_on_both_sides_and_the_ratio_is_right_over_many_random_cases():
    rng = np.random.default_rng(20240611)
    fractions = [0.2, 0.5, 0.05, 0.95, 0.1, 0.25, 1 / 3]
    checked_far = 0
    for case in range(400):
        n = int(rng.integers(2, 41))
        fraction = fractions[case] if case < len(fractions) else float(rng.uniform(0.01, 0.99))
        seed = int(rng.integers(0, 2**31))
        corpus = random_corpus(rng, n)
        clips = [s for s, count in corpus.items() for _ in range(count)]  # one entry a clip, as run_split passes
        clips = [clips[i] for i in rng.permutation(len(clips))]
        train, test = split_subjects(clips, fraction, seed)
        what = f"case {case}: n={n} fraction={fraction:.3f} seed={seed}"

        assert not set(train) & set(test), what
        assert set(train) | set(test) == set(corpus), what  # nobody dropped, nobody invented
        assert len(train) + len(test) == n and train and test, what
        assert train == sorted(train) and test == sorted(test), what
        assert len(test) in nearest_counts(n, fraction), what
        if n * fraction >= 0.5 and n * (1 - fraction) >= 0.5:  # not pushed off by "neither side empty"
            assert abs(len(test) / n - fraction) <= 0.5 / n + 1e-9, what
        else:
            checked_far += 1
        lo, hi = allowed_test_fractions(n, fraction)  # what the Great Expectations suite accepts
        assert lo <= len(test) / n <= hi, what
        assert split_subjects(list(reversed(clips)), fraction, seed) == (train, test), what  # seeded, order-free
    assert checked_far >= 3  # the clamped cases were exercised, not only the easy ones


def test_the_shuffle_is_fair():
    """Over many seeds every subject lands in test about test_fraction of the time (a sorted or biased
    pick would always send the same subjects), and different seeds give different splits."""
    subjects = [f"subject_{i:03d}" for i in range(10)]
    counts = dict.fromkeys(subjects, 0)
    splits = set()
    for seed in range(2000):
        _, test = split_subjects(subjects, 0.2, seed)
        assert len(test) == 2
        splits.add(tuple(test))
        for s in test:
            counts[s] += 1
    shares = np.array(list(counts.values())) / 2000
    assert np.all(np.abs(shares - 0.2) < 0.04), counts
    assert len(splits) == 45  # every pair of 10 subjects came up


def test_one_subject_cannot_be_split():
    with pytest.raises(StageError, match="at least 2 subjects"):
        split_subjects(["only"] * 5, 0.2, 0)


def make_project(root: Path, corpus: dict[str, int], fraction: float, seed: int):
    """A crops manifest (only the columns split reads) and a config pointing at it, under `root`."""
    rows = [{"clip_id": f"{s}_{i:03d}", "subject": s} for s, count in corpus.items() for i in range(count)]
    crops = root / "data/crops"
    crops.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(crops / "manifest.parquet")
    return load_config(ROOT / "params.yaml", overrides=[f"split.test_fraction={fraction}", f"split.seed={seed}"])


@pytest.mark.parametrize("n, fraction, seed", [(5, 0.2, 0), (7, 0.5, 3), (5, 0.05, 1), (12, 0.3, 7), (2, 0.9, 2)])
def test_the_stage_writes_whole_subjects_and_its_suite_passes(n, fraction, seed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = random_corpus(np.random.default_rng(seed), n)
    cfg = make_project(tmp_path, corpus, fraction, seed)
    stats = run_split(cfg, progress=False)
    sides = read_split(cfg)
    saved = json.loads((cfg.paths.split / "split.json").read_text())
    train_subjects, test_subjects = split_subjects(list(corpus), fraction, seed)
    assert (saved["train_subjects"], saved["test_subjects"]) == (train_subjects, test_subjects)
    subject_of = {f"{s}_{i:03d}": s for s, count in corpus.items() for i in range(count)}
    assert sorted(sides["test"]) == sorted(c for c, s in subject_of.items() if s in test_subjects)
    assert sorted(sides["train"]) == sorted(c for c, s in subject_of.items() if s in train_subjects)
    n_test = sum(corpus[s] for s in test_subjects)
    assert stats["n_test_clips"] == n_test and stats["n_train_clips"] == len(subject_of) - n_test
    assert stats["test_clip_fraction"] == round(n_test / len(subject_of), 4)
    report = validate_stage("split", cfg)
    assert report["success"]
    checked = {r["kwargs"].get("column") for r in report["results"]}
    assert checked == {None, "subject", "n_sides", "test_subject_fraction", "n_clips_missing_from_crops",
                       "n_subjects_missing_from_split"}


LEAKS = ["subject_on_both_sides", "wrong_ratio", "clip_not_in_crops", "subject_left_out"]


@pytest.mark.parametrize("leak", LEAKS)
def test_a_hand_made_bad_split_fails_the_suite(leak, tmp_path, monkeypatch):
    """Start from a right split, spoil it by hand, and the split stage's suite must stop it, naming what broke."""
    monkeypatch.chdir(tmp_path)
    corpus = {f"subject_{i}": 3 for i in range(10)}
    cfg = make_project(tmp_path, corpus, 0.2, 0)
    run_split(cfg, progress=False)
    sides = read_split(cfg)
    test_subjects = json.loads((cfg.paths.split / "split.json").read_text())["test_subjects"]
    if leak == "subject_on_both_sides":  # one clip of a test subject moved to train: the subject is on both sides
        sides["train"].append(sides["test"].pop())
        broken = ["n_sides"]
    elif leak == "wrong_ratio":  # whole subjects, no leak, but 5 of 10 in test at test_fraction 0.2
        train_only = sorted({c.rsplit("_", 1)[0] for c in sides["train"]})[:3]
        moved = [c for c in sides["train"] if c.rsplit("_", 1)[0] in train_only]
        sides = {"train": [c for c in sides["train"] if c not in moved], "test": sides["test"] + moved}
        broken = ["test_subject_fraction"]
    elif leak == "clip_not_in_crops":
        sides["test"].append("somebody_else_000")
        broken = ["subject", "n_clips_missing_from_crops"]  # its subject is unknown, too
    else:  # a train subject silently dropped
        gone = sorted({c.rsplit("_", 1)[0] for c in sides["train"]} - set(test_subjects))[0]
        sides["train"] = [c for c in sides["train"] if not c.startswith(gone + "_")]
        broken = ["n_subjects_missing_from_split"]
    for side, ids in sides.items():
        (cfg.paths.split / f"{side}.txt").write_text("".join(f"{c}\n" for c in ids))
    with pytest.raises(ValidationError) as failed:
        validate_stage("split", cfg)
    report = json.loads((cfg.paths.reports / "split.validation.json").read_text())
    failing = sorted(r["kwargs"].get("column") for r in report["results"] if not r["success"])
    assert failing == sorted(broken), failing
    assert all(column in str(failed.value) for column in broken) and "**FAIL**" in (cfg.paths.reports / "split.validation.md").read_text()
