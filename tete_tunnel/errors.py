"""One error hierarchy; the CLI maps it to exit codes and one-line messages.

Everything a user can cause or meet at run time is a `TeteError` with a message that says
what failed and what to try; anything else reaching the CLI is a bug.

How a link ends is said by type, as trio does with Closed vs Broken resources: an orderly
end is not an exception at all (the session's outcome is `Closed`), and a broken link is a
`LinkBroken` subclass naming the cause. `Session._finish` is the one place that decides.
"""

from __future__ import annotations


class TeteError(Exception):
    """A failure we can explain to the user (exit code 1)."""

    exit_code = 1


class UsageError(TeteError):
    """The command line asks for something impossible (exit code 2)."""

    exit_code = 2


class PunchError(TeteError):
    """No TCP connection with the peer could be made before the deadline."""


class HandshakeError(TeteError):
    """A connection was made but is not a usable tete-tunnel peer (malformed, stalled...).

    Punching goes on after this: it may have been a stranger on the port.
    """


class AuthenticationError(TeteError):
    """A well-formed peer failed authentication (wrong ID or code); fatal, never retried."""


class LinkBroken(TeteError):
    """The secure link broke before both sides were done; the subclass says why."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"connection to peer lost: {cause}")
        self.cause = cause


class PeerViolation(LinkBroken):
    """The peer broke the protocol (or said we did): the session was ended with go-away."""


class PeerDeclined(LinkBroken):
    """The peer ended an unverified link at once: its user did not confirm the safety code.
    Not worth a new link: the same peer would be asked again."""

    def __init__(self) -> None:
        TeteError.__init__(
            self,
            "the peer did not confirm the safety code and ended the link before any data "
            "went through (compare the codes again, or verify with --code or --peer-id)",
        )
        self.cause = "the peer did not confirm the safety code"


class NotConfirmed(TeteError):
    """We did not confirm the safety code of an unverified link (or could not be asked)."""


class PeerUnresponsive(LinkBroken):
    """The peer stopped answering: no pong within the keepalive timeout, or TCP gave up."""


class PeerAborted(LinkBroken):
    """The peer's end went away without an orderly close: killed, reset, closed early."""


class LocalFailure(LinkBroken):
    """Our own side failed the link (a socket error here, or we gave up on it)."""


class Closed(TeteError):
    """Used on a stream or session that has been closed in order (trio's ClosedResourceError).

    Not a failure of the link: what was open on it simply ended with it.
    """


class StreamReset(TeteError):
    """One stream was reset (by the peer, or by us); the session goes on."""


class TransferAborted(TeteError):
    """`pipe` could not deliver or receive everything: never reported as success."""
