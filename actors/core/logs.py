"""Structured log lines: every rbee line names its job and correlation id when it has them."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: int = logging.INFO) -> None:
    """Give the ``rbee`` loggers a stderr handler (once per process; actors call this)."""
    logger = logging.getLogger("rbee")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def context(job_id: str | None = None, correlation_id: str | None = None) -> str:
    """The ``job_id=… cid=…`` tail of a log line."""
    return f"job_id={job_id or '-'} cid={correlation_id or '-'}"
