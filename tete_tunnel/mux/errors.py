"""Mux errors: the peer broke the protocol, or our own code misused the API."""

from enum import IntEnum


class GoAwayCode(IntEnum):
    """Yamux's go-away codes, carried in the Length field of a Go Away frame."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    # Ours (docs/PROTOCOL.md): the sender ends the session without finishing its work (an
    # interrupted pipe); unlike NORMAL, it is no receipt for what the sender was sent.
    CANCELLED = 3
    # Ours too: the sender's user did not confirm the safety code of an unverified link; the
    # session ends before any stream was served, and the receiver must not link again.
    NOT_CONFIRMED = 4
    # Ours too: the sender moved the session's work to a direct link to the same peer (an
    # upgrade from a relay); the receiver follows instead of ending, as after NORMAL.
    MOVED = 5


class MuxError(Exception):
    pass


class ProtocolError(MuxError):
    """The peer broke the protocol; the session answers with go-away and ends."""

    error_code = GoAwayCode.PROTOCOL_ERROR


class LocalProtocolError(MuxError):
    """Our own caller asked for something the protocol does not allow (a bug or a race)."""
