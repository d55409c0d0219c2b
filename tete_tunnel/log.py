"""Stderr logging in the seed tool's format: `2026/11/25 03:41:19 Connected to peer!`."""

import logging
import sys

from tete_tunnel.status import status
from tete_tunnel.text import safe, safe_lines

LOGGER_NAME = "tete_tunnel"
log = logging.getLogger(LOGGER_NAME)


def setup_logging(verbosity: int) -> None:
    """-v shows progress (INFO), -vv debug detail; by default only the seed's lines and problems;
    -q (verbosity -1) only errors.

    The seed's lines (Connected to peer!, Closed connection, Peer closed connection) are
    logged at WARNING so they show without -v, as they always did.
    """
    level = (
        logging.ERROR
        if verbosity < 0
        else logging.WARNING
        if verbosity == 0
        else logging.INFO
        if verbosity == 1
        else logging.DEBUG
    )
    handler = StatusAwareHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(message)s", "%Y/%m/%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # The event loop's own logger (asyncio's, which uvloop uses too) would print bare,
    # undated lines such as uvloop's "SSL connection is closed" for a client that reset
    # while we wrote. Its errors (a bug somewhere) still show, dated; the rest with -vv.
    loop_log = logging.getLogger("asyncio")
    loop_log.handlers[:] = [handler]
    loop_log.setLevel(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    loop_log.propagate = False


class StatusAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Erases the terminal's status line (if one is shown) around each log line."""

    def emit(self, record: logging.LogRecord) -> None:
        with status.around_log():
            super().emit(record)


class Throttled:
    """Log lines that a peer or a crowd of clients can provoke at will: the first of each
    kind in an interval is logged, later ones are counted into the next line of that kind."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, now: float, message: str, *args: object) -> None:
        if now < self._next.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        self._next[kind] = now + self.interval
        if held:
            log.warning(message + " (and %d more like it before)", *args, held)
        else:
            log.warning(message, *args)


class SafeFormatter(logging.Formatter):
    """Every line goes to a terminal through `text.safe`: whatever part of a message came
    from the network (a peer's refusal reason, a host name) cannot act on the terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = safe(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        return safe_lines(super().formatException(ei))


def event(message: str) -> None:
    """A line users and scripts rely on; always shown."""
    log.warning(message)
