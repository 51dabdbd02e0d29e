"""Stage `ingest`: find source videos, probe each one, keep the usable ones, say why the rest were dropped.

    singer ingest            # reads params.yaml: paths.raw + ingest.sources -> paths.ingested

Sources: `paths.raw` (tracked by data.dvc) and `ingest.sources` (more local folders, or `s3://bucket/prefix`
downloaded with boto3 into `<paths.ingested>/../.s3-cache/`). The subject of a video is the first folder
under its source root (`raw/<subject>/<take>.mp4`), or the file stem for a file at the root.
Sidecars travel with a video: `<take>.truth.json` (synthetic ground truth) and `<take>.vocals.wav`.

Output (`paths.ingested`, swapped in atomically):
    videos/<id><ext>   the accepted files (hard links when possible), sidecars as <id>.truth.json, <id>.vocals.wav
    manifest.parquet   one row per accepted video (see MANIFEST_COLUMNS)
    rejected.jsonl     one row per rejected file with its reason
Stats go to `metrics/ingest.json`. Exit is non-zero only when nothing usable is left.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from singer.config import Config
from singer.data.common import Rejections, StageError, Timer, slug, write_stats
from singer.io import atomic_dir, file_sha256, write_parquet_atomic
from singer.media import MediaError, probe, read_audio

MANIFEST_COLUMNS = [
    "id", "subject", "source", "file", "sha256", "bytes", "duration_s", "fps", "n_frames", "width", "height",
    "video_codec", "audio_sr", "audio_channels", "vfr", "truth", "vocals",
]
SIDECARS = {"truth": ".truth.json", "vocals": ".vocals.wav"}


@dataclass(frozen=True)
class Candidate:
    path: Path       # local file to read
    source: str      # where it came from (local path or s3:// URI), for reports
    subject: str



def _subject_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else path.stem


def find_candidates(root: Path, extensions: list[str], source_prefix: str | None = None) -> list[Candidate]:
    """Every file under `root` with a video extension, sorted for determinism."""
    exts = {e.lower() for e in extensions}
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in exts:
            rel = path.relative_to(root).as_posix()
            source = f"{source_prefix.rstrip('/')}/{rel}" if source_prefix else str(path)
            found.append(Candidate(path, source, _subject_of(path, root)))
    return found


def gather_sources(cfg: Config) -> list[Candidate]:
    candidates: list[Candidate] = []
    roots = [str(cfg.paths.raw), *cfg.ingest.sources]
    for root in roots:
        if root.startswith("s3://"):
            from singer.storage import download_prefix  # boto3 only when S3 is used

            cache = cfg.paths.ingested.parent / ".s3-cache" / slug(root.removeprefix("s3://"))
            download_prefix(root, cache)
            candidates += find_candidates(cache, cfg.ingest.extensions, source_prefix=root)
        else:
            path = Path(root)
            if not path.exists():
                raise StageError(f"ingest source {root} does not exist")
            candidates += find_candidates(path, cfg.ingest.extensions)
    return candidates


def check_video(path: Path, cfg: Config) -> dict:
    """Probe one file; return its manifest fields, or raise MediaError with the reason it is unusable."""
    size = path.stat().st_size
    if size == 0:
        raise MediaError("zero bytes")
    if size > cfg.ingest.max_bytes:
        raise MediaError(f"file too large ({size} bytes > ingest.max_bytes)")
    info = probe(path)
    if not info.has_audio:
        raise MediaError("no audio stream")
    if info.fps < cfg.ingest.min_fps:
        raise MediaError(f"frame rate too low ({info.fps:.2f} fps < {cfg.ingest.min_fps})")
    if info.duration_s + 1e-3 < cfg.ingest.min_duration_s:
        raise MediaError(f"shorter than one clip ({info.duration_s:.2f} s < {cfg.ingest.min_duration_s} s)")
    audio, rate = read_audio(path, sample_rate=None)  # catches a broken audio stream now, not mid-clip
    if len(audio) / rate + 0.5 < min(info.duration_s, cfg.ingest.min_duration_s):
        raise MediaError(f"audio shorter than video ({len(audio) / rate:.2f} s)")
    return {k: v for k, v in info.as_dict().items() if k != "path"}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_ingest(cfg: Config, progress: bool = True) -> dict:
    rejections = Rejections("ingest")
    rows: list[dict] = []
    seen: dict[str, str] = {}
    with Timer() as timer, atomic_dir(cfg.paths.ingested) as out:
        candidates = gather_sources(cfg)
        for cand in tqdm(candidates, desc="ingest", unit="file", disable=not progress):
            try:
                digest = file_sha256(cand.path)
                if digest in seen:
                    rejections.add(cand.source, f"duplicate of {seen[digest]} (same sha256)", sha256=digest)
                    continue
                fields = check_video(cand.path, cfg)
            except MediaError as exc:
                rejections.add(cand.source, str(exc))
                continue
            except OSError as exc:  # unreadable file: permissions, vanished, I/O error
                rejections.add(cand.source, f"unreadable ({exc.strerror or exc})")
                continue
            video_id = f"{slug(cand.subject)}_{digest[:10]}"
            seen[digest] = video_id
            file = f"videos/{video_id}{cand.path.suffix.lower()}"
            _link_or_copy(cand.path, out / file)
            sidecars = {}
            for key, suffix in SIDECARS.items():
                side = cand.path.with_name(cand.path.stem + suffix)
                sidecars[key] = ""
                if side.exists():
                    sidecars[key] = f"videos/{video_id}{suffix}"
                    _link_or_copy(side, out / sidecars[key])
            rows.append({"id": video_id, "subject": cand.subject, "source": cand.source, "file": file,
                         "sha256": digest, **fields, **sidecars})
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_parquet_atomic(out / "manifest.parquet", manifest)
        rejections.write(out / "rejected.jsonl")
    stats = {
        "n_candidates": len(candidates),
        "n_accepted": len(rows),
        "n_rejected": len(rejections),
        "n_subjects": int(manifest["subject"].nunique()) if rows else 0,
        "total_duration_s": round(float(manifest["duration_s"].sum()), 3) if rows else 0.0,
        "rejected_reasons": rejections.reasons(),
        "seconds": round(timer.seconds, 3),
    }
    write_stats(cfg.paths.metrics, "ingest", stats)
    if not rows:
        raise StageError(
            f"ingest: no usable video among {len(candidates)} candidate files; "
            f"reasons in {cfg.paths.ingested / 'rejected.jsonl'}"
        )
    return stats
