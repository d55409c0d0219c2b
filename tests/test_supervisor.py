"""The session owner in-process: two supervisors in one event loop, linked by socketpairs.

A connector here is a rendezvous: both sides' connect() calls meet and each gets one end of
a fresh socketpair (no TLS: the supervisor, session and apps are what is under test). The
test can break the current link at will, as a dead peer or a cut cable would.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import pytest

from tete_tunnel.carrier import plain_carrier
from tete_tunnel.errors import LinkBroken, PeerAborted, PeerViolation, TransferAborted
from tete_tunnel.forward import Forwarder, parse_spec
from tete_tunnel.pipe import PipeApp
from tete_tunnel.policy import Policy
from tete_tunnel.secure import Mode, SecureLink
from tete_tunnel.session import Keepalive
from tete_tunnel.supervisor import Ending, supervise


class Network:
    """Where both sides' connect() calls meet; each round is one socketpair."""

    def __init__(self) -> None:
        self._waiting: asyncio.Future[socket.socket] | None = None
        self.rounds: list[tuple[socket.socket, socket.socket]] = []
        self.new_round = asyncio.Event()

    async def meet(self) -> socket.socket:
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_future()
            waiting = self._waiting
            return await waiting
        mine, theirs = socket.socketpair()
        self.rounds.append((theirs, mine))
        self._waiting.set_result(theirs)
        self._waiting = None
        self.new_round.set()
        return mine

    def cut(self) -> None:
        """Both ends of the current link go dead at once (no go-away, no FIN)."""
        for sock in self.rounds[-1]:
            sock.shutdown(socket.SHUT_RDWR)


class PairConnector:
    def __init__(self, network: Network, name: str) -> None:
        self.network = network
        self.name = name
        self.connects = 0

    def describe(self) -> str:
        return "socketpair"

    async def connect(self, deadline: float | None) -> SecureLink:
        self.connects += 1
        sock = await self.network.meet()
        carrier = await plain_carrier(sock)
        other = b"b" if self.name == "a" else b"a"
        return SecureLink(
            carrier=carrier,
            peer_fingerprint=other * 32,
            peer_id=f"peer-{other.decode()}",
            is_tls_client=self.name == "a",
            mode=Mode.PEER_ID,
            safety_code="000-000",
        )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _feed(fd: int, data: bytes) -> threading.Thread:
    def write() -> None:
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _drain(fd: int, into: list[bytes], first: threading.Event | None = None) -> threading.Thread:
    def read() -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                into.append(chunk)
                if first is not None:
                    first.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_pipe_both_ways_ends_in_order_with_receipts() -> None:
    data_a, data_b = os.urandom(3 << 20), os.urandom(1 << 20)
    got_a: list[bytes] = []
    got_b: list[bytes] = []

    async def main() -> tuple[Ending, Ending]:
        net = Network()
        in_a, feed_a = os.pipe()
        in_b, feed_b = os.pipe()
        out_a, sink_a = os.pipe()[::-1]
        out_b, sink_b = os.pipe()[::-1]
        threads = [
            _feed(feed_a, data_a),
            _feed(feed_b, data_b),
            _drain(sink_a, got_a),
            _drain(sink_b, got_b),
        ]
        apps = PipeApp(in_a, out_a), PipeApp(in_b, out_b)
        stops = asyncio.Event(), asyncio.Event()
        results = await asyncio.gather(
            *(
                supervise(PairConnector(net, n), app, timeout=10, keepalive=None, stop=stop)
                for n, app, stop in zip("ab", apps, stops, strict=True)
            )
        )
        for fd in (in_a, in_b, out_a, out_b):
            os.close(fd)
        for t in threads:
            await asyncio.to_thread(t.join, 10)
        return results

    assert run(main()) == [Ending.BY_US, Ending.BY_US]
    assert b"".join(got_b) == data_a
    assert b"".join(got_a) == data_b


def test_pipe_link_cut_is_a_typed_broken_link_not_an_end() -> None:
    async def main() -> list[BaseException | Ending]:
        net = Network()
        r_a, w_a = os.pipe()  # stdin that never ends
        r_b, w_b = os.pipe()
        apps = (
            PipeApp(r_a, os.open(os.devnull, os.O_WRONLY)),
            PipeApp(r_b, os.open(os.devnull, os.O_WRONLY)),
        )
        tasks = [
            asyncio.ensure_future(
                supervise(
                    PairConnector(net, n), app, timeout=10, keepalive=None, stop=asyncio.Event()
                )
            )
            for n, app in zip("ab", apps, strict=True)
        ]
        await net.new_round.wait()
        await asyncio.sleep(0.2)
        net.cut()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for fd in (r_a, w_a, r_b, w_b):
            os.close(fd)
        return results

    results = run(main())
    for outcome in results:
        assert isinstance(outcome, LinkBroken), outcome
        assert isinstance(outcome, PeerAborted)
        assert "connection to peer lost" in str(outcome)


