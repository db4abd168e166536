"""What can go wrong with a request, as typed errors, and the one JSON envelope HTTP clients see.

Protocol modules raise these; the HTTP front turns them into ``{"error": message}`` with the status
below, the gRPC front into the status code TensorFlow Serving would send. Messages are safe to show
to clients.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar

import grpc
import orjson
from starlette.responses import Response


class ServiceError(Exception):
    """A request that cannot be answered; ``str(error)`` names the problem."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class InputError(ServiceError, ValueError):
    """Bad client input: wrong shape, type or range, undecodable data, too many images."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """An unknown model, version, signature or endpoint."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class SignatureNotFound(InputError):
    """A signature the model does not have: TF Serving's FAILED_PRECONDITION over gRPC, 400 over REST."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    """No model is loaded yet."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ServiceError):
    """The batch queue is over its budget; retry with backoff."""

    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PayloadTooLarge(ServiceError):
    http_status = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class UnsupportedMediaType(ServiceError):
    http_status = 415
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def error_response(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json")


def response_for(error: ServiceError) -> Response:
    return error_response(error.http_status, str(error))


class ClientErrorLog:
    """One WARNING line per client error, at most ``burst`` lines per ``window_s`` per worker; past that,
    one summary line per window counts what was left out.

    Clients decide how many errors they cause: an overload burst used to write one line per shed
    request (13,736 lines in 10 s), spending the worker's time on logging just when it sheds load.
    Counts by status are in ``/metrics`` (BentoML's request counter, labelled by status code).
    """

    def __init__(self, logger: logging.Logger, burst: int = 20, window_s: float = 10.0) -> None:
        self.logger, self.burst, self.window_s = logger, burst, window_s
        self._lock = threading.Lock()
        self._window_started = time.monotonic()
        self._logged = self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        if self.allow():
            self.logger.warning(message, *args)

    def allow(self) -> bool:
        """Whether one more line fits this window (and, first in a new window, say what the last left out)."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_started >= self.window_s:
                left_out, self._left_out, self._logged = self._left_out, 0, 0
                self._window_started = now
                if left_out:
                    self.logger.warning(
                        "... and %d more client errors in the last %.0f s, not logged one by one", left_out, self.window_s
                    )
            if self._logged >= self.burst:
                self._left_out += 1
                return False
            self._logged += 1
            return True


class ThrottledMessage(logging.Filter):
    """A logging filter that lets a given message through at :class:`ClientErrorLog`'s rate: for lines
    other code writes once per bad request (uvicorn's "Invalid HTTP request received." per malformed
    request line, which random-path floods are full of)."""

    def __init__(self, message: str, log: ClientErrorLog) -> None:
        super().__init__()
        self.message, self.log = message, log

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.message or self.log.allow()
