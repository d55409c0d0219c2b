"""preamble.parse: a message taken from the start of a stream's data, whole or not yet."""

from __future__ import annotations

import pytest

from tete_tunnel import preamble

MESSAGES = [
    preamble.Pipe(),
    preamble.Connect("127.0.0.1", 22),
    preamble.Connect("example.org", 443),
    preamble.Forwarded(7),
    preamble.Listen("::1", 0),
    preamble.Accept(),
    preamble.Bound(8080),
    preamble.Refuse("not allowed"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_every_prefix_is_incomplete_and_the_whole_says_what_it_took(
    message: preamble.Request | preamble.Answer,
) -> None:
    encoded = preamble.encode(message)
    for cut in range(len(encoded)):
        assert preamble.parse(encoded[:cut]) is None
    assert preamble.parse(encoded + b"data behind") == (message, len(encoded))


@pytest.mark.parametrize("head", [b"\x00\x00", b"\x04\x01", b"\xff\xff"])
def test_a_length_outside_the_limit_is_refused_from_its_two_bytes(head: bytes) -> None:
    with pytest.raises(preamble.PreambleError, match="open message of"):
        preamble.parse(head)


def test_a_malformed_body_is_refused_once_whole() -> None:
    assert preamble.parse(b"\x00\x02\x02") is None
    with pytest.raises(preamble.PreambleError, match="malformed"):
        preamble.parse(b"\x00\x02\x02\x00")
