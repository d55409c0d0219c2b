"""The HELLO/FINISH codec: round trips, and a parser that only ever returns or refuses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tete_tunnel import hello as msg
from tete_tunnel.errors import HandshakeError

hellos = st.builds(
    msg.Hello,
    commitment=st.binary(min_size=32, max_size=32),
    cert_der=st.binary(min_size=1, max_size=3000),
    spake_message=st.binary(max_size=msg.MAX_SPAKE_MESSAGE),
)
finishes = st.builds(
    msg.Finish,
    nonce=st.binary(min_size=32, max_size=32),
    mac=st.sampled_from([0, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
)


def split(wire: bytes) -> tuple[msg.MessageType, bytes]:
    kind, length = msg.parse_header(wire[: msg.HEADER_SIZE])
    body = wire[msg.HEADER_SIZE :]
    assert len(body) == length
    return kind, body


@given(hellos)
def test_hello_round_trip(hello: msg.Hello) -> None:
    kind, body = split(msg.encode_hello(hello))
    assert kind is msg.MessageType.HELLO
    assert msg.parse_hello(body) == hello


@given(finishes)
def test_finish_round_trip(finish: msg.Finish) -> None:
    kind, body = split(msg.encode_finish(finish))
    assert kind is msg.MessageType.FINISH
    assert msg.parse_finish(body) == finish


@given(st.sampled_from(list(msg.RefuseReason)))
def test_refuse_round_trip(reason: msg.RefuseReason) -> None:
    kind, body = split(msg.encode_refuse(reason))
    assert kind is msg.MessageType.REFUSE
    assert msg.parse_refuse(body).reason == reason


def _parse_any(data: bytes) -> object:
    kind, length = msg.parse_header(data[: msg.HEADER_SIZE])
    body = data[msg.HEADER_SIZE : msg.HEADER_SIZE + length]
    parser = {
        msg.MessageType.HELLO: msg.parse_hello,
        msg.MessageType.FINISH: msg.parse_finish,
        msg.MessageType.REFUSE: msg.parse_refuse,
    }[kind]
    return parser(body)


@settings(max_examples=3000)
@given(st.binary(max_size=600))
def test_parser_fuzz_only_returns_or_refuses(data: bytes) -> None:
    try:
        result = _parse_any(data)
    except HandshakeError:
        return
    assert isinstance(result, msg.Hello | msg.Finish | msg.Refuse)


@settings(max_examples=3000)
@given(
    st.sampled_from(list(msg.MessageType)),
    st.integers(0, msg.MAX_BODY),
    st.binary(max_size=400),
)
def test_parser_fuzz_with_valid_headers(kind: msg.MessageType, length: int, body: bytes) -> None:
    """Valid headers get past the first check, so the body parsers are exercised."""
    wire = msg.HEADER.pack(msg.MAGIC, msg.VERSION, kind, min(length, len(body))) + body
    try:
        result = _parse_any(wire)
    except HandshakeError:
        return
    assert isinstance(result, msg.Hello | msg.Finish | msg.Refuse)


@given(hellos, st.data())
def test_truncated_hello_is_refused(hello: msg.Hello, data: st.DataObject) -> None:
    _, body = split(msg.encode_hello(hello))
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(HandshakeError):
        msg.parse_hello(body[:cut])


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x00", "not a tete-tunnel peer"),  # a TLS ClientHello
        (b"SSH-2.0-", "not a tete-tunnel peer"),
        (msg.HEADER.pack(msg.MAGIC, 2, 1, 10), "handshake version 2"),
        (msg.HEADER.pack(msg.MAGIC, 1, 9, 10), "unknown handshake message type 9"),
        (msg.HEADER.pack(msg.MAGIC, 1, 1, msg.MAX_BODY + 1), "exceeds 4096"),
        (msg.HEADER.pack(msg.MAGIC, 1, 1, 0xFFFF), "exceeds 4096"),
    ],
)
def test_header_rejections_say_why(header: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        msg.parse_header(header)


def test_encoder_refuses_oversized_body() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        msg.encode_hello(msg.Hello(b"\0" * 32, b"x" * 5000, b""))
