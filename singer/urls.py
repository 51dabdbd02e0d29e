"""URLs that may carry credentials, MLflow servers that may not answer, and the MLflow UI's pages: used by
tracking, generation, registration and the flows.

    redact_url("postgresql://user:pw@db/x")      # -> "postgresql://user:***@db/x"
    server_unreachable("http://127.0.0.1:5000")  # -> None, or the error of a GET on /health
    version_url("sqlite:///mlflow.db", "singer", 3)  # -> "http://127.0.0.1:5000/#/models/singer/versions/3?..."
"""

from __future__ import annotations

import re

__all__ = ["LOCAL_UI", "REDACTED", "mlflow_ui", "redact_url", "server_unreachable", "ui_url", "version_url"]

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


LOCAL_UI = "http://127.0.0.1:5000"


def mlflow_ui(uri: str) -> tuple[str, str | None]:
    """(the MLflow UI's base URL, the command that serves it) for a tracking URI: an http(s) tracking server is
    its own UI (no command); a local store (SQLite, a folder) is served by `mlflow ui` at LOCAL_UI."""
    if uri.startswith(("http://", "https://")):
        return redact_url(uri.rstrip("/")), None
    return LOCAL_UI, f"mlflow ui --backend-store-uri '{redact_url(uri)}' -h 127.0.0.1 -p 5000"


def ui_url(uri: str, route: str) -> str:
    """The MLflow UI page at `route` (`experiments/1/runs/<id>`, `models/singer/versions/3`) for a tracking URI,
    in the UI's model-training mode: MLflow 3.17's UI opens every page in its GenAI mode unless the link says
    otherwise (the experiment's `mlflow.experimentKind` tag does not override that default)."""
    return f"{mlflow_ui(uri)[0]}/#/{route.lstrip('/')}?workflowType=machine_learning"


def version_url(uri: str, model: str, version: str | int) -> str:
    """The MLflow UI page of a registered model version."""
    return ui_url(uri, f"models/{model}/versions/{version}")
