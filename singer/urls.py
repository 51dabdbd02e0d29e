"""URLs that may carry credentials, and MLflow servers that may not answer: used by tracking and by generation.

    redact_url("postgresql://user:pw@db/x")      # -> "postgresql://user:***@db/x"
    server_unreachable("http://127.0.0.1:5000")  # -> None, or the error of a GET on /health
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact_url", "server_unreachable"]

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@\s:]*):(?P<pw>[^/@\s]*)@")
REDACTED = "***"


def redact_url(text: str) -> str:
    """`postgresql://user:pw@db/x` -> `postgresql://user:***@db/x` (every URL in `text`)."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", str(text))


def server_unreachable(uri: str, timeout: float = 5.0) -> OSError | None:
    """Why the server at ``uri`` does not answer (the error of a GET on ``/health``), or None if it answers
    (an HTTP error status counts as an answer: a server without /health still works)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            resp.read(64)
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        return exc
    return None
