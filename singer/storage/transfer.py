"""Transfers with verification: checksums, uploads (multipart above a threshold), verified downloads.

    upload_file("clip.mp4", "s3://singer/raw/a/")                # -> ETag; key raw/a/clip.mp4
    upload_dir("data/raw", "s3://singer/raw", suffixes=[".mp4"]) # {key: ETag}; unchanged objects are skipped
    download_prefix("s3://singer/raw", "data/raw", suffixes=[".mp4"])

Downloads go to a temporary name next to the target and are renamed only once their size and checksum
match the object: the MD5 for single-part ETags, the `sha256` metadata that `upload_file` attaches, or the
multipart ETag recomputed for the usual part sizes. A file already present with the same size and checksum
is skipped, so an interrupted download resumes where it stopped and a half-written file is never kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from singer.io import file_sha256
from singer.storage.s3 import (
    StorageError,
    _client,
    _strip_etag,
    _transfer_errors,
    _wrap,
    list_objects,
    parse_s3_uri,
    s3_uri,
)

if TYPE_CHECKING:
    from singer.config import S3Config

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTI_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")


# -------------------------------------------------------------------------------------------- checksums


def file_md5(path: str | os.PathLike, chunk: int = 4 * MiB) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()



def multipart_etag(path: str | os.PathLike, part_size: int) -> str:
    """The ETag S3 gives an object uploaded in parts of `part_size`: md5(md5(part1)+md5(part2)+...)-N."""
    digests = []
    with open(path, "rb") as fh:
        while block := fh.read(part_size):
            digests.append(hashlib.md5(block, usedforsecurity=False).digest())
    if not digests:
        digests.append(hashlib.md5(b"", usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _part_size_candidates(size: int, parts: int, extra: Iterable[int] = ()) -> list[int]:
    out: list[int] = []
    for cand in [*extra, MULTIPART_CHUNKSIZE, 8 * MiB, 5 * MiB, 16 * MiB, 32 * MiB, 64 * MiB]:
        if cand > 0 and -(-size // cand) == parts and cand not in out:
            out.append(cand)
    if parts > 0:  # the per-part size rounded up to whole MiB (what many clients do)
        per_part = -(-size // parts)
        mib = -(-per_part // MiB) * MiB
        if mib > 0 and -(-size // mib) == parts and mib not in out:
            out.append(mib)
    return out


def verify_file(
    path: str | os.PathLike,
    size: int,
    etag: str | None,
    *,
    sha256: str | None = None,
    part_sizes: Iterable[int] = (),
) -> bool | None:
    """Does the local file match the object? True, False, or None when only the size could be checked."""
    path = Path(path)
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    etag = _strip_etag(etag)
    if _MD5_ETAG.match(etag):
        return file_md5(path) == etag
    if sha256:
        return file_sha256(path) == sha256.lower()
    multi = _MULTI_ETAG.match(etag)
    if multi:
        parts = int(multi.group(2))
        for part in _part_size_candidates(size, parts, part_sizes):
            if multipart_etag(path, part) == etag:
                return True
    return None


def _relative_keys(bucket: str, prefix: str, objects: list[dict]) -> list[tuple[dict, str]]:
    """(object, path relative to the prefix) for objects under the prefix taken as a folder.

    `s3://b/raw` matches `raw/...` (not `rawhide/...`) and the object `raw` itself (kept by its name).
    """
    out = []
    folder = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
    for obj in objects:
        key = obj["key"]
        if key.endswith("/"):
            continue  # a "folder" marker
        if prefix and not prefix.endswith("/") and key == prefix:
            rel = key.rsplit("/", 1)[-1]
        elif key.startswith(folder):
            rel = key[len(folder) :]
        else:
            continue
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise StorageError(f"refusing to download {s3_uri(bucket, key)}: unsafe relative path {rel!r}")
        out.append((obj, "/".join(parts)))
    return out


# ------------------------------------------------------------------------------------------- transfers


def transfer_config(
    threshold: int = MULTIPART_THRESHOLD, chunksize: int = MULTIPART_CHUNKSIZE, threads: int = 4
):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=chunksize,
        max_concurrency=threads,
        use_threads=threads > 1,
    )


def _head(client, bucket: str, key: str) -> dict:
    return client.head_object(Bucket=bucket, Key=key)


def download_prefix(
    uri: str,
    dest_dir: str | os.PathLike,
    suffixes: Iterable[str] | None = None,
    *,
    client=None,
    cfg: S3Config | None = None,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunksize: int = MULTIPART_CHUNKSIZE,
) -> list[Path]:
    """Mirror the objects under `uri` into `dest_dir` (same relative layout); return the local paths.

    Only keys ending in one of `suffixes` (case-insensitive) when given. Files already there with the
    same size and checksum are skipped; anything else is downloaded to a temporary name, verified, renamed.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    client = _client(client, cfg)
    dest_dir = Path(dest_dir)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    pairs = _relative_keys(bucket, prefix, list_objects(uri, client=client))
    if wanted:
        pairs = [(o, r) for o, r in pairs if r.lower().endswith(wanted)]
    tconfig = transfer_config(multipart_threshold, multipart_chunksize)
    paths: list[Path] = []
    fetched = skipped = 0
    for obj, rel in pairs:
        key, size, etag = obj["key"], obj["size"], obj["etag"]
        obj_uri = s3_uri(bucket, key)
        target = dest_dir / rel
        sha256 = None
        try:
            if not _MD5_ETAG.match(etag):  # multipart: the sha256 our uploads attach, if any
                sha256 = (_head(client, bucket, key).get("Metadata") or {}).get("sha256")
        except (ClientError, BotoCoreError) as exc:
            raise _wrap("reading metadata of", obj_uri, exc) from None
        if target.is_file() and verify_file(
            target, size, etag, sha256=sha256, part_sizes=[multipart_chunksize]
        ):
            paths.append(target)
            skipped += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target)
        tmp = target.with_name(f".{target.name}.part{os.getpid()}")
        try:
            try:
                client.download_file(bucket, key, str(tmp), Config=tconfig)
            except _transfer_errors() as exc:
                raise _wrap("downloading", obj_uri, exc) from None
            ok = verify_file(tmp, size, etag, sha256=sha256, part_sizes=[multipart_chunksize])
            if ok is False:
                got = tmp.stat().st_size if tmp.exists() else None
                raise StorageError(
                    f"downloading {obj_uri} failed: the local copy does not match the object "
                    f"(size {got} vs {size}, ETag {etag})"
                )
            if ok is None:
                log.warning("%s: multipart ETag %s not reproducible; size checked only", obj_uri, etag)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(target)
        fetched += 1
    log.info("%s -> %s: %d downloaded, %d already present", uri, dest_dir, fetched, skipped)
    return paths


