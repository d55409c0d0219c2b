"""The sans-I/O mux session: two honest peers joined in memory, and hostile raw frames.

Pure: no sockets, no event loop; time is an argument. Every test looks at real bytes
(decoded frames) and real events.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tete_tunnel.mux import events as ev
from tete_tunnel.mux.connection import INITIAL_WINDOW, UPDATE_STEP, Config, Connection
from tete_tunnel.mux.errors import GoAwayCode, LocalProtocolError
from tete_tunnel.mux.frames import (
    MAX_PAYLOAD,
    MAX_U32,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    encode_header,
)

DATA, WU, PING, GO_AWAY = FrameType
SYN, ACK, FIN, RST = Flag.SYN, Flag.ACK, Flag.FIN, Flag.RST
NONE = Flag.NONE
KiB, MiB = 1024, 1024 * 1024


# -- helpers --------------------------------------------------------------------------


def decode_all(blob: bytes) -> list[Frame]:
    """Frames of a blob that must hold whole frames only."""
    decoder = FrameDecoder()
    decoder.feed(blob)
    frames = decoder.frames()
    assert decoder.buffered == 0, "data_to_send returned a partial frame"
    return frames


def joined(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def out(conn: Connection, limit: int = 1 << 30) -> list[Frame]:
    return decode_all(joined(conn.data_to_send(limit)))


def data(sid: int, payload: bytes, flags: Flag = NONE) -> bytes:
    return encode_header(DATA, flags, sid, len(payload)) + payload


def wu(sid: int, delta: int = 0, flags: Flag = NONE) -> bytes:
    return encode_header(WU, flags, sid, delta)


def summary(frames: list[Frame]) -> list[tuple[FrameType, Flag, int, int]]:
    return [(f.type, f.flags, f.stream_id, f.length) for f in frames]


def assert_terminated(conn: Connection, events: list[ev.Event], match: str = "") -> None:
    """The session ended on a protocol error: a last event, and GO_AWAY(1) on the wire."""
    assert events, "no events"
    last = events[-1]
    assert isinstance(last, ev.ConnectionTerminated), events
    assert last.error_code == GoAwayCode.PROTOCOL_ERROR == 1
    assert match in last.reason
    assert not any(isinstance(e, ev.ConnectionTerminated) for e in events[:-1])
    assert conn.terminated == last
    frames = out(conn)
    go_aways = [f for f in frames if f.type is GO_AWAY]
    assert [(f.stream_id, f.length) for f in go_aways] == [(0, 1)]
    # after termination every input is ignored, however valid
    assert conn.receive_data(encode_header(PING, SYN, 0, 7), 99.0) == []
    assert conn.receive_data(wu(conn._next_id + 1000, 0, SYN), 99.0) == []
    assert not conn.has_data_to_send()
    with pytest.raises(LocalProtocolError):
        conn.open_stream()
    with pytest.raises(LocalProtocolError):
        conn.ping(100.0)


def server() -> Connection:
    return Connection(client=False)


def opened(conn: Connection, sid: int, *, accept: bool = True) -> None:
    """The peer opens stream `sid` on `conn` (a bare SYN window update)."""
    events = conn.receive_data(wu(sid, 0, SYN), 0.0)
    assert events == [ev.StreamOpened(sid)]
    if accept:
        conn.accept_stream(sid)


# -- 6. data rides with SYN: zero round trips before the first byte --------------------


def test_first_data_frame_carries_syn_and_payload() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    assert sid == 1
    payload = random.Random(1).randbytes(1024)
    conn.send(sid, payload)
    frames = out(conn)
    assert summary(frames) == [(DATA, SYN, 1, 1024)]
    assert frames[0].payload == payload
    assert not conn.has_data_to_send()
    # later data carries no SYN
    conn.send(sid, b"more")
    assert summary(out(conn)) == [(DATA, NONE, 1, 4)]


def test_half_close_before_data_is_one_syn_fin_frame() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.end_stream(sid)
    assert summary(out(conn)) == [(WU, SYN | FIN, sid, 0)]
    assert sid in conn.stream_ids  # only half closed


def test_open_write_and_close_is_one_frame() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.send(sid, b"GET / HTTP/1.0\r\n\r\n")
    conn.end_stream(sid)
    frames = out(conn)
    assert summary(frames) == [(DATA, SYN | FIN, sid, 18)]
    assert frames[0].payload == b"GET / HTTP/1.0\r\n\r\n"


def test_open_alone_sends_a_bare_syn_and_ids_go_up_by_two() -> None:
    client, srv = Connection(client=True), server()
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [srv.open_stream() for _ in range(2)] == [2, 4]
    assert summary(out(client)) == [(WU, SYN, 1, 0), (WU, SYN, 3, 0), (WU, SYN, 5, 0)]


def test_accept_acks_on_the_first_frame_with_data() -> None:
    conn = server()
    events = conn.receive_data(data(1, b"hello", SYN), 0.0)
    assert events == [ev.StreamOpened(1), ev.DataReceived(1, b"hello")]
    assert out(conn) == []  # nothing until the application accepts
    conn.accept_stream(1)
    conn.send(1, b"world")
    assert summary(out(conn)) == [(DATA, ACK, 1, 5)]
    with pytest.raises(LocalProtocolError):
        conn.accept_stream(1)


def test_accept_alone_sends_a_bare_ack() -> None:
    conn = server()
    opened(conn, 1)
    assert summary(out(conn)) == [(WU, ACK, 1, 0)]


def test_a_deferred_ack_waits_for_the_first_frame_and_rides_on_it() -> None:
    conn = server()
    conn.receive_data(data(1, b"hello", SYN), 0.0)
    conn.accept_stream(1, ack_now=False)
    assert not conn.has_data_to_send()  # no bare ACK
    conn.send(1, b"ok")
    conn.end_stream(1)
    assert summary(out(conn)) == [(DATA, ACK | FIN, 1, 2)]


def test_a_deferred_ack_rides_on_a_reset() -> None:
    conn = server()
    conn.receive_data(data(1, b"hello", SYN), 0.0)
    conn.accept_stream(1, ack_now=False)
    conn.reset_stream(1)
    assert summary(out(conn)) == [(WU, ACK | RST, 1, 0)]


def test_reset_before_the_syn_went_out_sends_nothing() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.send(sid, b"never")
    conn.reset_stream(sid)
    assert out(conn) == []
    assert conn.stream_ids == [] and conn.pop_closed() == [sid]
    conn.reset_stream(sid)  # a second reset is a no-op
    assert out(conn) == []


def test_reset_after_the_syn_sends_rst_and_drops_queued_data() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.send(sid, b"x" * (INITIAL_WINDOW + 10))
    assert sum(f.length for f in out(conn) if f.type is DATA) == INITIAL_WINDOW
    assert conn.send_buffered(sid) == 10
    conn.reset_stream(sid)
    assert summary(out(conn)) == [(WU, RST, sid, 0)]
    assert conn.send_buffered(sid) == 0 and conn.stream_ids == []
    conn.receive_data(wu(sid, 100), 0.0)  # a late update: ignored, no data resumes
    assert out(conn) == []
    assert conn.terminated is None


def test_reset_of_an_accepted_stream_not_yet_acked_carries_ack() -> None:
    conn = server()
    opened(conn, 1)
    conn.reset_stream(1)
    assert summary(out(conn)) == [(WU, ACK | RST, 1, 0)]


def test_refusing_an_unaccepted_open_with_reset() -> None:
    conn = server()
    opened(conn, 1, accept=False)
    conn.reset_stream(1)
    assert summary(out(conn)) == [(WU, RST, 1, 0)]
    assert conn.stream_ids == [] and conn.pop_closed() == [1]
    with pytest.raises(LocalProtocolError):
        conn.accept_stream(1)


def test_reset_while_our_fin_waits_for_window() -> None:
    """Both sides half-closed, but our FIN still waits behind unsent data: reset works."""
    conn = server()
    opened(conn, 1)
    conn.send(1, b"z" * (INITIAL_WINDOW + 5))
    conn.end_stream(1)
    out(conn)
    assert conn.receive_data(wu(1, 0, FIN), 0.0) == [ev.StreamEnded(1)]
    assert conn.stream_ids == [1]  # the FIN (and 5 bytes) are not out yet
    conn.reset_stream(1)
    assert summary(out(conn)) == [(WU, RST, 1, 0)]
    assert conn.stream_ids == [] and conn.pop_closed() == [1]


def test_fin_then_peer_fin_forgets_the_stream() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.end_stream(sid)
    out(conn)
    assert conn.stream_ids == [sid] and conn.pop_closed() == []
    events = conn.receive_data(wu(sid, 0, ACK | FIN), 0.0)
    assert events == [ev.StreamEnded(sid)]
    assert conn.stream_ids == [] and conn.pop_closed() == [sid]
    with pytest.raises(LocalProtocolError):
        conn.send(sid, b"x")


def test_local_misuse_raises_local_protocol_error() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        conn.send(sid, b"after fin")
    with pytest.raises(LocalProtocolError):
        conn.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        conn.send(99, b"no such stream")
    conn.go_away()
    with pytest.raises(LocalProtocolError):
        conn.open_stream()
    assert summary(out(conn)) == [(GO_AWAY, NONE, 0, 0), (WU, SYN | FIN, 1, 0)]


# -- 3. limits and a hostile peer -----------------------------------------------------


def test_data_beyond_the_initial_window_terminates() -> None:
    conn = server()
    events = conn.receive_data(data(1, bytes(INITIAL_WINDOW), SYN), 0.0)
    assert events == [ev.StreamOpened(1), ev.DataReceived(1, bytes(INITIAL_WINDOW))]
    assert_terminated(conn, conn.receive_data(data(1, b"!"), 0.0), "beyond")


def test_one_frame_beyond_the_window_terminates_with_no_data_event() -> None:
    conn = server()
    events = conn.receive_data(data(1, bytes(INITIAL_WINDOW + 1), SYN), 0.0)
    assert events[0] == ev.StreamOpened(1)
    assert not any(isinstance(e, ev.DataReceived) for e in events)
    assert_terminated(conn, events, "beyond")


@given(st.lists(st.integers(1, 300 * KiB), min_size=1, max_size=8), st.booleans())
@settings(max_examples=60, deadline=None)
def test_the_peer_may_send_exactly_what_was_granted(consumes: list[int], over: bool) -> None:
    """Consume in random amounts; the peer sends exactly the credit it got; one byte more
    at any point ends the session."""
    conn = server()
    opened(conn, 1)
    out(conn)
    credit, unread = INITIAL_WINDOW, 0
    for amount in consumes:
        if credit:
            assert conn.receive_data(data(1, bytes(credit)), 0.0) == [
                ev.DataReceived(1, bytes(credit))
            ]
            unread, credit = unread + credit, 0
        take = min(amount, unread)
        conn.consumed(1, take, float(len(consumes)))
        unread -= take
        for f in out(conn):
            assert (f.type, f.stream_id) == (WU, 1)
            credit += f.length
        assert unread + credit <= INITIAL_WINDOW  # no rtt known: no growth
    if over or credit == 0:
        assert_terminated(conn, conn.receive_data(data(1, bytes(credit + 1)), 0.0), "beyond")
    else:
        assert conn.receive_data(data(1, bytes(credit)), 0.0) == [ev.DataReceived(1, bytes(credit))]
        assert conn.terminated is None


def test_a_1_gib_data_frame_is_refused_after_its_header() -> None:
    conn = server()
    opened(conn, 1)
    out(conn)
    header = encode_header(DATA, NONE, 1, 1 << 30)
    assert conn.receive_data(header[:11], 0.0) == []
    events = conn.receive_data(header[11:], 0.0)  # nothing of the payload was needed
    assert_terminated(conn, events, "exceeds")
    assert conn.receive_data(bytes(1 << 16), 0.0) == []  # the "payload" is ignored


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (bytes([1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]), "version"),
        (bytes([0, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), "unknown frame type"),
        (bytes([0, 1, 0, 0x11, 0, 0, 0, 1, 0, 0, 0, 0]), "unknown flags"),
        (bytes([0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "unknown flags"),
        (encode_header(PING, SYN, 1, 0), "PING frame on stream 1"),
        (encode_header(GO_AWAY, NONE, 3, 0), "GO_AWAY frame on stream 3"),
        (encode_header(DATA, SYN, 0, 0), "on stream 0"),
        (encode_header(PING, NONE, 0, 5), "neither SYN nor ACK"),
        (wu(2, 0, SYN), "may not"),  # the server's own parity
        (data(7, b"x"), "never opened"),
        (wu(9), "never opened"),
        (data(1, b"x", SYN | FIN) + data(1, b"y"), "recv data"),  # data after FIN
        (wu(1, 0, SYN | FIN) + wu(1, 0, FIN), "recv fin"),  # a second FIN
        (wu(1, 0, SYN) + wu(1, 0, SYN), "may not"),  # SYN on a live stream
        (wu(1, 0, SYN | RST) + wu(1, 0, SYN), "may not"),  # reuse of a gone id
        (wu(5, 0, SYN) + wu(3, 0, SYN), "may not"),  # an id below the highest
        (wu(1, MAX_U32 - INITIAL_WINDOW + 1, SYN), "2^32-1"),
        (wu(1, MAX_U32 - INITIAL_WINDOW, SYN) + wu(1, 1), "2^32-1"),
    ],
)
def test_protocol_violations_terminate(blob: bytes, match: str) -> None:
    conn = server()
    events = conn.receive_data(blob, 0.0)
    assert_terminated(conn, events, match)


def test_a_client_refuses_odd_opens_and_frames_on_unopened_own_ids() -> None:
    client = Connection(client=True)
    assert_terminated(client, client.receive_data(wu(1, 0, SYN), 0.0), "may not")
    client = Connection(client=True)
    assert_terminated(client, client.receive_data(wu(1, 5), 0.0), "never opened")
    client = Connection(client=True)
    sid = client.open_stream()
    client.reset_stream(sid)  # never announced, but ours: late frames are tolerated
    assert client.receive_data(wu(sid, 5), 0.0) == []
    assert_terminated(client, client.receive_data(wu(sid + 2, 5), 0.0), "never opened")


def test_the_window_may_reach_exactly_2_to_the_32_minus_1() -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    out(conn)
    assert conn.receive_data(wu(sid, MAX_U32 - INITIAL_WINDOW, ACK), 0.0) == []
    assert conn.terminated is None
    assert_terminated(conn, conn.receive_data(wu(sid, 1), 0.0), "2^32-1")


def test_late_frames_for_gone_streams_are_ignored() -> None:
    conn = server()
    opened(conn, 1)
    conn.reset_stream(1)
    assert summary(out(conn)) == [(WU, ACK | RST, 1, 0)]
    for late in (data(1, b"late"), wu(1, 10), wu(1, 0, FIN), wu(1, 0, RST)):
        assert conn.receive_data(late, 0.0) == []
    assert conn.terminated is None and out(conn) == []


def test_terminated_connection_ignores_input_and_keeps_reporting_nothing() -> None:
    conn = server()
    events = conn.receive_data(wu(1, 0, SYN) + bytes([7] * 12) + data(3, b"x", SYN), 0.0)
    assert events[0] == ev.StreamOpened(1)
    assert_terminated(conn, events, "version")
    assert conn.receive_data(data(5, b"y", SYN), 1.0) == []
    assert conn.handle_timer(1000.0) == []


def test_a_violation_after_our_normal_go_away_is_still_reported() -> None:
    conn = server()
    conn.go_away()
    assert summary(out(conn)) == [(GO_AWAY, NONE, 0, 0)]
    events = conn.receive_data(wu(2, 0, SYN), 0.0)
    assert_terminated(conn, events, "may not")


def test_opens_beyond_max_streams_are_refused_without_state() -> None:
    conn = Connection(client=False, config=Config(max_streams=3))
    own = conn.open_stream()
    opened(conn, 1)
    opened(conn, 3)
    assert sorted(conn.stream_ids) == sorted([1, 3, own])
    events = conn.receive_data(data(5, b"refused", SYN), 0.0)
    assert events == []
    assert sorted(conn.stream_ids) == sorted([1, 3, own])
    frames = out(conn)
    assert (WU, ACK | RST, 5, 0) in summary(frames)
    # late frames for the refused id are tolerated and create nothing; its id is spent
    assert conn.receive_data(data(5, b"more") + wu(5, 1, FIN), 0.0) == []
    assert_terminated(conn, conn.receive_data(wu(5, 0, SYN), 0.0), "may not")


def test_opens_beyond_max_pending_accepts_are_refused_without_state() -> None:
    conn = Connection(client=False, config=Config(max_pending_accepts=2))
    opened(conn, 1, accept=False)
    opened(conn, 3, accept=False)
    assert conn.receive_data(wu(5, 0, SYN), 0.0) == []
    assert summary(out(conn)) == [(WU, ACK | RST, 5, 0)]
    assert sorted(conn.stream_ids) == [1, 3]
    conn.accept_stream(1)  # one slot frees
    assert conn.receive_data(wu(7, 0, SYN), 0.0) == [ev.StreamOpened(7)]
    assert conn.receive_data(wu(9, 0, SYN), 0.0) == []
    assert summary(out(conn)) == [(WU, ACK | RST, 9, 0), (WU, ACK, 1, 0)]
    assert sorted(conn.stream_ids) == [1, 3, 7]


def test_opens_after_our_go_away_are_refused() -> None:
    conn = server()
    conn.go_away()
    assert conn.receive_data(wu(1, 0, SYN), 0.0) == []
    assert summary(out(conn)) == [(GO_AWAY, NONE, 0, 0), (WU, ACK | RST, 1, 0)]
    assert conn.stream_ids == []


def test_opens_after_the_peers_go_away_are_refused() -> None:
    conn = server()
    opened(conn, 1)
    events = conn.receive_data(encode_header(GO_AWAY, NONE, 0, 0) + data(3, b"late", SYN), 0.0)
    assert events == [ev.GoAwayReceived(0)]
    assert summary(out(conn)) == [(WU, ACK | RST, 3, 0), (WU, ACK, 1, 0)]
    assert conn.stream_ids == [1]  # what was open stays open
    assert conn.receive_data(data(1, b"still here"), 0.0) == [ev.DataReceived(1, b"still here")]
    with pytest.raises(LocalProtocolError):
        conn.open_stream()


def test_stream_ids_run_out() -> None:
    conn = Connection(client=True)
    conn._next_id = MAX_U32 - 2
    assert conn.open_stream() == MAX_U32 - 2
    assert conn.open_stream() == MAX_U32
    with pytest.raises(LocalProtocolError, match="exhausted"):
        conn.open_stream()


@pytest.mark.parametrize("backlog", [1, 8, 1024])
def test_a_ping_flood_without_reading_terminates(backlog: int) -> None:
    conn = Connection(client=False, config=Config(max_control_backlog=backlog))
    pings = b"".join(encode_header(PING, SYN, 0, i) for i in range(backlog))
    assert conn.receive_data(pings, 0.0) == []
    # reading our replies resets the count: the same flood again is fine
    assert summary(out(conn)) == [(PING, ACK, 0, i) for i in range(backlog)]
    assert conn.receive_data(pings, 0.0) == []
    events = conn.receive_data(encode_header(PING, SYN, 0, 99), 0.0)
    assert isinstance(events[-1], ev.ConnectionTerminated)
    frames = out(conn)
    assert summary(frames)[:backlog] == [(PING, ACK, 0, i) for i in range(backlog)]
    assert summary(frames)[backlog:] == [(GO_AWAY, NONE, 0, 1)]
    assert conn.receive_data(encode_header(PING, SYN, 0, 100), 0.0) == []


def test_an_open_flood_counts_toward_the_control_backlog() -> None:
    conn = Connection(client=False, config=Config(max_pending_accepts=1, max_control_backlog=4))
    opened(conn, 1, accept=False)
    refused = b"".join(wu(sid, 0, SYN) for sid in (3, 5, 7, 9))
    assert conn.receive_data(refused, 0.0) == []
    events = conn.receive_data(wu(11, 0, SYN), 0.0)
    assert_terminated(conn, events, "flood")


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """Mostly well-formed frames with random fields: a confused or malicious peer."""
    type_ = draw(st.sampled_from(FrameType))
    flags = Flag(draw(st.integers(0, 15)))
    sid = 0 if type_ in (PING, GO_AWAY) else draw(st.integers(1, 12))
    if type_ is DATA:
        size = draw(st.sampled_from([0, 1, 100, 64 * KiB, INITIAL_WINDOW]))
        return data(sid, bytes(size), flags)
    length = draw(st.sampled_from([0, 1, 1000, INITIAL_WINDOW, MAX_U32]))
    return encode_header(type_, flags, sid, length)


@given(
    st.booleans(),
    st.lists(st.one_of(hostile_frames(), st.binary(max_size=30)), max_size=25),
    st.lists(st.sampled_from(["read", "accept", "reset", "send", "consume"]), max_size=25),
)
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_hostile_peer_never_makes_receive_data_raise(
    client: bool, blobs: list[bytes], actions: list[str]
) -> None:
    config = Config(max_streams=4, max_pending_accepts=2, max_control_backlog=6)
    conn = Connection(client=client, config=config)
    conn.open_stream()
    ended = False
    unread: dict[int, int] = {}
    for i, blob in enumerate(blobs):
        events = conn.receive_data(blob, float(i))
        if ended:
            assert events == []
            continue
        for e in events[:-1]:
            assert not isinstance(e, ev.ConnectionTerminated)
        if events and isinstance(events[-1], ev.ConnectionTerminated):
            ended = True
            assert events[-1].error_code == 1
            assert (GO_AWAY, NONE, 0, 1) in summary(out(conn))
            continue
        for e in events:
            if isinstance(e, ev.DataReceived):
                unread[e.stream_id] = unread.get(e.stream_id, 0) + len(e.data)
        # bounded state, whatever the peer does
        assert len(conn.stream_ids) <= config.max_streams
        assert len(conn._pending_accepts) <= config.max_pending_accepts
        assert conn._provoked <= config.max_control_backlog
        for stream in conn._streams.values():
            assert 0 <= stream.recv_window <= stream.window == INITIAL_WINDOW
        if i < len(actions):
            action = actions[i]
            pending = sorted(conn._pending_accepts)
            live = sorted(conn.stream_ids)
            if action == "read":
                out(conn, 1000)
            elif action == "accept" and pending:
                conn.accept_stream(pending[0])
            elif action == "reset" and live:
                conn.reset_stream(live[-1])
            elif action == "send" and live:
                try:
                    conn.send(live[0], b"payload")
                except LocalProtocolError:
                    pass  # half closed by us: the caller's error, not the peer's
            elif action == "consume" and live:
                take = min(unread.get(live[0], 0), 10 * KiB)
                unread[live[0]] = unread.get(live[0], 0) - take
                conn.consumed(live[0], take, float(i))


# -- 4. fairness and flow control ------------------------------------------------------


def test_a_small_stream_is_not_stuck_behind_a_big_one() -> None:
    turn = 64 * KiB  # less than the window, so the turn is what ends the big stream's go
    conn = Connection(client=True, config=Config(turn_bytes=turn))
    big, small = conn.open_stream(), conn.open_stream()
    conn.send(big, bytes(4 * MiB))
    conn.send(small, b"tiny request")
    frames = out(conn, limit=2 * turn)
    assert summary(frames) == [
        (DATA, SYN, big, turn),
        (DATA, SYN, small, 12),
        (DATA, NONE, big, turn - 2 * 12 - 12),
    ]
    # a batch smaller than a turn: the small stream comes first in the next one
    conn = Connection(client=True)
    big, small = conn.open_stream(), conn.open_stream()
    conn.send(big, bytes(4 * MiB))
    conn.send(small, b"tiny request")
    assert summary(out(conn, limit=1000)) == [(DATA, SYN, big, 1000)]
    assert summary(out(conn, limit=1000)) == [(DATA, SYN, small, 12), (DATA, NONE, big, 976)]


@given(
    st.lists(st.integers(1, 200 * KiB), min_size=1, max_size=6),
    st.lists(st.integers(1000, 300 * KiB), min_size=1, max_size=10),
    st.sampled_from([1000, 16 * KiB, 64 * KiB]),
)
@settings(max_examples=150, deadline=None)
def test_streams_take_turns_round_robin(sizes: list[int], limits: list[int], turn: int) -> None:
    conn = Connection(client=True, config=Config(turn_bytes=turn))
    sids = [conn.open_stream() for _ in sizes]
    left = dict(zip(sids, sizes, strict=True))
    for sid, size in left.items():
        conn.send(sid, bytes(size))
    queue = deque(sids)
    seen: set[int] = set()
    i = 0
    while conn.has_data_to_send():
        limit = limits[i % len(limits)]
        i += 1
        frames = out(conn, limit)
        assert sum(f.length for f in frames) <= limit
        for f in frames:
            assert f.type is DATA
            expected = queue.popleft()
            assert f.stream_id == expected, "a stream jumped the round-robin queue"
            assert 0 < f.length <= turn
            assert f.flags == (NONE if expected in seen else SYN)
            seen.add(expected)
            left[expected] -= f.length
            if left[expected]:
                queue.append(expected)
        assert i < 10_000
    assert not queue and all(v == 0 for v in left.values())


@given(st.integers(1, 3 * MiB), st.lists(st.integers(2 * KiB, 400 * KiB), min_size=1, max_size=5))
@settings(max_examples=100, deadline=None)
def test_a_sender_never_exceeds_the_peers_window(size: int, limits: list[int]) -> None:
    conn = Connection(client=True)
    sid = conn.open_stream()
    conn.send(sid, random.Random(size).randbytes(size))
    conn.end_stream(sid)
    sent = bytearray()
    fin = False
    granted = INITIAL_WINDOW
    rng = random.Random(size)
    for _ in range(1000):
        while conn.has_data_to_send():
            for f in out(conn, rng.choice(limits)):
                assert not fin
                sent += f.payload
                fin = bool(f.flags & FIN)
            assert len(sent) <= granted
        if fin:
            break
        assert len(sent) == granted  # stalled exactly at the window
        assert conn.send_buffered(sid) == size - len(sent)
        assert out(conn) == []
        delta = rng.choice([1, 1000, INITIAL_WINDOW, MiB])
        granted += delta
        assert conn.receive_data(wu(sid, delta, ACK if delta == 1 else NONE), 0.0) == []
    assert fin and sent == random.Random(size).randbytes(size)
    assert conn.send_buffered(sid) == 0


def ping_pong(conn: Connection, sent: float, rtt: float) -> None:
    assert conn.ping(sent)
    (frame,) = out(conn)
    assert (frame.type, frame.flags, frame.stream_id) == (PING, SYN, 0)
    events = conn.receive_data(encode_header(PING, ACK, 0, frame.length), sent + rtt)
    assert events == [ev.PongReceived(pytest.approx(rtt))]


def test_window_update_when_half_the_window_is_consumed() -> None:
    conn = server()
    assert conn.receive_data(data(1, bytes(INITIAL_WINDOW), SYN), 0.0)[0] == ev.StreamOpened(1)
    conn.accept_stream(1)
    out(conn)
    conn.consumed(1, INITIAL_WINDOW // 2 - 1, 0.0)
    assert out(conn) == []  # not yet half
    conn.consumed(1, 6, 0.0)
    assert summary(out(conn)) == [(WU, NONE, 1, INITIAL_WINDOW // 2 + 5)]  # 131077 bytes
    conn.consumed(1, INITIAL_WINDOW // 2 - 5, 0.0)
    assert out(conn) == []
    # the peer sends FIN: no more credit is needed, none is sent
    assert conn.receive_data(wu(1, 0, FIN), 0.0) == [ev.StreamEnded(1)]
    conn.consumed(1, 10, 0.0)
    assert out(conn) == []


def test_an_update_as_our_first_frame_carries_the_ack() -> None:
    conn = server()
    conn.receive_data(data(1, bytes(INITIAL_WINDOW), SYN), 0.0)
    conn.accept_stream(1)
    conn.consumed(1, INITIAL_WINDOW, 0.0)  # the update is our first frame: it carries ACK
    assert summary(out(conn)) == [(WU, ACK, 1, INITIAL_WINDOW)]
    conn.send(1, b"reply")
    assert summary(out(conn)) == [(DATA, NONE, 1, 5)]


@pytest.mark.parametrize(
    "kwargs", [{"initial_window": 128 * KiB}, {"initial_window": 1 * MiB}, {"turn_bytes": 0}]
)
def test_configs_that_cannot_work_are_refused(kwargs: dict[str, int]) -> None:
    # initial_window: the peer assumes 256 KiB, so 128 KiB made it overrun us (a protocol
    # error between honest peers) and 1 MiB stalled it at 256 KiB for ever (no update is
    # due before half the window is read); turn_bytes=0 made data_to_send spin.
    with pytest.raises(ValueError):
        Config(**kwargs)  # type: ignore[arg-type]


class GreedyPeer:
    """A peer that sends all the window allows on its streams; we read it all each round."""

    def __init__(self, conn: Connection, sids: list[int]) -> None:
        self.conn = conn
        self.credit = dict.fromkeys(sids, INITIAL_WINDOW)

    def rounds(self, sids: list[int], rounds: int, gap: float, now: float) -> dict[int, list[int]]:
        """Per stream, the window the peer holds after each round."""
        windows: dict[int, list[int]] = {sid: [] for sid in sids}
        for _ in range(rounds):
            now += gap
            for sid in sids:
                n = self.credit[sid]
                while self.credit[sid]:
                    chunk = min(self.credit[sid], MAX_PAYLOAD)
                    assert self.conn.receive_data(data(sid, bytes(chunk)), now) == [
                        ev.DataReceived(sid, bytes(chunk))
                    ]
                    self.credit[sid] -= chunk
                self.conn.consumed(sid, n, now)
                for f in out(self.conn):
                    assert (f.type, f.flags, f.stream_id) == (WU, NONE, sid)
                    assert f.length >= n  # never less than what was read
                    self.credit[sid] += f.length
                windows[sid].append(self.credit[sid])
                assert self.credit[sid] == self.conn._streams[sid].window
        return windows


def test_fast_consumption_grows_the_window_to_max_window() -> None:
    conn = Connection(client=False, config=Config(max_window=2 * MiB))
    ping_pong(conn, 0.0, 0.05)
    opened(conn, 1)
    out(conn)
    windows = GreedyPeer(conn, [1]).rounds([1], rounds=5, gap=0.05, now=1.0)
    # The whole window is consumed each round trip: the first round starts the measurement,
    # then each update adds up to 4x its credit and at most twice the window, to the bound.
    assert windows[1] == [256 * KiB, 768 * KiB, 2 * MiB, 2 * MiB, 2 * MiB]


def test_the_rate_is_measured_over_a_round_trip() -> None:
    """Reads in quick succession are not a fast link: growth waits for a whole round trip."""
    conn = Connection(client=False, config=Config(max_window=2 * MiB))
    ping_pong(conn, 0.0, 0.05)
    opened(conn, 1)
    out(conn)
    windows = GreedyPeer(conn, [1]).rounds([1], rounds=7, gap=0.01, now=1.0)
    assert windows[1] == [256 * KiB] * 5 + [768 * KiB, 2 * MiB]


def test_slow_consumption_does_not_grow_the_window() -> None:
    conn = Connection(client=False, config=Config(max_window=2 * MiB))
    ping_pong(conn, 0.0, 0.05)
    opened(conn, 1)
    out(conn)
    windows = GreedyPeer(conn, [1]).rounds([1], rounds=5, gap=0.25, now=1.0)  # > 4 rtt
    assert windows[1] == [INITIAL_WINDOW] * 5


def test_a_large_window_is_granted_back_in_steps() -> None:
    """Half of a 64 MiB window is too long a wait on a long link: credit goes back per MiB."""
    conn = Connection(client=False, config=Config(max_window=4 * MiB))
    ping_pong(conn, 0.0, 0.05)
    opened(conn, 1)
    out(conn)
    windows = GreedyPeer(conn, [1]).rounds([1], rounds=5, gap=0.05, now=1.0)
    assert windows[1][-1] == 4 * MiB
    for _ in range(2):
        conn.receive_data(data(1, bytes(MAX_PAYLOAD)), 2.0)
    conn.consumed(1, UPDATE_STEP - 1, 9.0)
    assert out(conn) == []  # a quarter of the window, less a byte
    conn.consumed(1, 1, 9.0)
    assert summary(out(conn)) == [(WU, NONE, 1, UPDATE_STEP)]  # slow: no growth, none needed


def test_no_rtt_no_growth() -> None:
    conn = server()
    opened(conn, 1)
    out(conn)
    windows = GreedyPeer(conn, [1]).rounds([1], rounds=4, gap=0.0001, now=1.0)
    assert windows[1] == [INITIAL_WINDOW] * 4


def test_window_growth_respects_the_budget_and_frees_it_on_close() -> None:
    budget = 300 * KiB
    conn = Connection(client=False, config=Config(max_window=4 * MiB, window_budget=budget))
    ping_pong(conn, 0.0, 0.05)
    for sid in (1, 3):
        opened(conn, sid)
    out(conn)
    peer = GreedyPeer(conn, [1, 3])
    windows = peer.rounds([1, 3], rounds=4, gap=0.05, now=1.0)
    # the first round measures; then stream 1 takes the whole budget (it would triple), and
    # stream 3 gets nothing more
    assert windows[1] == [256 * KiB, 556 * KiB, 556 * KiB, 556 * KiB]
    assert windows[3] == [256 * KiB] * 4
    assert conn._budget_used == budget
    # stream 1 goes away: its growth returns to the budget, and stream 3 may grow
    assert conn.receive_data(wu(1, 0, RST), 2.0) == [ev.StreamReset(1)]
    assert conn._budget_used == 0
    windows = peer.rounds([3], rounds=3, gap=0.05, now=1.2)
    assert windows[3] == [256 * KiB + budget] * 3


@given(
    st.floats(0.001, 1.0),
    st.integers(256 * KiB, 8 * MiB),
    st.integers(0, 8 * MiB),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 600 * KiB), st.floats(0, 2.0)),
        min_size=1,
        max_size=40,
    ),
)
@settings(max_examples=120, deadline=None)
def test_window_tuning_properties(
    rtt: float, max_window: int, budget: int, steps: list[tuple[int, int, float]]
) -> None:
    config = Config(max_window=max_window, window_budget=budget)
    conn = Connection(client=False, config=config)
    ping_pong(conn, 0.0, rtt)
    sids = [1, 3, 5]
    for sid in sids:
        opened(conn, sid)
    out(conn)
    credit = dict.fromkeys(sids, INITIAL_WINDOW)
    unread = dict.fromkeys(sids, 0)
    unacked = dict.fromkeys(sids, 0)
    window = dict.fromkeys(sids, INITIAL_WINDOW)  # the peer's view: credit + in our hands
    first: dict[int, float] = {}  # when each stream's first bytes were taken
    now = 1.0
    for pick, amount, gap in steps:
        sid = sids[pick]
        now += gap
        if credit[sid]:  # the peer sends all it may
            chunk = min(credit[sid], MAX_PAYLOAD)
            conn.receive_data(data(sid, bytes(chunk)), now)
            credit[sid] -= chunk
            unread[sid] += chunk
        take = min(amount, unread[sid])
        if take:
            first.setdefault(sid, now)
        conn.consumed(sid, take, now)
        unread[sid] -= take
        unacked[sid] += take
        frames = out(conn)
        assert len(frames) <= 1
        for f in frames:
            assert (f.type, f.stream_id) == (WU, sid)
            grow = f.length - unacked[sid]
            assert grow >= 0
            if grow:  # only once a round trip's consumption was measured
                assert now - first[sid] >= rtt
                assert grow <= 2 * window[sid]  # at most triples
                assert grow <= 4 * unacked[sid]  # at most 4x the credit granted back
            unacked[sid] = 0
            credit[sid] += f.length
            window[sid] += grow
        assert credit[sid] + unread[sid] + unacked[sid] == window[sid]
        assert window[sid] <= max(max_window, INITIAL_WINDOW)
        assert sum(w - INITIAL_WINDOW for w in window.values()) <= budget
        assert unread[sid] <= window[sid]


# -- 5. keepalive with an explicit clock ----------------------------------------------


def test_keepalive_pings_and_measures_rtt() -> None:
    conn = Connection(client=True, config=Config(keepalive_interval=10, keepalive_timeout=30))
    assert conn.get_timer() is None
    conn.start_keepalive(0)
    assert conn.get_timer() == 10
    assert conn.handle_timer(9.99) == [] and out(conn) == []
    assert conn.handle_timer(10) == []
    (ping,) = out(conn)
    assert (ping.type, ping.flags, ping.stream_id) == (PING, SYN, 0)
    assert conn.get_timer() == 20
    # a wrong opaque is no pong
    assert conn.receive_data(encode_header(PING, ACK, 0, ping.length + 1), 10.1) == []
    events = conn.receive_data(encode_header(PING, ACK, 0, ping.length), 10.25)
    assert events == [ev.PongReceived(pytest.approx(0.25))]
    assert conn.rtt == pytest.approx(0.25)
    assert conn.handle_timer(20) == []
    (ping2,) = out(conn)
    assert ping2.type is PING and ping2.length != ping.length
    assert conn.get_timer() == 30
    events = conn.receive_data(encode_header(PING, ACK, 0, ping2.length), 21)
    assert events == [ev.PongReceived(pytest.approx(1.0))]
    assert conn.rtt == pytest.approx(0.875 * 0.25 + 0.125 * 1.0)
    assert conn.handle_timer(60) == [] and conn.terminated is None


def test_keepalive_without_a_pong_terminates() -> None:
    conn = Connection(client=True, config=Config(keepalive_interval=10, keepalive_timeout=30))
    conn.start_keepalive(0)
    assert conn.handle_timer(10) == []
    assert summary(out(conn)) == [(PING, SYN, 0, 1)]
    assert conn.get_timer() == 20
    assert conn.handle_timer(20) == []  # one ping outstanding: no second one
    assert out(conn) == []
    assert conn.handle_timer(30) == []
    assert conn.get_timer() == 40
    events = conn.handle_timer(40)
    assert len(events) == 1 and isinstance(events[0], ev.ConnectionTerminated)
    assert events[0].error_code == GoAwayCode.INTERNAL_ERROR
    assert conn.terminated == events[0]
    assert conn.handle_timer(50) == []
    # a late pong changes nothing
    assert conn.receive_data(encode_header(PING, ACK, 0, 1), 41) == []


def test_we_answer_pings_with_the_same_opaque() -> None:
    conn = server()
    assert conn.receive_data(encode_header(PING, SYN, 0, 0xCAFE), 0.0) == []
    assert summary(out(conn)) == [(PING, ACK, 0, 0xCAFE)]


def test_no_keepalive_no_timer() -> None:
    conn = Connection(client=True)
    conn.start_keepalive(0)
    assert conn.get_timer() is None
    assert conn.handle_timer(1e9) == []
    assert conn.ping(0.0) and not conn.ping(1.0)  # one outstanding ping at a time


# -- 2. two honest peers joined in memory: a state machine over random interleavings ----

PAIR_CONFIG = Config(max_window=1 * MiB, window_budget=(3 * MiB) // 2, turn_bytes=16 * KiB)


class Side:
    """One peer, and a model of what its application did and saw."""

    def __init__(self, name: str, client: bool) -> None:
        self.name = name
        self.conn = Connection(client=client, config=PAIR_CONFIG)
        self.known: set[int] = set()  # streams it had state for: opened, or StreamOpened
        self.written: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        self.read: dict[int, int] = {}
        self.fin_called: set[int] = set()
        self.reset_called: set[int] = set()
        self.ended: set[int] = set()  # StreamEnded seen
        self.reset_seen: set[int] = set()  # StreamReset seen
        self.popped: set[int] = set()
        self.went_away = False
        self.ping_at: float | None = None
        # what its own output held (a sniffer on the wire it writes)
        self.out_decoder = FrameDecoder()
        self.framed: set[int] = set()  # streams it sent any frame on
        self.last_syn = 0
        self.fin_sent: set[int] = set()
        self.rst_sent: set[int] = set()
        self.data_sent: dict[int, int] = {}
        self.granted: dict[int, int] = {}  # window update deltas it sent
        self.grants_in: dict[int, int] = {}  # window update deltas that reached it
        self.go_aways_sent = 0

    def know(self, sid: int) -> None:
        assert sid not in self.known
        self.known.add(sid)
        self.written[sid] = bytearray()
        self.received[sid] = bytearray()
        self.read[sid] = 0

    def gone(self, sid: int) -> bool:
        """Whether the stream's state must be gone: reset, or both FINs (ours sent)."""
        return (
            sid in self.reset_called
            or sid in self.reset_seen
            or (sid in self.ended and sid in self.fin_sent)
        )

    def own(self, sid: int) -> bool:
        return (sid % 2 == 1) == self.conn.client


class MuxPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sides = [Side("client", True), Side("server", False)]
        self.wire = [bytearray(), bytearray()]  # written by side i, not yet delivered
        self.in_decoder = [FrameDecoder(), FrameDecoder()]  # what side i delivered
        self.healthy = True

    # -- the wire ---------------------------------------------------------------------

    def emit(self, i: int, limit: int) -> int:
        me, peer = self.sides[i], self.sides[1 - i]
        blob = joined(me.conn.data_to_send(limit))
        me.out_decoder.feed(blob)
        frames = me.out_decoder.frames()
        assert me.out_decoder.buffered == 0, "a partial frame was handed out"
        assert sum(f.length for f in frames if f.type is DATA) <= limit
        for f in frames:
            self.sniff(me, peer, f)
        self.wire[i] += blob
        return len(blob)

    def sniff(self, me: Side, peer: Side, f: Frame) -> None:
        """Check each frame a side writes against what its application asked for."""
        if f.type is GO_AWAY:
            assert me.went_away and f.length == 0
            me.go_aways_sent += 1
            assert me.go_aways_sent == 1
            return
        if f.type is PING:
            assert f.flags in (SYN, ACK)
            return
        sid = f.stream_id
        assert sid not in me.rst_sent, "a frame after RST"
        if sid not in me.framed:
            me.framed.add(sid)
            if me.own(sid):
                assert f.flags & SYN, "the first frame of our stream lacks SYN"
                assert sid > me.last_syn, "streams announced out of order"
                me.last_syn = sid
            else:
                assert f.flags & ACK, "the first frame on the peer's stream lacks ACK"
        else:
            assert not f.flags & (SYN | ACK), "SYN or ACK on a later frame"
        if f.flags & RST:
            # our reset, or a refused open after our go-away
            going = me.went_away or me.conn.remote_goaway
            assert sid in me.reset_called or (going and sid not in me.known)
            me.rst_sent.add(sid)
            return
        assert sid in me.known
        if f.type is DATA and f.length:
            assert sid not in me.fin_sent, "data after FIN"
            start = me.data_sent.get(sid, 0)
            assert f.payload == me.written[sid][start : start + f.length]
            me.data_sent[sid] = start + f.length
            assert me.data_sent[sid] <= INITIAL_WINDOW + me.grants_in.get(sid, 0), (
                "sent beyond the peer's window"
            )
        if f.type is WU:
            me.granted[sid] = me.granted.get(sid, 0) + f.length
        if f.flags & FIN:
            assert sid in me.fin_called and sid not in me.fin_sent
            assert me.data_sent.get(sid, 0) == len(me.written[sid]), "FIN before the data"
            me.fin_sent.add(sid)

    def deliver(self, i: int, n: int) -> int:
        sender, receiver = self.sides[i], self.sides[1 - i]
        chunk = bytes(self.wire[i][:n])
        del self.wire[i][:n]
        decoder = self.in_decoder[i]
        decoder.feed(chunk)
        for f in decoder.frames():
            if f.type is WU:
                receiver.grants_in[f.stream_id] = receiver.grants_in.get(f.stream_id, 0) + f.length
        events = receiver.conn.receive_data(chunk, self.now)
        self.dispatch(receiver, sender, events)
        return len(chunk)

    def dispatch(self, me: Side, peer: Side, events: list[ev.Event]) -> None:
        new: list[int] = []
        for e in events:
            if isinstance(e, ev.StreamOpened):
                sid = e.stream_id
                assert not me.own(sid) and sid in peer.known and sid in peer.framed
                me.know(sid)
                new.append(sid)
            elif isinstance(e, ev.DataReceived):
                sid = e.stream_id
                assert e.data, "an empty DataReceived"
                assert sid in me.known and sid not in me.ended | me.reset_seen | me.reset_called
                start = len(me.received[sid])
                assert e.data == peer.written[sid][start : start + len(e.data)], (
                    "bytes lost, duplicated or reordered"
                )
                me.received[sid] += e.data
            elif isinstance(e, ev.StreamEnded):
                sid = e.stream_id
                assert sid in me.known and sid not in me.ended | me.reset_seen
                assert sid in peer.fin_sent, "ended without the peer's FIN"
                assert me.received[sid] == peer.written[sid], "ended before all data came"
                me.ended.add(sid)
            elif isinstance(e, ev.StreamReset):
                sid = e.stream_id
                assert sid in me.known and sid not in me.reset_seen | me.reset_called
                assert sid in peer.rst_sent
                me.reset_seen.add(sid)
            elif isinstance(e, ev.PongReceived):
                assert me.ping_at is not None
                assert e.rtt == max(self.now - me.ping_at, 1e-6)
                me.ping_at = None
            elif isinstance(e, ev.GoAwayReceived):
                assert e.error_code == 0 and peer.went_away
                assert me.conn.remote_goaway
            else:
                raise AssertionError(f"{me.name} got {e!r} from an honest peer")
        for sid in new:  # the application accepts whatever is still there
            if sid in me.conn.stream_ids:
                me.conn.accept_stream(sid)

    def read_all(self) -> bool:
        """Both applications read everything they hold."""
        moved = False
        for side in self.sides:
            for sid in sorted(side.known):
                unread = len(side.received[sid]) - side.read[sid]
                if unread:
                    side.conn.consumed(sid, unread, self.now)
                    side.read[sid] += unread
                    moved = True
        return moved

    def pump_all(self, *, eager: bool = False) -> bool:
        """Move bytes both ways until quiet; `eager`: the applications read as it comes."""
        moved = False
        for _ in range(10_000):
            step = self.read_all() if eager else 0
            for i in (0, 1):
                if self.sides[i].conn.has_data_to_send():
                    step += self.emit(i, 1 << 20)
                if self.wire[i]:
                    step += self.deliver(i, len(self.wire[i]))
            if not step:
                return moved
            moved = True
        raise AssertionError("the pair never went quiet")

    @staticmethod
    def pick(k: int, candidates: Iterable[int]) -> int | None:
        ids = sorted(candidates)
        return ids[k % len(ids)] if ids else None

    # -- rules ------------------------------------------------------------------------

    sides_ = st.integers(0, 1)
    index = st.integers(0, 1000)
    # big sizes often: windows (256 KiB) must fill, drain and grow
    sizes = st.builds(
        int.__add__, st.sampled_from([0, 100, 16 * KiB, 200 * KiB, 1 * MiB]), st.integers(0, 999)
    )

    @rule(i=sides_)
    def open_stream(self, i: int) -> None:
        self.healthy = False
        side = self.sides[i]
        if side.conn.local_goaway or side.conn.remote_goaway:
            with pytest.raises(LocalProtocolError):
                side.conn.open_stream()
            return
        sid = side.conn.open_stream()
        assert side.own(sid) and sid not in self.sides[1 - i].known
        side.know(sid)

    @rule(
        i=sides_,
        k=index,
        size=sizes,
        seed=st.integers(0, 255),
    )
    def write(self, i: int, k: int, size: int, seed: int) -> None:
        self.healthy = False
        side = self.sides[i]
        sid = self.pick(k, set(side.conn.stream_ids) - side.fin_called)
        if sid is None:
            return
        payload = random.Random(seed * 1000 + size).randbytes(size)
        side.conn.send(sid, payload)
        side.written[sid] += payload

    @rule(i=sides_, k=index)
    def half_close(self, i: int, k: int) -> None:
        self.healthy = False
        side = self.sides[i]
        sid = self.pick(k, set(side.conn.stream_ids) - side.fin_called)
        if sid is None:
            return
        side.conn.end_stream(sid)
        side.fin_called.add(sid)

    @rule(i=sides_, k=index)
    def reset(self, i: int, k: int) -> None:
        self.healthy = False
        side = self.sides[i]
        sid = self.pick(k, side.conn.stream_ids)
        if sid is None:
            return
        side.conn.reset_stream(sid)
        side.reset_called.add(sid)

    @rule(i=sides_, k=index, n=sizes)
    def read(self, i: int, k: int, n: int) -> None:
        self.healthy = False
        side = self.sides[i]
        sid = self.pick(k, {s for s in side.known if len(side.received[s]) > side.read[s]})
        if sid is None:
            return
        take = min(n, len(side.received[sid]) - side.read[sid])
        side.conn.consumed(sid, take, self.now)
        side.read[sid] += take

    @rule(i=sides_, limit=st.builds(max, sizes, st.just(1)))
    def send_some(self, i: int, limit: int) -> None:
        self.healthy = False
        self.emit(i, limit)

    @rule(i=sides_, n=sizes)
    def deliver_some(self, i: int, n: int) -> None:
        self.healthy = False
        self.deliver(i, n)

    @rule(eager=st.booleans())
    def pump(self, eager: bool) -> None:
        self.healthy = False
        self.pump_all(eager=eager)

    @rule(i=sides_)
    def ping(self, i: int) -> None:
        self.healthy = False
        side = self.sides[i]
        sent = side.conn.ping(self.now)
        assert sent == (side.ping_at is None)
        if sent:
            side.ping_at = self.now

    @rule(dt=st.sampled_from([0.0, 0.001, 0.01, 0.1, 1.0]))
    def tick(self, dt: float) -> None:
        self.healthy = False
        self.now += dt

    @rule(i=sides_, dice=st.integers(0, 7))
    def go_away(self, i: int, dice: int) -> None:
        self.healthy = False
        if dice:  # rarely: it ends the opening of streams for good
            return
        self.sides[i].conn.go_away()
        self.sides[i].went_away = True

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        self.healthy = False
        for side in self.sides:
            conn = side.conn
            assert conn.terminated is None
            live = set(conn.stream_ids)
            assert live <= side.known
            for sid in side.known:
                assert (sid in live) != side.gone(sid), (side.name, sid)
            popped = conn.pop_closed()
            assert len(set(popped)) == len(popped) and not side.popped & set(popped)
            side.popped |= set(popped)
            assert side.popped == {sid for sid in side.known if side.gone(sid)}
            assert not conn._pending_accepts  # accepted at once
            growth = 0
            for sid in live:
                stream = conn._streams[sid]
                assert conn.send_buffered(sid) == len(side.written[sid]) - side.data_sent.get(
                    sid, 0
                )
                held = len(side.received[sid]) - side.read[sid]
                assert held <= stream.window <= PAIR_CONFIG.max_window
                assert len(side.received[sid]) <= INITIAL_WINDOW + side.granted.get(sid, 0)
                growth += stream.window - INITIAL_WINDOW
            assert growth == conn._budget_used <= PAIR_CONFIG.window_budget
        self.healthy = True

    def teardown(self) -> None:
        if not self.healthy:
            return  # a rule or invariant failed: that is the report
        # both applications read everything and half-close everything; then all is gone
        for _ in range(1000):
            moved = self.read_all()
            for side in self.sides:
                for sid in side.conn.stream_ids:
                    if sid not in side.fin_called:
                        side.conn.end_stream(sid)
                        side.fin_called.add(sid)
                        moved = True
            moved |= self.pump_all()
            self.consistent()
            if not moved:
                break
        else:
            raise AssertionError("the pair never closed")
        for i, side in enumerate(self.sides):
            peer = self.sides[1 - i]
            assert side.conn.stream_ids == []
            assert not side.conn.has_data_to_send() and side.conn.data_to_send() == []
            assert not self.wire[i]
            assert side.conn._budget_used == 0
            assert side.popped == side.known
            for sid in side.known:
                assert side.conn.send_buffered(sid) == 0
                if (
                    sid in peer.known
                    and sid not in side.reset_called | side.reset_seen | peer.reset_called
                ):
                    # no reset: everything arrived, and the stream ended on both sides
                    assert side.received[sid] == peer.written[sid]
                    assert sid in side.ended and sid in peer.fin_sent


