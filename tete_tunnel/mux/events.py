"""What the mux core tells its driver: frozen, past-tense facts with fields only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream; accept it with `accept_stream` or refuse with `reset_stream`."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed: no more data will come on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    rtt: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is ending the session (our peers send go-away only then); `error_code`
    says why. In yamux proper it means only "no new streams"; see docs/PROTOCOL.md."""

    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The session is over: a protocol error (ours to report) or a dead peer."""

    error_code: int
    reason: str


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | PongReceived
    | GoAwayReceived
    | ConnectionTerminated
)
