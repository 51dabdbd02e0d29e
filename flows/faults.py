"""Telling transient faults from real failures, for the flows' retry conditions.

    is_transient("botocore.exceptions.EndpointConnectionError: Could not connect ...")   # True: retry

Transient faults are S3 and network errors (connection refused, timeouts, 503 / SlowDown, S3's InternalError,
the DVC repository lock held by another process): the same command may well succeed a little later. Everything
else (a Great Expectations suite failing, a bad parameter, a missing bucket, wrong keys) is a real failure:
retrying it only delays the error, so the retry condition says no and the task fails at once with the stderr
tail.
"""

from __future__ import annotations

import re
from typing import Any

# Substrings / patterns of S3 and network faults that are worth a retry (botocore, urllib3, requests,
# SeaweedFS/AWS error codes, DVC's repository lock).
TRANSIENT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"Could not connect to the endpoint URL",
        r"EndpointConnectionError",
        r"Connection refused",
        r"ConnectionRefusedError",
        r"Connection reset by peer",
        r"ConnectionResetError",
        r"Connection aborted",
        r"RemoteDisconnected",
        r"ConnectTimeout",
        r"ConnectTimeoutError",
        r"ReadTimeout",
        r"ReadTimeoutError",
        r"timed out",
        r"Temporary failure in name resolution",
        r"\bSlowDown\b",
        r"\bInternalError\b",                      # S3's 500 ("please try again"): a restarting SeaweedFS
        r"\bServiceUnavailable\b",
        r"\bRequestTimeout\b",
        r"\bThrottling(Exception)?\b",
        r"\b50[234] (Service Unavailable|Bad Gateway|Gateway Time-?out)\b",
        r"An error occurred \(50[0234]\)",          # botocore ClientError with a bare status code
        r"\b(HTTP|status|status code)[ :=]+50[234]\b",
        r"Unable to acquire lock",                   # DVC: another dvc process holds the repository lock
    )
)
# Faults that look like network errors but never heal by waiting: they win over the transient patterns.
PERMANENT_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"\bNoSuchBucket\b",
        r"\bNoSuchKey\b",
        r"\bInvalidAccessKeyId\b",
        r"\bSignatureDoesNotMatch\b",
        r"\bAccessDenied\b",
        r"\bInvalidBucketName\b",
        r"no S3 credentials",
    )
)


def is_transient(text: str) -> bool:
    """Does this error output describe a transient S3/network fault (retry) rather than a real failure?"""
    if not text:
        return False
    if any(p.search(text) for p in PERMANENT_PATTERNS):
        return False
    return any(p.search(text) for p in TRANSIENT_PATTERNS)


def exception_is_transient(exc: BaseException | None) -> bool:
    """An exception's own verdict (`.transient`) when it has one, else its text and its causes' types."""
    if exc is None:
        return False
    verdict = getattr(exc, "transient", None)
    if isinstance(verdict, bool):
        return verdict
    parts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return is_transient("\n".join(parts))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient faults.

    Must stay a plain function: Prefect 3.8 calls the condition only when `inspect.isfunction` (or a
    coroutine function) says so; a `functools.partial` or a callable object is silently treated as "never
    retry"."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return exception_is_transient(data)
    return is_transient(getattr(state, "message", "") or "")