def _remove_stale_partials(target: Path) -> None:
    """Delete temporary files of earlier, interrupted downloads of `target` (they are never resumed)."""
    for stale in target.parent.glob(f".{target.name}.part*"):
        stale.unlink(missing_ok=True)


def _key_for(path: Path, uri: str) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        key = f"{key}{path.name}"
    return bucket, key


def upload_file(
    path: str | os.PathLike,
    uri: str,
    *,
    client=None,
    cfg: S3Config | None = None,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunksize: int = MULTIPART_CHUNKSIZE,
    metadata: dict[str, str] | None = None,
) -> str:
    """Upload one file (multipart above `multipart_threshold`) and return its ETag (without quotes).

    `uri` is the object's URI, or a "folder" ending in "/" (the file keeps its name). The file's sha256 is
    stored as object metadata so multipart objects can be verified on download; the upload is checked by
    size (and MD5 when the ETag is one).
    """

    path = Path(path)
    if not path.is_file():
        raise StorageError(f"uploading {path} to {uri} failed: no such file")
    bucket, key = _key_for(path, uri)
    obj_uri = s3_uri(bucket, key)
    client = _client(client, cfg)
    size = path.stat().st_size
    extra = {"Metadata": {**(metadata or {}), "sha256": file_sha256(path)}}
    try:
        client.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs=extra,
            Config=transfer_config(multipart_threshold, multipart_chunksize),
        )
        head = _head(client, bucket, key)
    except _transfer_errors() as exc:
        raise _wrap(f"uploading {path} to", obj_uri, exc) from None
    etag = _strip_etag(head.get("ETag"))
    if int(head.get("ContentLength", -1)) != size:
        raise StorageError(
            f"uploading {path} to {obj_uri} failed: stored size {head.get('ContentLength')} != {size}"
        )
    if _MD5_ETAG.match(etag) and size < multipart_threshold and file_md5(path) != etag:
        raise StorageError(f"uploading {path} to {obj_uri} failed: stored MD5 {etag} differs from the file's")
    log.debug("uploaded %s -> %s (%d bytes, ETag %s)", path, obj_uri, size, etag)
    return etag


def upload_dir(
    src_dir: str | os.PathLike,
    uri: str,
    suffixes: Iterable[str] | None = None,
    *,
    client=None,
    cfg: S3Config | None = None,
    skip_existing: bool = True,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunksize: int = MULTIPART_CHUNKSIZE,
) -> dict[str, str]:
    """Upload every file under `src_dir` to `uri` as a folder (same relative layout). {key: ETag}.

    Hidden files (names starting with ".") are left out. With `skip_existing`, objects already there with
    the same size and checksum are not sent again.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise StorageError(f"uploading {src_dir} to {uri} failed: not a folder")
    bucket, prefix = parse_s3_uri(uri)
    folder = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
    client = _client(client, cfg)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    remote = (
        {o["key"]: o for o in list_objects(s3_uri(bucket, folder), client=client)} if skip_existing else {}
    )
    out: dict[str, str] = {}
    for path in sorted(src_dir.rglob("*")):
        rel = path.relative_to(src_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if wanted and not path.name.lower().endswith(wanted):
            continue
        key = folder + rel.as_posix()
        known = remote.get(key)
        if known is not None:
            sha = None
            if not _MD5_ETAG.match(known["etag"]):
                sha = (_head(client, bucket, key).get("Metadata") or {}).get("sha256")
            if verify_file(path, known["size"], known["etag"], sha256=sha, part_sizes=[multipart_chunksize]):
                out[key] = known["etag"]
                continue
        out[key] = upload_file(
            path,
            s3_uri(bucket, key),
            client=client,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
        )
    return out

