"""What every data stage shares: its error type, rejection records and its stats file."""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from singer.io import write_json_atomic, write_jsonl_atomic


class StageError(RuntimeError):
    """A stage cannot produce a usable output (e.g. every input was rejected). The CLI exits non-zero."""


@dataclass
class Rejections:
    """Everything a stage drops, with the reason; written as `rejected.jsonl` beside the stage output."""

    stage: str
    rows: list[dict] = field(default_factory=list)

    def add(self, item: str, reason: str, **extra) -> None:
        self.rows.append({"stage": self.stage, "item": str(item), "reason": reason, **extra})

    def reasons(self) -> dict[str, int]:
        # group "decoding failed after 12 frames (...)" and friends by their leading words
        return dict(collections.Counter(reason_kind(r["reason"]) for r in self.rows))

    def write(self, path: Path) -> Path:
        return write_jsonl_atomic(path, self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def reason_kind(reason: str) -> str:
    """The stable part of a reason, for histograms: text before the first digit, colon or bracket."""
    return re.split(r"[\d(:\[]", reason, maxsplit=1)[0].strip() or reason


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class StepTimer:
    """``lap(step)`` adds the seconds since the previous lap (or since construction) to ``profile[step]``: where
    one item's time goes, summed over the items of a stage (``metrics/<stage>.json`` ``profile_seconds``)."""

    def __init__(self, profile: dict[str, float]):
        self.profile = profile
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.profile[step] = self.profile.get(step, 0.0) + now - self.last
        self.last = now


def write_stats(metrics_dir: Path, stage: str, stats: dict) -> Path:
    """`metrics/<stage>.json`, declared as DVC metrics (`dvc metrics show`)."""
    return write_json_atomic(Path(metrics_dir) / f"{stage}.json", stats)


def slug(text: str) -> str:
    """A file-name-safe id fragment."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"
