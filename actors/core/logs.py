"""Structured log lines: every rbee line ends ``job_id=… cid=…`` (``-`` where there is none),
so a job's lines can be found by its id in the Ray dashboard's log view or with grep.

One record is one line: whatever a value carries (a request's id, a hub's file name) is
escaped where lines are written (``OneLine``), so nobody can forge a line, hide one with
terminal escapes or break a reader's line splitting.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s %(rbee_job)s"

_JOB: ContextVar[tuple[str | None, str | None]] = ContextVar("rbee_job", default=(None, None))


def configure(level: int = logging.INFO) -> None:
    """Give the ``rbee`` loggers a stderr handler (once per process; actors call this)."""
    logger = logging.getLogger("rbee")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLine(FORMAT))
        handler.addFilter(with_job)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


class OneLine(logging.Formatter):
    """A formatter whose line cannot be split or forged: every character that is not
    printable (CR, LF, NUL, ESC, the C1 controls, U+2028/2029, bidirectional overrides, ...)
    is written as its escape. A traceback keeps its own lines, each indented, so none of
    them can pass for a log line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def escape(text: str) -> str:
    """``text`` with every non-printable character (but the space) as ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN``; printable text as it is."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _indented(text: str) -> str:
    return "\n".join("    " + escape(line) for line in text.splitlines())


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
