"""Structured log lines: every rbee line ends ``job_id=… cid=…`` (``-`` where there is none),
so a job's lines can be found by its id in the Ray dashboard's log view or with grep."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s %(rbee_job)s"

_JOB: ContextVar[tuple[str | None, str | None]] = ContextVar("rbee_job", default=(None, None))


def configure(level: int = logging.INFO) -> None:
    """Give the ``rbee`` loggers a stderr handler (once per process; actors call this)."""
    logger = logging.getLogger("rbee")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(with_job)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def bind(job_id: str | None, correlation_id: str | None) -> None:
    """Name this job on every line logged from now on in the current task (a job runs in a
    task of its own: the binding ends with it)."""
    _JOB.set((job_id, correlation_id))


def with_job(record: logging.LogRecord) -> bool:
    """The handler filter that gives each record its ``job_id=… cid=…`` tail."""
    if not hasattr(record, "rbee_job"):
        record.rbee_job = context(*_JOB.get())
    return True


def context(job_id: str | None = None, correlation_id: str | None = None) -> str:
    """The ``job_id=… cid=…`` tail of a log line."""
    return f"job_id={job_id or '-'} cid={correlation_id or '-'}"
