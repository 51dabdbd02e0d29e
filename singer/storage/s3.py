"""The boto3 S3 client, S3 URIs, the errors, buckets, listing and deleting.

    client = s3_client(cfg.s3)                                   # endpoint from params / SINGER_S3_ENDPOINT_URL
    ensure_bucket("singer", client=client)
    list_objects("s3://singer/raw")                              # [{"key", "size", "etag"}, ...]

Credentials come from the environment (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, or whatever else
boto3's default chain finds: a profile, a web identity token on Kubernetes), never from params.yaml.
Errors are `StorageError`s that name the URI and the S3 error code, never a key.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from singer.config import S3Config

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class StorageError(RuntimeError):
    """An S3 operation failed; the message names the URI and the cause (never a credential)."""


# ---------------------------------------------------------------------------------------------- client


def resolve_endpoint(cfg: S3Config | None = None, endpoint_url: str | None = None) -> str | None:
    """The explicit argument, else `SINGER_S3_ENDPOINT_URL`, else the config's `endpoint_url`.

    None means boto3's own default (AWS, or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`). The environment
    variable is read here too, not only by `S3Config`'s validator (which pydantic skips for defaults).
    """
    if endpoint_url:
        return endpoint_url
    if os.environ.get("SINGER_S3_ENDPOINT_URL"):
        return os.environ["SINGER_S3_ENDPOINT_URL"]
    if cfg is not None:
        return cfg.endpoint_url or None
    return None


def s3_client(
    cfg: S3Config | None = None,
    endpoint_url: str | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
):
    """A boto3 S3 client: path-style addressing, standard retries, bounded timeouts.

    Keys are taken from the environment unless passed (tests and the local server do that).
    """
    import boto3
    from botocore.config import Config

    region = (
        region
        or (cfg.region if cfg is not None else None)
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
    )
    if session.get_credentials() is None:
        raise StorageError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment "
            "(for the local server: `source <data_dir>/.s3/credentials.env`)"
        )
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        signature_version="s3v4",
        # Recent botocore adds CRC checksums to every upload; S3-compatible servers do not all accept them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=resolve_endpoint(cfg, endpoint_url), config=config)


def _client(client, cfg=None):
    return client if client is not None else s3_client(cfg)


# ------------------------------------------------------------------------------------------------- URIs


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """ "s3://bucket/some/prefix" -> ("bucket", "some/prefix"); the prefix is kept as written (may be "")."""
    if not isinstance(uri, str):
        raise TypeError(f"not an S3 URI: {uri!r}")
    text = uri.strip()
    if not text.lower().startswith("s3://"):
        raise ValueError(f"not an S3 URI (expected s3://bucket/prefix): {uri!r}")
    rest = text[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid bucket name {bucket!r} in {uri!r} (3-63 characters: lower-case letters, digits, '.', '-')"
        )
    return bucket, prefix


def s3_uri(bucket: str, key: str = "") -> str:
    return f"s3://{bucket}/{key}"


def _describe(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    inner = exc.__cause__ or exc.__context__  # boto3's transfer errors wrap the ClientError
    if not isinstance(exc, ClientError) and isinstance(inner, ClientError):
        exc = inner
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message") or ""
        hint = ""
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        return f"{code}: {message}{hint}".strip()
    return f"{type(exc).__name__}: {exc}"


def _wrap(action: str, uri: str, exc: BaseException) -> StorageError:
    return StorageError(f"{action} {uri} failed: {_describe(exc)}")


def _transfer_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, Boto3Error)


def _error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "")
    return None


# ---------------------------------------------------------------------------------------------- buckets


def ensure_bucket(name: str, *, client=None, cfg: S3Config | None = None) -> bool:
    """Create bucket `name` unless it exists. True when it was created."""
    from botocore.exceptions import BotoCoreError, ClientError

    parse_s3_uri(f"s3://{name}")  # validates the name
    client = _client(client, cfg)
    try:
        client.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise _wrap("checking bucket", s3_uri(name), exc) from None
    except BotoCoreError as exc:
        raise _wrap("checking bucket", s3_uri(name), exc) from None
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": name}
    if region and region != "us-east-1" and "amazonaws.com" in (client.meta.endpoint_url or ""):
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if _error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        raise _wrap("creating bucket", s3_uri(name), exc) from None
    except BotoCoreError as exc:
        raise _wrap("creating bucket", s3_uri(name), exc) from None
    log.info("created bucket %s", name)
    return True


# --------------------------------------------------------------------------------------------- listing


def list_objects(uri: str, *, client=None, cfg: S3Config | None = None) -> list[dict[str, Any]]:
    """Every object under the URI's prefix, as {"key", "size", "etag"} (ETag without quotes), by key."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    client = _client(client, cfg)
    out: list[dict[str, Any]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []) or []:
                out.append(
                    {"key": obj["Key"], "size": int(obj["Size"]), "etag": _strip_etag(obj.get("ETag"))}
                )
    except (ClientError, BotoCoreError) as exc:
        raise _wrap("listing", uri, exc) from None
    out.sort(key=lambda o: o["key"])
    return out


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip().strip('"').lower()


def delete_prefix(uri: str, *, client=None, cfg: S3Config | None = None) -> int:
    """Delete every object under `uri`'s prefix; the number deleted."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = parse_s3_uri(uri)
    client = _client(client, cfg)
    keys = [o["key"] for o in list_objects(uri, client=client)]
    try:
        for i in range(0, len(keys), 1000):
            client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            )
    except (ClientError, BotoCoreError) as exc:
        raise _wrap("deleting", uri, exc) from None
    return len(keys)

