"""One error hierarchy; the CLI maps it to exit codes and one-line messages.

Everything a user can cause or meet at run time is a `TeteError` with a message that says
what failed and what to try; anything else reaching the CLI is a bug.
"""


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


class LinkLost(TeteError):
    """The secure link broke before both sides were done."""
