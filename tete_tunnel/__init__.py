"""tete-tunnel: a private, authenticated peer-to-peer TCP tunnel through NATs."""

__version__ = "0.1.0"
