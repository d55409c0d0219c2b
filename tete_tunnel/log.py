"""Stderr logging in the seed tool's format: `2026/11/25 03:41:19 Connected to peer!`."""

import logging
import sys

from tete_tunnel.text import safe, safe_lines

LOGGER_NAME = "tete_tunnel"
log = logging.getLogger(LOGGER_NAME)


def setup_logging(verbosity: int) -> None:
    """-v shows progress (INFO), -vv debug detail; by default only the seed's lines and problems.

    The seed's lines (Connected to peer!, Closed connection, Peer closed connection) are
    logged at WARNING so they show without -v, as they always did.
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(message)s", "%Y/%m/%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


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