def test_pipe_peer_interrupted_is_an_aborted_transfer_on_the_other_side() -> None:
    async def main() -> list[BaseException | Ending]:
        net = Network()
        r_a, w_a = os.pipe()
        r_b, w_b = os.pipe()
        out_b, sink_b = os.pipe()[::-1]
        got: list[bytes] = []
        arrived = threading.Event()
        drain = _drain(sink_b, got, arrived)
        os.write(w_a, b"a first part")
        stops = asyncio.Event(), asyncio.Event()
        apps = PipeApp(r_a, os.open(os.devnull, os.O_WRONLY)), PipeApp(r_b, out_b)
        tasks = [
            asyncio.ensure_future(
                supervise(PairConnector(net, n), app, timeout=10, keepalive=None, stop=stop)
            )
            for n, app, stop in zip("ab", apps, stops, strict=True)
        ]
        assert await asyncio.to_thread(arrived.wait, 10)
        stops[0].set()  # Ctrl-C on the sender, whose stdin has not ended
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for fd in (r_a, w_a, r_b, w_b, out_b):
            os.close(fd)
        await asyncio.to_thread(drain.join, 10)
        assert b"".join(got) == b"a first part"
        return results

    a, b = run(main())
    assert isinstance(a, TransferAborted) and "interrupted" in str(a)
    assert isinstance(b, TransferAborted) and "the peer aborted the transfer" in str(b)


async def _echo_target_and_its_forward() -> tuple[asyncio.Server, Forwarder]:
    """An echo server, and a Forwarder with -L from a free port to it."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    spec = parse_spec(f"0:127.0.0.1:{target.sockets[0].getsockname()[1]}", "-L")
    return target, Forwarder(local=[spec], remote=[], policy=Policy())


async def _through(app: Forwarder, payload: bytes) -> bytes:
    """What comes back through the app's -L for `payload` (sent, then our FIN)."""
    port = app.relays[0].sock.getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def test_forward_reconnects_under_the_same_listener_and_is_stopped_in_order() -> None:
    async def main() -> tuple[list[bytes], Ending, Ending, int]:
        net = Network()

        target, client_app = await _echo_target_and_its_forward()
        server_app = Forwarder(local=[], remote=[], policy=Policy())
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        alive = Keepalive(interval=0.5, timeout=2)
        sa = asyncio.ensure_future(
            supervise(PairConnector(net, "a"), client_app, timeout=10, keepalive=alive, stop=stop_a)
        )
        sb = asyncio.ensure_future(
            supervise(PairConnector(net, "b"), server_app, timeout=10, keepalive=alive, stop=stop_b)
        )

        await net.new_round.wait()
        got = [await _through(client_app, b"first link")]
        port_before = client_app.relays[0].sock.getsockname()[1]
        net.new_round.clear()
        net.cut()
        await net.new_round.wait()  # both sides came back on their own
        got.append(await _through(client_app, b"second link"))
        assert client_app.relays[0].sock.getsockname()[1] == port_before
        stop_a.set()
        ending_a, ending_b = await asyncio.gather(sa, sb)
        target.close()
        return got, ending_a, ending_b, len(net.rounds)

    got, a, b, rounds = run(main())
    assert got == [b"first link", b"second link"]
    assert (a, b) == (Ending.BY_US, Ending.BY_PEER)
    assert rounds == 2


def test_a_protocol_violation_is_named_as_such(tmp_path: Path) -> None:
    async def main() -> BaseException | Ending:
        net = Network()
        r, w = os.pipe()
        app = PipeApp(r, os.open(os.devnull, os.O_WRONLY))
        task = asyncio.ensure_future(
            supervise(
                PairConnector(net, "a"), app, timeout=10, keepalive=None, stop=asyncio.Event()
            )
        )
        raw = await net.meet()  # we are the other side, and we speak nonsense
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_sendall(raw, b"\x07" * 12)
        result = await asyncio.gather(task, return_exceptions=True)
        raw.close()
        for fd in (r, w):
            os.close(fd)
        return result[0]

    outcome = run(main())
    assert isinstance(outcome, PeerViolation), outcome
    assert "protocol error" in str(outcome)


@pytest.mark.parametrize("seconds", [0.3])
def test_stop_before_any_link_is_interrupted_not_an_end(seconds: float) -> None:
    from tete_tunnel.supervisor import Interrupted

    async def main() -> BaseException | Ending:
        stop = asyncio.Event()
        app = Forwarder(local=[], remote=[], policy=Policy())
        task = asyncio.ensure_future(
            supervise(PairConnector(Network(), "a"), app, timeout=10, keepalive=None, stop=stop)
        )
        await asyncio.sleep(seconds)
        stop.set()
        return (await asyncio.gather(task, return_exceptions=True))[0]

    outcome = run(main())
    assert isinstance(outcome, Interrupted)
    assert "interrupted before the peer was connected" in str(outcome)


