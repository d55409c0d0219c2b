"""One stream's life as a table: (state, input) -> next state; a missing key is an error.

        OPEN --send FIN--> HALF_CLOSED_LOCAL --recv FIN--> CLOSED
          |                                                  ^
          +----recv FIN--> HALF_CLOSED_REMOTE --send FIN-----+
        any state --send RST / recv RST--> CLOSED

Data may be sent while our side is open and received while theirs is. A local input that
is missing from the table is the caller's bug (LocalProtocolError); a remote one is the
peer's (ProtocolError, which ends the session). A received RST is legal in every state, so
the connection drops the stream at once without consulting the table (RECV_RST is listed
for completeness).
"""

from __future__ import annotations

from enum import Enum, auto

from tete_tunnel.mux.errors import LocalProtocolError, ProtocolError


class StreamState(Enum):
    # Members are singletons: hash by identity (C) instead of Enum's hash of the name (a
    # Python call), since every frame and write looks up the table by (state, input).
    __hash__ = object.__hash__

    OPEN = auto()
    HALF_CLOSED_LOCAL = auto()  # we sent FIN
    HALF_CLOSED_REMOTE = auto()  # they sent FIN
    CLOSED = auto()


class StreamInput(Enum):
    __hash__ = object.__hash__  # as StreamState's

    SEND_DATA = auto()
    SEND_FIN = auto()
    SEND_RST = auto()
    RECV_DATA = auto()
    RECV_FIN = auto()
    RECV_RST = auto()


_LOCAL = {StreamInput.SEND_DATA, StreamInput.SEND_FIN, StreamInput.SEND_RST}

S, In = StreamState, StreamInput
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.OPEN, In.SEND_DATA): S.OPEN,
    (S.OPEN, In.RECV_DATA): S.OPEN,
    (S.OPEN, In.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, In.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_LOCAL, In.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, In.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, In.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, In.SEND_FIN): S.CLOSED,
}
for _state in (S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE):
    TRANSITIONS[_state, In.SEND_RST] = S.CLOSED
    TRANSITIONS[_state, In.RECV_RST] = S.CLOSED
# Both sides ended, but our FIN still waits behind unsent data: a reset drops it.
TRANSITIONS[S.CLOSED, In.SEND_RST] = S.CLOSED
del S, In, _state


def transition(state: StreamState, event: StreamInput, stream_id: int) -> StreamState:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        what = f"{event.name.lower().replace('_', ' ')} on stream {stream_id} in state {state.name}"
        if event in _LOCAL:
            raise LocalProtocolError(f"cannot {what}") from None
        raise ProtocolError(f"the peer sent {what}") from None
