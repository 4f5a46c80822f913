"""The one error hierarchy of rbee.

Every error carries a stable ``code`` (the wire name of SPEC §4/§7) and says whether the
caller may retry. All of them survive ``pickle`` because Ray ships them between processes::

    RbeeError                      INTERNAL
    ├── RequestError               BAD_REQUEST         400 (the caller's fault; never retriable)
    │   ├── MalformedBody          INVALID_JSON        400
    │   ├── Unauthorized           UNAUTHORIZED        401
    │   ├── Forbidden              FORBIDDEN           403 (a foreign Host or Origin, a client
    │   │                                                   beyond loopback)
    │   ├── NotFound               NOT_FOUND           404
    │   │   ├── JobNotFound        JOB_NOT_FOUND       404
    │   │   ├── JobFinished        JOB_FINISHED        404 (nothing left to cancel)
    │   │   └── ModelNotFound      MODEL_NOT_FOUND     404
    │   ├── BodyTooLarge           BODY_TOO_LARGE      413
    │   ├── UnsupportedMediaType   UNSUPPORTED_MEDIA_TYPE 415
    │   └── InvalidRequest         INVALID_REQUEST     422
    │       └── UnsafePath         INVALID_REQUEST     422
    ├── JobCancelled               CANCELLED
    ├── WorkerDied                 WORKER_DIED         (retriable: the actor restarts)
    ├── ModelLoadFailed            MODEL_LOAD_FAILED
    ├── InsufficientVram           INSUFFICIENT_VRAM   (retriable once a GPU frees up)
    ├── DownloadFailed             DOWNLOAD_FAILED     (retriable unless the bytes were wrong)
    │   ├── IntegrityError         DOWNLOAD_FAILED     (checksum mismatch; fatal)
    │   └── BadHubAnswer           DOWNLOAD_FAILED     (the hub broke the protocol's rules; fatal)
    ├── InternalError              INTERNAL
    └── UnknownError               its own code        (a code no class here declares: a
                                                        newer server's, read by a client)

A wire error (``{"code", "message", ...}``) becomes its exception in one place:
``error_from``.
"""

from __future__ import annotations

from typing import Any


class RbeeError(Exception):
    """Base of every error rbee raises on purpose."""

    code: str = "INTERNAL"
    retriable: bool = False

    def __init__(
        self, message: str = "", *, retriable: bool | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__
        if retriable is not None:
            self.retriable = retriable
        self.param = param  #: the request's parameter at fault, when one is

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.retriable, self.param))

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` event payload of SPEC §4 (``param`` only when one is at fault)."""
        out: dict[str, Any] = {
            "code": self.code, "message": self.message, "retriable": self.retriable
        }  # fmt: skip
        if self.param is not None:
            out["param"] = self.param
        return out


def _rebuild(
    cls: type[RbeeError], message: str, retriable: bool, param: str | None = None
) -> RbeeError:
    return cls(message, retriable=retriable, param=param)


class RequestError(RbeeError):
    """The request itself is wrong; sending it again will not help."""

    code = "BAD_REQUEST"


class MalformedBody(RequestError):
    code = "INVALID_JSON"


class Unauthorized(RequestError):
    code = "UNAUTHORIZED"


class Forbidden(RequestError):
    """Who asks may not: a Host or an Origin the server does not answer to, or a client
    beyond loopback when the server listens on loopback."""

    code = "FORBIDDEN"


class NotFound(RequestError):
    code = "NOT_FOUND"


class JobNotFound(NotFound):
    code = "JOB_NOT_FOUND"


class JobFinished(NotFound):
    code = "JOB_FINISHED"


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class BodyTooLarge(RequestError):
    code = "BODY_TOO_LARGE"


class UnsupportedMediaType(RequestError):
    """A body that is not ``application/json`` (a web page's form or ``text/plain`` post)."""

    code = "UNSUPPORTED_MEDIA_TYPE"


class InvalidRequest(RequestError):
    code = "INVALID_REQUEST"


class UnsafePath(InvalidRequest):
    """A model id, glob or file name that would leave the cache."""


class JobCancelled(RbeeError):
    code = "CANCELLED"


class WorkerDied(RbeeError):
    """The actor doing the work died; Ray restarts it, so the job may be submitted again."""

    code = "WORKER_DIED"
    retriable = True


class Unavailable(RbeeError):
    """A part of rbee is restarting (the registry, say): the same request soon works."""

    code = "UNAVAILABLE"
    retriable = True


class ModelLoadFailed(RbeeError):
    code = "MODEL_LOAD_FAILED"


class InsufficientVram(RbeeError):
    code = "INSUFFICIENT_VRAM"
    retriable = True


class DownloadFailed(RbeeError):
    """The transfer broke; the bytes on disk are kept, so a retry resumes."""

    code = "DOWNLOAD_FAILED"
    retriable = True


class IntegrityError(DownloadFailed):
    """The bytes did not match the checksum the hub gave; nothing was kept."""

    retriable = False


class BadHubAnswer(DownloadFailed):
    """The hub (or a server it sent us to) answered something rbee will not act on: an id
    that is not what it claims, a path outside the snapshot, more bytes than it listed, an
    endless listing. Nothing of it was kept, and asking again will get the same answer."""

    retriable = False


class InternalError(RbeeError):
    code = "INTERNAL"


def rbee_cause(exc: BaseException) -> RbeeError | None:
    """Our error inside ``exc``: itself, or what Ray wrapped (``RayTaskError.cause``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RbeeError) and type(current).__module__ == __name__:
            return current
        seen.add(id(current))
        nested = getattr(current, "cause", None)
        current = nested if isinstance(nested, BaseException) else current.__cause__
    return None


def error_class(code: str) -> type[RbeeError] | None:
    """The most specific error class that itself declares the wire ``code``
    (``MODEL_NOT_FOUND`` -> ``ModelNotFound``, ``INTERNAL`` -> ``InternalError``), or None.

    Subclasses defined elsewhere (the client's) count; Ray's wrappers of our errors do not.
    """
    best: type[RbeeError] | None = None
    depth = -1
    stack: list[tuple[type[RbeeError], int]] = [(RbeeError, 0)]
    while stack:
        cls, level = stack.pop()
        if (
            cls.__dict__.get("code") == code
            and level > depth
            and not cls.__module__.startswith("ray")
        ):
            best, depth = cls, level
        stack += [(sub, level + 1) for sub in cls.__subclasses__()]
    return best


class UnknownError(RbeeError):
    """An error whose ``code`` no class here declares (a newer server's): it keeps it."""

    def __init__(
        self,
        message: str = "",
        *,
        retriable: bool | None = None,
        param: str | None = None,
        code: str = "",
    ) -> None:
        super().__init__(message, retriable=retriable, param=param)
        self.code = code or RbeeError.code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unknown, (self.message, self.retriable, self.param, self.code))


def _unknown(message: str, retriable: bool, param: str | None, code: str) -> UnknownError:
    return UnknownError(message, retriable=retriable, param=param, code=code)


def error_from(
    code: str, message: str, *, retriable: bool | None = None, param: str | None = None
) -> RbeeError:
    """The exception a wire error stands for (an ``error`` event, an error answer): its
    code's class (``error_class``), else an ``UnknownError`` that keeps the code."""
    cls = error_class(code)
    if cls is None:
        return UnknownError(message, retriable=retriable, param=param, code=code)
    return cls(message, retriable=retriable, param=param)