class UpgradingConnector(PairConnector):
    """A relayed first link, then a 'direct' one from a second network when upgrade() is
    called; `late` seconds pass on this side between the direct link meeting and it being
    ready (a handshake still finishing), so the other side retires the relayed session
    first."""

    def __init__(self, network: Network, direct: Network, name: str, late: float) -> None:
        super().__init__(network, name)
        self.direct, self.late = direct, late

    async def connect(self, deadline: float | None) -> SecureLink:
        link = await super().connect(deadline)
        return SecureLink(**{**link.__dict__, "path": "relayed via test"})

    async def upgrade(self) -> SecureLink:
        if self.direct.rounds:
            await asyncio.Future()  # one direct round per test: later links stay relayed
        saved, self.network = self.network, self.direct
        try:
            link = await super().connect(None)
        finally:
            self.network = saved
        try:
            await asyncio.sleep(self.late)
        except asyncio.CancelledError:
            assert link.carrier.transport is not None
            link.carrier.transport.abort()  # a handshake given up: its connection goes
            raise
        return SecureLink(**{**link.__dict__, "path": "direct"})


@pytest.mark.parametrize("late_side", ["a", "b"])
def test_the_side_that_finishes_the_upgrade_later_follows_the_peer(late_side: str) -> None:
    """Regression (CI, test_an_upgraded_forward_falls_back_to_the_relay): the peer upgraded,
    retired the relayed session (no streams: at once) and closed it, while our side of the
    direct link was still finishing; we ended with "Peer closed connection" instead of
    going on over the direct link. GO_AWAY(5) moved tells us to follow."""

    async def main() -> tuple[list[bytes], Ending, Ending]:
        net, direct = Network(), Network()

        target, client_app = await _echo_target_and_its_forward()
        server_app = Forwarder(local=[], remote=[], policy=Policy())
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        late = {"a": 0.0, "b": 0.0, late_side: 1.0}
        connectors = {n: UpgradingConnector(net, direct, n, late[n]) for n in "ab"}
        sa = asyncio.ensure_future(
            supervise(connectors["a"], client_app, timeout=10, keepalive=None, stop=stop_a)
        )
        sb = asyncio.ensure_future(
            supervise(connectors["b"], server_app, timeout=10, keepalive=None, stop=stop_b)
        )

        await direct.new_round.wait()
        await asyncio.sleep(2.0)  # both sides' direct links are ready by now
        assert not sa.done() and not sb.done(), (sa, sb)
        # both sides retired and closed the relayed link: what goes through takes the direct one
        assert [sock.fileno() for sock in net.rounds[0]] == [-1, -1]
        got = [await _through(client_app, b"after the upgrade")]
        stop_a.set()
        ending_a, ending_b = await asyncio.gather(sa, sb)
        target.close()
        return got, ending_a, ending_b

    got, a, b = run(main())
    assert got == [b"after the upgrade"]
    assert (a, b) == (Ending.BY_US, Ending.BY_PEER)


def test_a_move_the_late_side_cannot_follow_is_a_lost_link(monkeypatch) -> None:
    """The peer retired the relayed session, but our side of the direct link never becomes
    ready: after FOLLOW_WAIT we take the link as lost and reconnect (so does the peer, whose
    direct link we abandon), rather than end or hang."""
    from tete_tunnel import supervisor

    monkeypatch.setattr(supervisor, "FOLLOW_WAIT", 0.5)

    async def main() -> tuple[Ending, Ending, int]:
        net, direct = Network(), Network()
        apps = {n: Forwarder(local=[], remote=[], policy=Policy()) for n in "ab"}
        stops = {n: asyncio.Event() for n in "ab"}
        late = {"a": 3600.0, "b": 0.0}
        tasks = {
            n: asyncio.ensure_future(
                supervise(
                    UpgradingConnector(net, direct, n, late[n]),
                    apps[n],
                    timeout=10,
                    keepalive=None,
                    stop=stops[n],
                )
            )
            for n in "ab"
        }
        await direct.new_round.wait()
        while len(net.rounds) < 2:  # both come back relayed
            net.new_round.clear()
            await net.new_round.wait()
        assert not any(t.done() for t in tasks.values())
        stops["a"].set()
        ending_a, ending_b = await asyncio.gather(tasks["a"], tasks["b"])
        return ending_a, ending_b, len(net.rounds)

    a, b, rounds = run(main())
    assert (a, b, rounds) == (Ending.BY_US, Ending.BY_PEER, 2)
