"""Atomic, resumable training checkpoints written through `accelerator.save_state`.

    clean_stale(accelerator, ckpt_dir)                       # at start (resume() does it too)
    state = resume(accelerator, ckpt_dir)                    # None on a fresh start, else trainer_state
    start = state["step"] if state else 0
    ...
    path = save_checkpoint(accelerator, ckpt_dir, step, extra={"epoch": e, "samples_seen": n,
                                                               "mlflow_run_id": run_id}, keep_last=3)

Layout of `checkpoints_dir`:

    step-000050/            a whole checkpoint: what save_state writes (model.safetensors, optimizer.bin,
                            scheduler.bin, random_states_<rank>.pkl, custom_checkpoint_<i>.pkl, ...),
                            trainer_state.json, and COMPLETE (JSON: step, size and sha256 of every file)
    .tmp-step-000055/       a checkpoint being written (or left by a crash): never read, removed on start

Every process calls `save_checkpoint` (save_state writes each rank's RNG state, and under DDP the ranks
must meet at the barriers). The folder is built under `.tmp-step-N`, the main process writes
`trainer_state.json` and the `COMPLETE` marker into it after all ranks are done, fsyncs, and renames it to
`step-N`, so a `step-*` folder only ever appears whole. `latest_checkpoint` still checks the marker and
every file's size, so a folder copied in half or truncated later is skipped for an older one.

What save_state holds: the models, optimizers and schedulers passed through `accelerator.prepare`, the
samplers of prepared dataloaders, the grad scaler, the RNG states of every rank (python, numpy, torch,
cuda), and objects given to `accelerator.register_for_checkpointing` (an lr scheduler that was NOT passed
through `prepare` must be registered, or it is silently not saved; do not do both). Frozen modules that
were not prepared are not saved (they come from the pretrained weights).

Every rank must see the same `checkpoints_dir` (one machine, or a shared filesystem on several nodes):
the ranks write their RNG states into the folder that the main process renames.

Slim checkpoints (a model built on released weights, `model.pretrained`): `keep_only(accelerator, names)` makes
save_state write only those tensors of the model (the trainable ones, and any not loaded from the release), and
`manifest.json` (`save_checkpoint(..., manifest=...)`) says which they are and cites the release by the sha256 of its
files. `resume(..., manifest=...)` checks that manifest against the run's before loading anything
(`CheckpointMismatchError` names what differs) and then loads the partial state. A checkpoint without a manifest
holds the whole model and loads as it always did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from singer.io import write_json_atomic

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{int(step):06d}"


def _sha256(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
        os.fsync(fh.fileno())  # the bytes are on disk before the marker says they are
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def _write_marker(folder: Path, step: int, num_processes: int) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    marker = {
        "step": int(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_processes": int(num_processes),
        "files": files,
    }
    write_json_atomic(folder / MARKER, marker)
    _fsync_dir(folder)


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The COMPLETE marker of a checkpoint folder, or None when it is missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or "step" not in marker or not isinstance(marker.get("files"), dict):
        return None
    return marker


def is_complete(folder: str | os.PathLike, verify: str = "size") -> bool:
    """A folder is a whole checkpoint when its marker lists every file with the size (or, with
    `verify="sha256"`, the checksum) that the folder has now."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return False
    for rel, meta in marker["files"].items():
        path = folder / rel
        try:
            if path.stat().st_size != meta["size"]:
                return False
            if verify == "sha256" and _sha256(path) != meta["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    out = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            out.append((int(match.group(1)), child))
    return sorted(out)


def list_checkpoints(checkpoints_dir: str | os.PathLike, verify: str = "size") -> list[Path]:
    """Whole checkpoints, oldest first (incomplete folders and `.tmp-*` left out)."""
    return [p for _, p in _step_dirs(Path(checkpoints_dir)) if is_complete(p, verify)]


def latest_checkpoint(checkpoints_dir: str | os.PathLike, verify: str = "size") -> Path | None:
    """The newest whole checkpoint, or None. A folder without its marker, or whose files no longer match
    the marker (truncated, missing), is skipped with a warning, and the next older one is taken."""
    for _, path in reversed(_step_dirs(Path(checkpoints_dir))):
        if is_complete(path, verify):
            return path
        log.warning("skipping incomplete checkpoint %s (no COMPLETE marker or files do not match it)", path)
    return None


def clean_stale(accelerator, checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Remove `.tmp-*` folders left by an interrupted save (main process), then meet the other ranks."""
    removed: list[Path] = []
    checkpoints_dir = Path(checkpoints_dir)
    if accelerator.is_main_process and checkpoints_dir.is_dir():
        for child in checkpoints_dir.iterdir():
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                removed.append(child)
        if removed:
            log.warning(
                "removed %d interrupted checkpoint folder(s): %s", len(removed), [p.name for p in removed]
            )
    accelerator.wait_for_everyone()
    return removed


def prune(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete whole checkpoints older than the newest `keep_last` (main process only). Returns what went."""
    if keep_last is None or keep_last <= 0:
        return []
    complete = list_checkpoints(checkpoints_dir)
    doomed = complete[:-keep_last]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


class CheckpointMismatchError(ValueError):
    """A checkpoint that was written by another configuration of frozen weights or trainable parameters."""


_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def _plain(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def keep_only(accelerator, names: set[str] | list[str]):
    """From now on `save_state` writes only these tensors of the models' state dicts (names without the DDP
    `module.` prefix); the optimizer, schedulers and RNG states are saved whole. Returns the hook's handle."""
    keep = set(names)

    def hook(models, weights, output_dir):
        for state in weights:
            for key in [k for k in state if _plain(k) not in keep]:
                del state[key]

    return accelerator.register_save_state_pre_hook(hook)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _saved_keys(folder: Path) -> set[str] | None:
    file = folder / "model.safetensors"
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return {_plain(k) for k in fh.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)


def check_manifest(folder: str | os.PathLike, expected: dict) -> dict | None:
    """Compare a checkpoint's manifest with this run's (`expected`); raise `CheckpointMismatchError` naming what
    differs: the release's files (sha256), the trainable parameters, the saved tensors. Returns the checkpoint's
    manifest (None: an older checkpoint that holds the whole model)."""
    folder = Path(folder)
    found = read_manifest(folder)
    if found is None:
        return None
    was, now = found.get("pretrained") or {}, expected.get("pretrained") or {}
    if was.get("sha256") != now.get("sha256"):
        files = sorted(set(was.get("files", {})) | set(now.get("files", {})))
        differ = [f for f in files if was.get("files", {}).get(f) != now.get("files", {}).get(f)]
        raise CheckpointMismatchError(
            f"checkpoint {folder} was trained on the released weights in {was.get('path')} (sha256 "
            f"{str(was.get('sha256'))[:12]}) but model.pretrained is now {now.get('path')} (sha256 "
            f"{str(now.get('sha256'))[:12]}; files that differ: {', '.join(differ[:5]) or 'all'}): point "
            f"model.pretrained at the same files, or move {folder.parent} away to start afresh")
    for what in ("trainable", "saved"):
        if found.get(what) != expected.get(what):
            a, b = set(found.get(what) or []), set(expected.get(what) or [])
            gone, extra = sorted(a - b)[:3], sorted(b - a)[:3]
            raise CheckpointMismatchError(
                f"checkpoint {folder} has other {what} tensors than this run (only in the checkpoint: {gone}; only "
                f"in this run: {extra}): train.trainable or the model changed; move {folder.parent} away to start "
                f"afresh")
    saved = found.get("saved")
    if isinstance(saved, list):
        keys = _saved_keys(folder)
        if keys is not None and keys != set(saved):
            raise CheckpointMismatchError(f"checkpoint {folder}: model.safetensors holds {len(keys)} tensors, its "
                                          f"manifest lists {len(saved)}; the checkpoint is damaged")
    return found


def save_checkpoint(
    accelerator,
    checkpoints_dir: str | os.PathLike,
    step: int,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = 3,
    manifest: dict | None = None,
) -> Path:
    """Save the accelerator's state as `checkpoints_dir/step-<step>` atomically; call on every process.

    `extra` goes to `trainer_state.json` together with `step` (e.g. epoch, samples_seen, mlflow_run_id), `manifest`
    (what the checkpoint holds, see the module doc) to `manifest.json`. The main process prunes to the newest `keep_last` whole checkpoints (None or 0: keep all).
    Returns the final folder (on every rank).
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's RNG file is written

    if accelerator.is_main_process:
        state = {"step": int(step), "num_processes": int(accelerator.num_processes)}
        state.update(extra or {})
        state["step"] = int(step)
        write_json_atomic(tmp / TRAINER_STATE, state)
        if manifest is not None:
            write_json_atomic(tmp / MANIFEST, manifest)
        _write_marker(tmp, step, accelerator.num_processes)
        if final.exists():  # saving the same step again (e.g. after a resume): the new one wins
            old = checkpoints_dir / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(checkpoints_dir)
        pruned = prune(checkpoints_dir, keep_last) if keep_last else []
        if pruned:
            log.info("pruned checkpoints %s", [p.name for p in pruned])
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint (at least `step`, taken from the marker when the file is absent)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        state = {}
    if "step" not in state:
        marker = read_marker(folder) or {}
        state["step"] = int(marker.get("step", 0))
    state.setdefault("checkpoint", str(folder))
    return state


def resume(
    accelerator, checkpoints_dir: str | os.PathLike, path: str | os.PathLike | None = None,
    manifest: dict | None = None,
) -> dict | None:
    """Remove stale `.tmp-*` folders, then load the newest whole checkpoint (or `path`) into the
    accelerator (models, optimizers, schedulers, registered objects, RNG states) on every rank.

    Returns its trainer state (`step`, whatever `extra` held, `checkpoint`: the folder), or None when
    there is nothing to resume from. Call after `accelerator.prepare(...)` and any
    `register_for_checkpointing(...)`, on every process. With `manifest` (this run's), the checkpoint's is checked
    first (`check_manifest`); a slim checkpoint then fills in only the tensors it holds.
    """
    clean_stale(accelerator, checkpoints_dir)
    folder = Path(path) if path is not None else latest_checkpoint(checkpoints_dir)
    if folder is None:
        return None
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no valid {MARKER} marker)")
    found = check_manifest(folder, manifest) if manifest is not None else read_manifest(folder)
    if found is not None and isinstance(found.get("saved"), list):
        accelerator.load_state(str(folder), strict=False)  # the rest is the release's, loaded at build
    else:
        accelerator.load_state(str(folder))
    state = read_trainer_state(folder)
    state["checkpoint"] = str(folder)
    log.info("resumed from %s (step %s)", folder, state["step"])
    return state
