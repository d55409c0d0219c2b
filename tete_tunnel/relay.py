"""`tete-tunnel relay`: where peers meet, learn each other's public address, time their
punch, and, when no direct path opens, have their two TCP connections joined.

The relay only ever sees rendezvous names (tete_tunnel/rendezvous.py: a hash of two IDs, or
a code's public nameplate), addresses, and ciphertext: the peers run HELLO, SPAKE2 and TLS
end to end over whatever path it arranges, so it cannot read, impersonate, or test a code.

    control connection (from the port the peer punches from)
        -> join {name, local addresses}      <- observed {addr}
                                             <- paired {peer: observed, local}
        <- ping / -> pong                    (round-trip time to each peer)
                                             <- punch   (timed so both SYNs cross)
        -> result {direct: bool}             <- direct | splice {token}
                                             <- punch   (again, every upgrade interval,
                                                         while their data goes through us)
    data connection (any port), after splice
        -> splice {token}                    <- go, then bytes both ways, moved in the kernel

Everything is bounded (RelayLimits) and a misbehaving client is answered by closing its
connection: junk never reaches anything but its own socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from tete_tunnel import rendezvous as rv
from tete_tunnel.errors import TeteError
from tete_tunnel.log import Throttled
from tete_tunnel.net import endpoint, in_use_message, unmapped

log = logging.getLogger("tete_tunnel")

LISTEN_BACKLOG = 1024
CLOSED: dict[str, Any] = {"op": "_closed"}  # put in a member's inbox when it leaves
PING_TIMEOUT = 2.0  # a paired peer that does not answer the relay's ping is timed as 1 s away
DIRECT_REPORT_WAIT = 25.0  # after punch: direct attempts (5 s) + a handshake (10 s) + slack
# Bytes a splice pipe holds (F_SETPIPE_SZ). 256 KiB costs ~10% more CPU than 1 MiB, but an
# unprivileged relay has 64 MiB of pipe buffers in all (fs.pipe-user-pages-soft): 128 pairs,
# where 1 MiB pipes fell back to 8 KiB (5x the CPU) from the 33rd pair on.
PIPE_SIZE = 256 << 10
CHUNK = 1 << 20  # bytes asked of one splice() call
MAX_CLOSED_NAMEPLATES = 100_000  # remembered failed attempts (~10 MB at most)
ACCEPT_PAUSE = 0.1  # after accept() failed for want of descriptors or memory
_ACCEPT_LATER = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}


@dataclass(frozen=True)
class RelayLimits:
    """What one relay process holds at most; the defaults suit a small server."""

    max_pending: int = 512  # connections that have not said what they want yet
    first_message_timeout: float = 10.0  # ... and their time to say it
    max_waiting: int = 10_000  # peers waiting for their partner at once
    join_timeout: float = 600.0  # how long a peer may wait for its partner
    max_sessions: int = 100  # relayed pairs at once (--max-sessions)
    idle_timeout: float = 600.0  # a relayed pair that moves no byte for this long is cut
    max_session_bytes: int = 0  # bytes a relayed pair may move, both ways; 0: no limit
    splice_wait: float = 15.0  # the second data connection must come within this
    upgrade_interval: float = 60.0  # a relayed pair is told to try direct again this often
    nameplate_hold: float = 600.0  # a nameplate whose attempt failed stays closed this long


@dataclass
class _Member:
    """A peer on a control connection, joined to a name."""

    sock: socket.socket
    observed: tuple[str, int]
    local: list[str]
    inbox: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(16))
    rtt: float = 1.0
    gone: bool = False


@dataclass
class _Rendezvous:
    name: str
    members: list[_Member] = field(default_factory=list)
    paired: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False  # paired once: a third joiner is refused while it lasts


class RelayServer:
    """The relay: owns its listener, every connection and every task it starts."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.limits = limits or RelayLimits()
        self._names: dict[str, _Rendezvous] = {}
        self._closed_nameplates: dict[str, float] = {}  # name -> closed until (loop time)
        self._slots: dict[str, _SpliceSlot] = {}
        self._pending = 0
        self._waiting = 0
        self.sessions = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        # A second port that answers whoami as the first does (and everything else too): a
        # client compares how its NAT maps one local port to two destinations (netcheck).
        self._second: socket.socket | None = None
        self.second_port: int | None = None
        self.stats = {"connections": 0, "refused": 0, "paired": 0, "relayed": 0, "bytes": 0}
        self._throttled = Throttled()

    # -- lifetime ---------------------------------------------------------------------------

    def bind(self, host: str, port: int) -> tuple[str, int]:
        self._listener = _listen(host, port)
        bound = self._listener.getsockname()
        return bound[0], bound[1]

    def bind_second(self, host: str, port: int) -> int:
        """Listen on a second port too (0: any free one); its number is told to whoami."""
        self._second = _listen(host, port)
        self.second_port = self._second.getsockname()[1]
        return self.second_port

    async def serve(self) -> None:
        """Accept until cancelled; then every connection and task is closed and awaited."""
        assert self._listener is not None
        listeners = [s for s in (self._listener, self._second) if s is not None]
        accepting = [asyncio.ensure_future(self._accept(s)) for s in listeners]
        try:
            await asyncio.gather(*accepting)
        finally:
            for task in accepting:
                task.cancel()
            await asyncio.gather(*accepting, return_exceptions=True)
            for s in listeners:
                s.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno not in _ACCEPT_LATER:
                    raise
                # Out of descriptors or memory (a crowd of connections): the new ones
                # wait in the backlog until some close; the relay must not stop.
                self._throttled.warning(
                    "accept", loop.time(), "relay: cannot accept connections: %s", exc.strerror
                )
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            self.stats["connections"] += 1
            if self._pending >= self.limits.max_pending:
                self.stats["refused"] += 1
                conn.close()
                continue
            conn.setblocking(False)
            self._spawn(self._greet(conn, (unmapped(addr[0]), addr[1])))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the first message --------------------------------------------------------------------

    async def _greet(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        """Read what a new connection wants, within the limit; anything else closes it."""
        keep = False
        self._pending += 1
        try:
            try:
                async with asyncio.timeout(self.limits.first_message_timeout):
                    message = await rv.recv_message(sock)
            except (TimeoutError, OSError, rv.RendezvousError):
                return
            finally:
                self._pending -= 1
            op = message.get("op")
            if op == "whoami":
                answer: dict[str, Any] = {"op": "observed", "addr": rv.format_address(*addr)}
                if self.second_port is not None:
                    answer["second_port"] = self.second_port
                await rv.send_message(sock, answer)
            elif op == "allocate":
                keep = True
                await self._allocate(sock, addr, message)
            elif op == "join":
                keep = True
                await self._join(sock, addr, message)
            elif op == "splice":
                keep = True
                await self._splice(sock, message)
        except (OSError, rv.RendezvousError, TimeoutError) as exc:
            log.debug("relay: %s: %s", rv.format_address(*addr), exc)
        finally:
            if not keep:
                sock.close()

    # -- rendezvous ---------------------------------------------------------------------------

    async def _allocate(
        self, sock: socket.socket, addr: tuple[str, int], message: dict[str, Any]
    ) -> None:
        """A free nameplate for a generated code (the one proposed, if free); the connection
        then joins it. With several relays the client proposes: the nameplate decides which
        relay both peers go to."""
        try:
            proposal = message.get("nameplate")
            if proposal is not None:
                if not isinstance(proposal, str) or not self._nameplate_free(proposal):
                    await rv.send_message(sock, {"op": "error", "reason": "nameplate taken"})
                    return
                nameplate = proposal
            else:
                nameplate = self._free_nameplate()
            await rv.send_message(sock, {"op": "nameplate", "nameplate": nameplate})
            async with asyncio.timeout(self.limits.first_message_timeout):
                joined = await rv.recv_message(sock)
            if joined.get("op") != "join" or joined.get("name") != rv.name_for_nameplate(nameplate):
                return
            await self._join(sock, addr, joined, allocated=True)
        finally:
            sock.close()

    def _nameplate_free(self, nameplate: str) -> bool:
        if not rv.valid_name(rv.name_for_nameplate(nameplate)) or nameplate != str(int(nameplate)):
            return False
        name = rv.name_for_nameplate(nameplate)
        closed = self._closed_nameplates.get(name, 0.0)
        return name not in self._names and closed <= asyncio.get_running_loop().time()

    def _free_nameplate(self) -> str:
        for digits in (1, 2, 3, 4, 5, 6):
            for _ in range(20):
                nameplate = rv.random_nameplate(digits)
                if self._nameplate_free(nameplate):
                    return nameplate
        raise rv.RendezvousError("no free nameplate")

    async def _join(
        self,
        sock: socket.socket,
        addr: tuple[str, int],
        message: dict[str, Any],
        allocated: bool = False,
    ) -> None:
        try:
            await self._serve_member(sock, addr, message, allocated)
        finally:
            sock.close()

    async def _serve_member(
        self, sock: socket.socket, addr: tuple[str, int], message: dict[str, Any], allocated: bool
    ) -> None:
        name = message.get("name")
        local = message.get("local", [])
        if not isinstance(name, str) or not rv.valid_name(name) or not isinstance(local, list):
            return
        local = [a for a in local[: rv.MAX_LOCAL_ADDRESSES] if _valid_address(a)]
        refusal = self._refusal(name, allocated)
        if refusal is not None:
            await rv.send_message(sock, {"op": "error", "reason": refusal})
            return
        member = _Member(sock, addr, local)
        meeting = self._names.setdefault(name, _Rendezvous(name))
        meeting.members.append(member)
        self._waiting += 1
        reader = asyncio.ensure_future(self._read_member(member))
        try:
            await rv.send_message(sock, {"op": "observed", "addr": rv.format_address(*addr)})
            if len(meeting.members) == 2:
                meeting.done = True
                meeting.paired.set()
                self.stats["paired"] += 1
                await self._pair(meeting)  # this member's task serves the pair
            else:
                waiter = asyncio.ensure_future(meeting.paired.wait())
                try:
                    await asyncio.wait(
                        [waiter, reader],
                        timeout=self.limits.join_timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                if not meeting.paired.is_set():
                    return  # it left, or waited too long
            await reader  # stay until this member leaves
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._waiting -= 1
            if member in meeting.members:
                meeting.members.remove(member)
            if meeting.done and self._names.get(name) is meeting:
                del self._names[name]  # a pair is over once one of it leaves: free the name
                for other in meeting.members:
                    _dissolve(other)
            if not meeting.members and self._names.get(name) is meeting:
                del self._names[name]

    def _refusal(self, name: str, allocated: bool) -> str | None:
        if self._waiting >= self.limits.max_waiting:
            return "the relay is full: too many peers waiting"
        now = asyncio.get_running_loop().time()
        if self._closed_nameplates.get(name, 0.0) > now:
            return (
                f"nameplate {name[3:]} was used by a pairing attempt that failed "
                "authentication (a wrong code was tried: someone guessing, or a typo); pick "
                "a new code on both sides"
            )
        meeting = self._names.get(name)
        if meeting is not None and (meeting.done or len(meeting.members) >= 2):
            if not name.startswith("np-"):
                return (
                    "these two peer IDs are already paired at this relay: is another copy "
                    "of this command running, on this side or the peer's?"
                )
            return (
                f"nameplate {name[3:]} is already taken by a pair of peers: if one of them "
                "should be you, someone else joined first (a guess?); pick a new code"
            )
        return None

    async def _read_member(self, member: _Member) -> None:
        """Messages from one member into its inbox until it leaves or misbehaves; then a
        CLOSED message, so whoever serves the pair learns it at once."""
        try:
            while True:
                message = await rv.recv_message(member.sock)
                with contextlib.suppress(asyncio.QueueFull):  # a flood is dropped, not queued
                    member.inbox.put_nowait(message)
        except (OSError, rv.RendezvousError):
            pass
        finally:
            member.gone = True
            while True:  # make room: the end must get through
                try:
                    member.inbox.put_nowait(CLOSED)
                    break
                except asyncio.QueueFull:
                    member.inbox.get_nowait()

    async def _pair(self, meeting: _Rendezvous) -> None:
        """Introduce the two, time their punch, then pick their path; stay with them while
        both are here."""
        a, b = meeting.members
        for me, other in ((a, b), (b, a)):
            peer = {"observed": rv.format_address(*other.observed), "local": other.local}
            await rv.send_message(me.sock, {"op": "paired", "peer": peer})
        await self._time_punch(a, b)
        reports = [asyncio.ensure_future(self._result(m, meeting)) for m in (a, b)]
        try:
            while not all(r.done() for r in reports) and not (a.gone or b.gone):
                await asyncio.wait(reports, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for r in reports:
                r.cancel()
            await asyncio.gather(*reports, return_exceptions=True)
        if a.gone or b.gone:
            return  # the pair is over: the one left is told (_serve_member)
        results = [r.result() for r in reports]
        if results == [True, True]:
            for member in (a, b):
                await rv.send_message(member.sock, {"op": "direct"})
            await self._linger(a, b, meeting, None)
            return
        slot = _SpliceSlot()
        token = secrets.token_hex(16)
        self._slots[token] = slot
        try:
            for member in (a, b):
                await rv.send_message(member.sock, {"op": "splice", "token": token})
            await self._linger(a, b, meeting, slot)
        finally:
            self._slots.pop(token, None)

    async def _time_punch(self, a: _Member, b: _Member) -> None:
        """DCUtR's timing: measure both round trips, tell the farther peer first and the
        nearer one half the difference later, so that both act, and their SYNs leave, at
        once."""
        await asyncio.gather(self._measure(a), self._measure(b))
        far, near = (a, b) if a.rtt >= b.rtt else (b, a)
        await rv.send_message(far.sock, {"op": "punch"})
        await asyncio.sleep(max(0.0, (far.rtt - near.rtt) / 2))
        await rv.send_message(near.sock, {"op": "punch"})

    async def _measure(self, member: _Member) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await rv.send_message(member.sock, {"op": "ping"})
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                while (message := await member.inbox.get()).get("op") != "pong":
                    if message is CLOSED:
                        member.inbox.put_nowait(CLOSED)  # for whoever reads next
                        return
            member.rtt = loop.time() - started
        except TimeoutError:
            member.rtt = 1.0

    async def _result(self, member: _Member, meeting: _Rendezvous) -> bool:
        """The member's report on its direct attempt: True if it linked directly."""
        try:
            async with asyncio.timeout(DIRECT_REPORT_WAIT):
                while True:
                    message = await member.inbox.get()
                    if message is CLOSED:
                        return False
                    if message.get("op") == "result":
                        if message.get("auth_failed"):
                            self._close_nameplate(meeting)
                        return message.get("direct") is True
        except TimeoutError:
            return False

    def _close_nameplate(self, meeting: _Rendezvous) -> None:
        """A code's nameplate whose attempt failed authentication serves no other attempt
        for a while: the real peer who comes later is told, not paired with a guesser."""
        if meeting.name.startswith("np-"):
            now = asyncio.get_running_loop().time()
            closed = self._closed_nameplates
            if len(closed) >= MAX_CLOSED_NAMEPLATES:  # forget the expired ones, then the oldest
                for name in [n for n, until in closed.items() if until <= now]:
                    del closed[name]
                while len(closed) >= MAX_CLOSED_NAMEPLATES:
                    del closed[next(iter(closed))]
            closed.pop(meeting.name, None)  # insertion order = closing order
            closed[meeting.name] = now + self.limits.nameplate_hold

    async def _linger(
        self, a: _Member, b: _Member, meeting: _Rendezvous, slot: _SpliceSlot | None
    ) -> None:
        """While both control connections live: note failed authentication, and while the
        pair's data goes through us, time a new direct attempt every upgrade interval."""
        while True:
            try:
                async with asyncio.timeout(self.limits.upgrade_interval):
                    _, message = await _first(a.inbox, b.inbox)
            except TimeoutError:
                if slot is not None and slot.active:
                    await self._time_punch(a, b)
                continue
            if message is CLOSED:
                return
            if message.get("op") == "result" and message.get("auth_failed"):
                self._close_nameplate(meeting)

    # -- data connections ---------------------------------------------------------------------

    async def _splice(self, sock: socket.socket, message: dict[str, Any]) -> None:
        """A data connection: the first of a pair waits for the second, then both are joined."""
        token = message.get("token")
        slot = self._slots.get(token) if isinstance(token, str) else None
        try:
            if slot is None or slot.active:
                return
            if slot.first is None:
                slot.first = sock
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.limits.splice_wait):
                        await slot.taken.wait()
                if slot.taken.is_set():
                    sock = None  # type: ignore[assignment]  # the second's task owns it now
                else:
                    slot.first = None
                return
            first, slot.first = slot.first, None
            slot.taken.set()
            slot.active = True
            try:
                await self._relay_pair(first, sock)
            finally:
                slot.active = False
                first.close()
        finally:
            if sock is not None:
                sock.close()

    async def _relay_pair(self, first: socket.socket, second: socket.socket) -> None:
        if self.sessions >= self.limits.max_sessions:
            for s in (first, second):
                with contextlib.suppress(OSError):
                    await rv.send_message(
                        s, {"op": "error", "reason": "the relay is busy: try later"}
                    )
            return
        self.sessions += 1
        self.stats["relayed"] += 1
        try:
            for s in (first, second):
                await rv.send_message(s, {"op": "go"})
            self.stats["bytes"] += await join(first, second, self.limits)
        finally:
            self.sessions -= 1


@dataclass
class _SpliceSlot:
    """Where a pair's two data connections meet."""

    first: socket.socket | None = None
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    active: bool = False  # their bytes are going through us


def _dissolve(member: _Member) -> None:
    """The other of a pair left: tell this one to meet again (best effort: the message is
    tiny and the socket's buffer all but empty), then end its control connection."""
    with contextlib.suppress(OSError):
        member.sock.send(rv.encode({"op": "retry", "reason": "the peer left the relay"}))
    with contextlib.suppress(OSError):
        member.sock.shutdown(socket.SHUT_RDWR)


async def _first(*queues: asyncio.Queue[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    getters = [asyncio.ensure_future(q.get()) for q in queues]
    try:
        done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
        for i, getter in enumerate(getters):
            if getter in done:
                return i, getter.result()
        raise AssertionError("unreachable")
    finally:
        for getter in getters:
            getter.cancel()


# -- moving bytes -----------------------------------------------------------------------------


async def join(a: socket.socket, b: socket.socket, limits: RelayLimits) -> int:
    """Move bytes both ways until both directions have ended, one fails, none moved for
    limits.idle_timeout, or limits.max_session_bytes have moved; returns the bytes moved.

    In the kernel where it can: os.splice through a pipe per direction, so ciphertext never
    enters this process. Half-close passes on (EOF one way is a shutdown the other way).
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    budget = _Budget(limits.max_session_bytes or None)
    first = _Pump(loop, a, b, budget)
    try:
        second = _Pump(loop, b, a, budget)
    except OSError:  # no descriptors left for the second pipe
        first.stop()
        raise
    pumps = [first, second]
    ended = 0

    def finished(pump: _Pump, error: BaseException | None) -> None:
        nonlocal ended
        ended += 1
        if (error is not None or ended == 2) and not done.done():
            done.set_result(error)

    for pump in pumps:
        pump.start(finished)
    try:
        while True:
            before = sum(p.moved for p in pumps)
            try:
                async with asyncio.timeout(limits.idle_timeout):
                    await asyncio.shield(done)
                break
            except TimeoutError:
                if sum(p.moved for p in pumps) == before:
                    break  # idle: cut it
    finally:
        for pump in pumps:
            pump.stop()
    return sum(p.moved for p in pumps)


class _Budget:
    """The bytes a session may still move, both ways together (max_session_bytes); None: no
    limit. The pumps read no more than it allows, so the limit holds to the byte."""

    def __init__(self, left: int | None) -> None:
        self.left = left

    def allows(self) -> int:
        return CHUNK if self.left is None else min(CHUNK, self.left)

    def spend(self, n: int) -> None:
        if self.left is not None:
            self.left -= n

    def spent(self) -> bool:
        return self.left is not None and self.left <= 0


class _SessionLimit(Exception):
    """The session moved its max_session_bytes: it is cut."""


class _Pump:
    """One direction: source socket -> pipe -> destination socket, all non-blocking."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        budget: _Budget | None = None,
    ):
        self.loop = loop
        self.src, self.dst = src, dst
        self.budget = budget or _Budget(None)
        self.moved = 0
        self.held = 0  # bytes in the pipe
        self.eof = False
        self.watching: tuple[str, int] | None = None
        self.on_done: Any = None
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def start(self, on_done: Any) -> None:
        self.on_done = on_done
        self._watch_read()

    def _watch_read(self) -> None:
        self._unwatch()
        self.loop.add_reader(self.src.fileno(), self._readable)
        self.watching = ("r", self.src.fileno())

    def _watch_write(self) -> None:
        self._unwatch()
        self.loop.add_writer(self.dst.fileno(), self._writable)
        self.watching = ("w", self.dst.fileno())

    def _unwatch(self) -> None:
        if self.watching is not None:
            kind, fd = self.watching
            (self.loop.remove_reader if kind == "r" else self.loop.remove_writer)(fd)
            self.watching = None

    def _readable(self) -> None:
        if self.budget.spent():  # the other direction used it up
            self._finish(_SessionLimit())
            return
        try:
            n = os.splice(self.src.fileno(), self.w, self.budget.allows(), flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(exc)
            return
        if n == 0:
            self.eof = True
        self.budget.spend(n)
        self.held += n
        self._drain()

    def _writable(self) -> None:
        self._drain()

    def _drain(self) -> None:
        while self.held:
            try:
                n = os.splice(self.r, self.dst.fileno(), self.held, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._watch_write()  # the destination is full: stop reading until it drains
                return
            except OSError as exc:
                self._finish(exc)
                return
            self.held -= n
            self.moved += n
        if self.eof:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self._finish(None)
            return
        if self.budget.spent():  # every byte allowed is delivered: cut the session now
            self._finish(_SessionLimit())
            return
        if self.watching is None or self.watching[0] != "r":
            self._watch_read()

    def _finish(self, error: BaseException | None) -> None:
        self.stop()
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done(self, error)

    def stop(self) -> None:
        self._unwatch()
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.r = self.w = -1


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


# -- wire helpers -----------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = endpoint(host, port)
        if exc.errno == errno.EADDRINUSE:
            raise TeteError(f"cannot listen on {where}: {in_use_message(port)}") from exc
        raise TeteError(f"cannot listen on {where}: {exc.strerror}") from exc
    return sock


def _valid_address(text: object) -> bool:
    try:
        rv.parse_address(text)
    except rv.RendezvousError:
        return False
    return True


async def run_relay(
    host: str,
    port: int,
    limits: RelayLimits,
    second_port: int | None = None,
    *,
    second_default: bool = False,
) -> None:
    """The `relay` command: serve until SIGINT, SIGTERM or SIGHUP. A second port (None: none)
    answers whoami too, for netcheck; when it is only the default (PORT+1), a port in use
    there is said and the relay goes on without it."""
    from tete_tunnel.supervisor import Signals

    server = RelayServer(limits)
    bound = server.bind(host, port)
    also = ""
    if second_port is not None:
        try:
            also = f" (and port {server.bind_second(host, second_port)} for netcheck)"
        except TeteError as exc:
            if not second_default:
                raise
            also = f" (no second port for netcheck: {exc})"
    log.warning("relay listening on %s%s", rv.format_address(*bound), also)
    with Signals() as signals:
        serving = asyncio.ensure_future(server.serve())
        stop = asyncio.ensure_future(signals.stop.wait())
        try:
            await asyncio.wait([serving, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (serving, stop):
                task.cancel()
            await asyncio.gather(serving, stop, return_exceptions=True)
        if serving.done() and not serving.cancelled() and serving.exception():
            raise serving.exception()  # type: ignore[misc]
    log.warning(
        "relay stopped: %d connections, %d pairs, %d relayed, %d bytes relayed",
        server.stats["connections"],
        server.stats["paired"],
        server.stats["relayed"],
        server.stats["bytes"],
    )
