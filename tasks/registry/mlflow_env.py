"""MLflow's process-wide settings, applied for one call at a time, and what "unreachable" means.

MLflow retries HTTP requests itself (urllib3 ``Retry``), configured by ``MLFLOW_HTTP_REQUEST_*``
variables that it reads from ``os.environ`` on every request; ``mlflow.pyfunc.log_model`` logs
wherever the fluent tracking URI points. Both are process state, so they are set only around a
call and put back afterwards.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` means the store could not be reached (after MLflow's retries)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    import requests

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if isinstance(exc, MlflowException) and exc.error_code in ("TEMPORARILY_UNAVAILABLE",
                                                               "REQUEST_LIMIT_EXCEEDED"):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("max retries exceeded", "connection refused", "connection reset",
                                   "connection aborted", "timed out", "temporarily unavailable",
                                   "database is locked"))


def cause(exc: BaseException) -> str:
    """The short reason inside a long urllib3/MLflow message, on one line."""
    text = " ".join(str(exc).split())
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    for marker in ("Connection refused", "Connection reset", "Connection aborted", "Read timed out",
                   "database is locked", "RemoteDisconnected"):
        if marker.lower() in text.lower():
            return marker
    return text[:200]


# MLflow reads its HTTP settings from os.environ per request, so two clients with different
# settings must not overlap; clients with the same settings share one application of them.
_settings_lock = threading.Condition()
_settings_state: dict[str, Any] = {"active": None, "depth": 0, "saved": {}}


@contextmanager
def mlflow_http_settings(values: dict[str, str]) -> Iterator[None]:
    """Apply MLflow's ``MLFLOW_HTTP_REQUEST_*`` settings for the duration of the block."""
    state = _settings_state
    with _settings_lock:
        _settings_lock.wait_for(lambda: state["depth"] == 0 or state["active"] == values)
        if state["depth"] == 0:
            state["saved"] = {k: os.environ.get(k) for k in values}
            os.environ.update(values)
            state["active"] = values
        state["depth"] += 1
    try:
        yield
    finally:
        with _settings_lock:
            state["depth"] -= 1
            if state["depth"] == 0:
                for key, old in state["saved"].items():
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old
                state["active"] = None
                _settings_lock.notify_all()


_fluent_lock = threading.Lock()


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent tracking URI set to ``uri`` for the block, then put back exactly as it was
    (``mlflow.pyfunc.log_model`` knows no other way to be told where to log)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _fluent_lock:
        saved_global, saved_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_global)
            if saved_env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env
