"""Sans-I/O stream multiplexing (yamux framing): bytes in, events and bytes out."""

from tete_tunnel.mux.connection import INITIAL_WINDOW, Config, Connection
from tete_tunnel.mux.errors import GoAwayCode, LocalProtocolError, MuxError, ProtocolError

__all__ = [
    "INITIAL_WINDOW",
    "Config",
    "Connection",
    "GoAwayCode",
    "LocalProtocolError",
    "MuxError",
    "ProtocolError",
]