MuxPair.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_two_honest_peers = MuxPair.TestCase


LIFECYCLE_ACTIONS = [(action, i) for i in (0, 1) for action in "wfrsp"]


@pytest.mark.parametrize("setup", ["opened", "opened and delivered"])
def test_every_short_stream_lifecycle(setup: str) -> None:
    """Exhaustive, not random: every sequence of four actions on one stream, with the
    invariants of the state machine above after each action and a full close after.
    Actions, by either side: w(rite), f(in), r(eset), s(end, not delivered yet),
    p(ush: send and deliver, with what was sent before)."""
    for seq in itertools.product(LIFECYCLE_ACTIONS, repeat=4):
        pair = MuxPair()
        try:
            pair.open_stream(0)
            if setup == "opened and delivered":
                pair.emit(0, 1 << 20)
                pair.deliver(0, 1 << 30)
            pair.consistent()
            for action, i in seq:
                if action == "w":
                    pair.write(i, 0, 100, 1)
                elif action == "f":
                    pair.half_close(i, 0)
                elif action == "r":
                    pair.reset(i, 0)
                elif action == "s":
                    pair.emit(i, 1 << 20)
                else:
                    pair.emit(i, 1 << 20)
                    pair.deliver(i, 1 << 30)
                pair.consistent()
            pair.teardown()
        except Exception as exc:
            steps = " ".join(f"{action}{i}" for action, i in seq)
            raise AssertionError(f"after {setup}, actions {steps}: {exc!r}") from exc
