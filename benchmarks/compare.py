#!/usr/bin/env python3
"""Compare tete-tunnel with ssh -L and socat: throughput, connection rate, set-up time, memory.

Everything runs on this machine over loopback (and, for the long-RTT row, between two network
namespaces this script creates). The tools are measured in interleaved rounds (every tool once
per round, the starting tool rotating), so drift in the machine's speed hits all of them alike;
each cell is the median over the rounds.

Run from the repository root:

    .venv/bin/python benchmarks/compare.py [--quick] [--runs N] [--gib X] [--json FILE]

Needs sshd, ssh, ssh-keygen, socat and openssl on PATH (and root for the namespace row).
Only the standard library and psutil are used. Every process started here is ended by pid
(SIGTERM, then SIGKILL) on the way out, also on Ctrl-C; temporary files and namespaces are
removed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
HELPER = [sys.executable, str(SCRIPT), "--helper"]  # this script as a helper process
DELAYLINE = SCRIPT.parent / "delayline.py"  # a userspace stand-in for netem

CHUNK = 1 << 20  # source/sink buffer
ECHO_SIZE = 1024  # short connections: 1 KiB up, 1 KiB back
HEADER = struct.Struct("!cQ")  # a throughput stream starts with b"S" and its byte count
COUNT = struct.Struct("!Q")  # the sink's answer: the bytes it counted
IO_TIMEOUT = 120.0  # any single blocking socket operation in the helpers
START_TIMEOUT = 30.0  # a tunnel must be up within this
STOP_TIMEOUT = 5.0  # SIGTERM, then this long, then SIGKILL
IDLE_BATCH = 50  # idle streams are opened this many at a time (listen backlogs are finite)
PARALLEL = 50  # concurrent short connections
MULTI_STREAMS = 100
RTT_DELAY_MS = 50  # netem delay on each end of the veth pair (or the delay line's each way)
LAB_NET = "10.213.7"  # addresses inside our own namespaces only
LAB_FAR_NET = "10.213.8"  # the server side's, when the delay line routes between the two
# Linux caps a TCP socket's send buffer at net.ipv4.tcp_wmem's third field (4 MiB by
# default), which at 100 ms RTT caps any single TCP connection near 40 MB/s, whatever the
# tunnel. The second long-RTT row raises the limits in both lab namespaces (as one would for
# a long fat link) so the tunnels' own windows show.
BIG_TCP_BUFFERS = 64 << 20
# Short connections over the long path: each costs ssh a channel-open round trip before
# its data; a tete-tunnel stream carries its data with the open.
RTT_CONNS = 20
# The lossy long path: the same 100 ms with this share of packets lost at random each way
# (default TCP limits), and a smaller transfer, since loss holds every tool far below the
# clean path's rate.
RTT_LOSS_PERCENT = 1.0
RTT_LOSS_BYTES = 64 << 20
# On the long path the -L peer starts this long after the serving peer, as two people would
# start them. Started together, their first SYNs crossed in 4 of 12 set-ups (none of 12 with
# 1-3 s between them), and a crossed-SYN link keeps a wrong minimum RTT that holds BBR's
# window down for 10 s (docs/PERFORMANCE.md): a row about flow control would measure that
# race instead. Each round still logs the link's RTT state (link_rtt).
RTT_PEER_STAGGER = 1.0

# What --rows selects: a name runs one measurement, which fills these rows of the table
# (a row's key names its measurement too).
ROW_GROUPS = {
    "single": ["single", "single_cpu"],
    "multi": ["multi", "multi_cpu"],
    "seq": ["seq_rate", "seq_p50", "seq_p90", "seq_p99"],
    "par": ["par_rate", "par_p50", "par_p90", "par_p99"],
    "setup": ["setup"],
    "rss_up": ["rss_up"],
    "rss_idle": ["rss_idle", "pss_idle"],
    "rtt": ["rtt"],
    "rtt_conns": ["rtt_conns"],
    "rtt_big": ["rtt_big"],
    "rtt_loss": ["rtt_loss"],
}
RTT_GROUPS = ["rtt", "rtt_conns", "rtt_big", "rtt_loss"]
LOOPBACK_GROUPS = [g for g in ROW_GROUPS if g not in RTT_GROUPS]

HIGHER, LOWER = "higher", "lower"


class BenchError(Exception):
    """A measurement or a tool failed; the message says which and why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Helper processes: the sink/echo server and the clients. They run as separate processes
# (`compare.py --helper ...`) so they do not share a GIL with each other or with the
# orchestration, and so they can run inside a network namespace (`ip netns exec`).
# --------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, buf: bytearray) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {len(buf)} bytes")
        got += n


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)


class _ServerConn:
    """One connection to the helper server; its mode is set by its first byte."""

    __slots__ = ("done", "got", "head", "mode", "need", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mode = 0  # 0 until known: S (count), E (echo 1 KiB), I (idle)
        self.head = bytearray()
        self.need = 0
        self.got = 0
        self.done = False
        self.out = b""


def serve(bind: str) -> int:
    """Sink, echo and idle server on one port; prints the port, runs until stdin closes.

    S + count: reply b"R" at once (the stream is open end to end), count the bytes, reply
    the count once it is reached. E...: after 1 KiB (its first byte is the E), reply 1 KiB.
    I: reply b"I" and hold the connection. Any mode: close on EOF.
    """
    listener = socket.create_server((bind, 0), backlog=4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    buf = bytearray(CHUNK)
    reply = os.urandom(ECHO_SIZE)
    print(listener.getsockname()[1], flush=True)

    def close(c: _ServerConn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    def send(c: _ServerConn, data: bytes) -> None:
        c.out += data
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            sent = 0
        c.out = c.out[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        sel.modify(c.sock, events, c)

    def on_read(c: _ServerConn) -> None:
        try:
            n = c.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError:
            close(c)
            return
        if n == 0:
            close(c)
            return
        pos = 0
        if c.mode == 0:
            first = c.head[0] if c.head else buf[0]
            if first == ord("S"):
                pos = min(n, HEADER.size - len(c.head))
                c.head += buf[:pos]
                if len(c.head) < HEADER.size:
                    return
                c.need = HEADER.unpack(c.head)[1]
                c.mode = first
                send(c, b"R")
            elif first == ord("E"):
                c.mode, c.need = first, ECHO_SIZE
            elif first == ord("I"):
                c.mode, pos = first, 1
                send(c, b"I")
            else:
                close(c)
                return
        c.got += n - pos
        if c.mode != ord("I") and not c.done and c.got >= c.need:
            c.done = True
            send(c, COUNT.pack(c.got) if c.mode == ord("S") else reply)

    while True:
        for key, events in sel.select():
            if key.data == "accept":
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sel.register(sock, selectors.EVENT_READ, _ServerConn(sock))
            elif key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return 0
            else:
                c = key.data
                if events & selectors.EVENT_WRITE and c.out:
                    send(c, b"")
                if events & selectors.EVENT_READ:
                    on_read(c)


def client_stream(port: int, total: int, streams: int) -> dict[str, Any]:
    """Send `total` bytes split over `streams` connections; time from start to all counts."""
    sizes = [total // streams + (1 if i < total % streams else 0) for i in range(streams)]
    socks = []
    try:
        for size in sizes:
            sock = _connect(port)
            sock.sendall(HEADER.pack(b"S", size))
            socks.append(sock)
        ready = bytearray(1)
        for sock in socks:  # every stream is open end to end before the clock starts
            _recv_exact(sock, ready)
            if ready != b"R":
                raise ConnectionError(f"unexpected greeting {bytes(ready)!r}")
        payload = memoryview(os.urandom(CHUNK))
        start = threading.Event()
        errors: list[str] = []

        def run(sock: socket.socket, size: int) -> None:
            try:
                start.wait()
                left = size
                while left:
                    k = min(left, CHUNK)
                    sock.sendall(payload[:k])
                    left -= k
                answer = bytearray(COUNT.size)
                _recv_exact(sock, answer)
                counted = COUNT.unpack(answer)[0]
                if counted != size:
                    errors.append(f"sink counted {counted} bytes of {size}")
            except OSError as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=run, args=a) for a in zip(socks, sizes, strict=True)]
        for t in threads:
            t.start()
        began = time.perf_counter()
        start.set()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - began
        if errors:
            raise ConnectionError(f"{len(errors)} of {streams} streams failed: {errors[0]}")
        return {"seconds": seconds, "bytes": total}
    finally:
        for sock in socks:
            sock.close()


def client_echo(port: int, count: int, parallel: int) -> dict[str, Any]:
    """`count` short connections, `parallel` at a time: connect, 1 KiB up, 1 KiB back, close."""
    message = b"E" + os.urandom(ECHO_SIZE - 1)
    tickets = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        answer = bytearray(ECHO_SIZE)
        while next(tickets) < count and not errors:
            began = time.perf_counter()
            try:
                with _connect(port) as sock:
                    sock.sendall(message)
                    _recv_exact(sock, answer)
            except OSError as exc:
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    if errors:
        raise ConnectionError(f"{len(errors)} connection(s) failed: {errors[0]}")
    return {"seconds": seconds, "latencies": latencies}


def client_idle(port: int, count: int) -> int:
    """Open `count` connections, each confirmed end to end; say `ready`; hold until stdin closes."""
    socks: list[socket.socket] = []
    ack = bytearray(1)
    try:
        while len(socks) < count:
            batch = [_connect(port) for _ in range(min(IDLE_BATCH, count - len(socks)))]
            socks += batch
            for sock in batch:
                sock.sendall(b"I")
            for sock in batch:
                _recv_exact(sock, ack)
        print("ready", flush=True)
        sys.stdin.read()
        return 0
    finally:
        for sock in socks:
            sock.close()


def wait_port_helper(host: str, port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return 0
        time.sleep(0.01)
    print(f"{host}:{port} did not accept connections within {timeout:.0f} s", file=sys.stderr)
    return 1


def helper_main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "server":
        return serve(rest[0])
    if kind == "idle":
        return client_idle(int(rest[0]), int(rest[1]))
    if kind == "wait-port":
        return wait_port_helper(rest[0], int(rest[1]), float(rest[2]))
    if kind == "stream":
        result = client_stream(int(rest[0]), int(rest[1]), int(rest[2]))
    elif kind == "echo":
        result = client_echo(int(rest[0]), int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown helper {kind!r}")
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------
# Processes: every one is registered and ended by pid.
# --------------------------------------------------------------------------------------


class Procs:
    """The processes this benchmark starts; each is ended by pid, with its descendants."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: list[str],
        netns: str | None = None,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs the command, so the pid is the command's own.
        cmd = (["ip", "netns", "exec", netns] if netns else []) + args
        # A new session: Ctrl-C reaches only us, and we end the children ourselves.
        proc = subprocess.Popen(
            cmd, stdin=stdin, stdout=stdout, stderr=stderr, cwd=REPO, start_new_session=True
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the process and its descendants (by pid), SIGKILL what is left."""
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if proc.poll() is None:
            proc.terminate()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        _, alive = psutil.wait_procs(kids, timeout=STOP_TIMEOUT)
        for kid in alive:
            with contextlib.suppress(psutil.Error):
                kid.kill()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


PROCS = Procs()


class LineWatcher:
    """Reads a child's output lines in a thread, noting when each arrived."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                with self._cond:
                    self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                    self._cond.notify_all()

    def wait_for(self, needle: str, proc: subprocess.Popen[bytes], what: str) -> float:
        """The time the first line containing `needle` arrived."""
        deadline = time.monotonic() + START_TIMEOUT
        with self._cond:
            while True:
                for when, line in self.lines:
                    if needle in line:
                        return when
                if proc.poll() is not None:
                    raise BenchError(f"{what} exited ({proc.returncode}): {self.last()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{what} did not print {needle!r}: {self.last()}")
                self._cond.wait(0.05)

    def last(self) -> str:
        return self.lines[-1][1] if self.lines else "(no output)"


def run_quiet(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """A short command to completion (set-up steps: keys, namespaces, versions)."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise BenchError(f"{' '.join(cmd)} failed: {detail}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, netns: str | None, proc: subprocess.Popen[bytes], what: str, host: str = "127.0.0.1"
) -> float:
    """Wait until host:port (in netns) accepts a connection; the time it did."""
    if netns is not None:
        helper = [*HELPER, "wait-port", host, str(port)]
        waiter = PROCS.start([*helper, str(START_TIMEOUT)], netns=netns)
        try:
            if waiter.wait(START_TIMEOUT + 10) != 0:
                raise BenchError(f"{what} did not listen on {host}:{port}")
        finally:
            PROCS.stop(waiter)
        return time.monotonic()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return time.monotonic()
        except OSError:
            pass
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not listen on {host}:{port}")
        time.sleep(0.002)


def tree(proc: subprocess.Popen[bytes] | psutil.Process) -> list[psutil.Process]:
    """A process and all its descendants."""
    try:
        p = proc if isinstance(proc, psutil.Process) else psutil.Process(proc.pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def rss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / (1 << 20)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of the processes, with their reaped children's (socat's forks)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def pss_mib(procs: list[psutil.Process]) -> float:
    """Proportional set size: shared pages divided among their sharers (fair to forking tools)."""
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / (1 << 20)


# --------------------------------------------------------------------------------------
# Where the tools run: loopback, or two namespaces joined by a veth pair.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Site:
    name: str
    client_ns: str | None  # the side with the forward's listener and the source
    server_ns: str | None  # the side with the sink (and sshd, the serving peer)
    client_addr: str  # the client side's address as the server side sees it
    server_addr: str  # the server side's address as the client side sees it
    sink_bind: str
    tmp: Path
    sink_port: int = 0
    sink: subprocess.Popen[bytes] | None = None

    def start_sink(self) -> None:
        self.sink = PROCS.start(
            [*HELPER, "server", self.sink_bind],
            netns=self.server_ns,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.sink.stdout is not None
        line = _readline(self.sink, self.sink.stdout, START_TIMEOUT)
        self.sink_port = int(line)

    def client(self, args: list[str], timeout: float) -> dict[str, Any]:
        """Run a client helper on the client side to completion; its JSON result."""
        proc = PROCS.start(
            [*HELPER, *args],
            netns=self.client_ns,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"client {args[0]} timed out after {timeout:.0f} s") from None
        finally:
            PROCS.stop(proc)
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise BenchError(f"client {args[0]} failed: {lines[-1]}")
        return dict(json.loads(out))


def _readline(proc: subprocess.Popen[bytes], stream: IO[bytes], timeout: float) -> str:
    """One line from a child's pipe, or BenchError after `timeout`."""
    deadline = time.monotonic() + timeout
    data = b""
    fd = stream.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no answer from {proc.args!r} in {timeout:.0f} s")
            if sel.select(left):
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise BenchError(f"{proc.args!r} exited ({proc.wait()})")
                data += chunk
    return data.decode().strip()


def _veth(ends: list[tuple[str, str, str]]) -> None:
    """A veth pair, up, its ends given as (namespace, device, address/prefix)."""
    (ns1, dev1, _), (ns2, dev2, _) = ends
    peer = ["peer", "name", dev2, "netns", ns2]
    run_quiet(["ip", "-n", ns1, "link", "add", dev1, "type", "veth", *peer])
    for ns, dev, addr in ends:
        run_quiet(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
        run_quiet(["ip", "-n", ns, "link", "set", dev, "up"])


@contextlib.contextmanager
def nat_lab(
    tmp: Path,
    delay_ms: int | None,
    userspace: bool = False,
    tcp_buffers: int | None = None,
    loss_percent: float = 0.0,
) -> Iterator[Site]:
    """Two namespaces joined by a veth pair, `delay_ms` of netem on each end (None: none).

    With `userspace` (no netem in this kernel), a third namespace routes between the two
    instead, through delayline.py: a TUN device whose packets are held `delay_ms` each way.
    `tcp_buffers` raises the TCP buffer limits (tcp_rmem/tcp_wmem maximum) in both ends;
    `loss_percent` loses that share of packets at random, each way.
    """
    tag = f"tb{os.getpid() % 100000}"
    ns_a, ns_b, ns_d = f"{tag}a", f"{tag}b", f"{tag}d"
    addr_a, addr_b = f"{LAB_NET}.1", f"{LAB_FAR_NET if userspace else LAB_NET}.2"
    made: list[str] = []
    line: subprocess.Popen[bytes] | None = None
    try:
        for ns in (ns_a, ns_b, ns_d) if userspace else (ns_a, ns_b):
            run_quiet(["ip", "netns", "add", ns])
            made.append(ns)
            run_quiet(["ip", "-n", ns, "link", "set", "lo", "up"])
        for ns in (ns_a, ns_b) if tcp_buffers else ():
            limits = [f"net.ipv4.tcp_{k}mem=4096 131072 {tcp_buffers}" for k in ("r", "w")]
            run_quiet(["ip", "netns", "exec", ns, "sysctl", "-qw", *limits])
        if userspace:
            spaces, addrs = (ns_a, ns_b, ns_d), (addr_a, addr_b)
            line = _start_delay_line(tmp, tag, spaces, addrs, delay_ms, loss_percent)
        else:
            ends = [(ns_a, f"{tag}va", f"{addr_a}/24"), (ns_b, f"{tag}vb", f"{addr_b}/24")]
            _veth(ends)
            loss = ["loss", f"{loss_percent:g}%"] if loss_percent else []
            for ns, dev, _ in ends if delay_ms is not None else []:
                netem = ["tc", "qdisc", "add", "dev", dev, "root", "netem"]
                run_quiet([
                    "ip", "netns", "exec", ns, *netem, "delay", f"{delay_ms}ms", *loss,
                    "limit", "100000",
                ])  # fmt: skip
        site = Site("nat-lab", ns_a, ns_b, addr_a, addr_b, "0.0.0.0", tmp)
        site.start_sink()
        try:
            yield site
        finally:
            if site.sink is not None:
                PROCS.stop(site.sink)
    finally:
        if line is not None:
            PROCS.stop(line)
            # Its summary: whether it dropped packets or wrote any late.
            log(f"  {_last_line(tmp / 'delayline.log')}")
        for ns in made:
            run_quiet(["ip", "netns", "del", ns], check=False)


def _start_delay_line(
    tmp: Path,
    tag: str,
    spaces: tuple[str, str, str],
    addrs: tuple[str, str],
    delay_ms: int | None,
    loss_percent: float = 0.0,
) -> subprocess.Popen[bytes]:
    """A -- D -- B: D forwards, its policy rules sending A's and B's packets through the line."""
    ns_a, ns_b, ns_d = spaces
    addr_a, addr_b = addrs
    hop_a, hop_b = f"{LAB_NET}.254", f"{LAB_FAR_NET}.254"
    forward = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"]
    run_quiet(["ip", "netns", "exec", ns_d, "sysctl", "-qw", *forward])
    _veth([(ns_a, f"{tag}va", f"{addr_a}/24"), (ns_d, f"{tag}da", f"{hop_a}/24")])
    _veth([(ns_b, f"{tag}vb", f"{addr_b}/24"), (ns_d, f"{tag}db", f"{hop_b}/24")])
    run_quiet(["ip", "-n", ns_a, "route", "add", f"{LAB_FAR_NET}.0/24", "via", hop_a])
    run_quiet(["ip", "-n", ns_b, "route", "add", f"{LAB_NET}.0/24", "via", hop_b])
    cmd = [
        sys.executable, str(DELAYLINE), "--delay-ms", str(delay_ms or 0), "--dev", f"{tag}dl",
        "--iif", f"{tag}da", "--iif", f"{tag}db",
    ]  # fmt: skip
    if loss_percent:
        cmd += ["--loss-percent", f"{loss_percent:g}"]
    with open(tmp / "delayline.log", "wb") as err:
        line = PROCS.start(cmd, netns=ns_d, stdout=subprocess.PIPE, stderr=err)
    assert line.stdout is not None
    try:
        if (said := _readline(line, line.stdout, START_TIMEOUT)) != "ready":
            raise BenchError(f"said {said!r}, not 'ready'")
    except BenchError as exc:
        PROCS.stop(line)
        raise BenchError(f"delayline.py: {_last_line(tmp / 'delayline.log') or exc}") from None
    return line


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    return ""


def probe_netem() -> str | None:
    """None if netem works here, else why not (tried in a throwaway namespace)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("tc") is None or shutil.which("ip") is None:
        return "ip/tc (iproute2) not installed"
    ns = f"tbprobe{os.getpid() % 100000}"
    try:
        made = run_quiet(["ip", "netns", "add", ns], check=False)
        if made.returncode != 0:
            return f"cannot create a namespace: {made.stderr.strip()}"
        run_quiet(["ip", "-n", ns, "link", "set", "lo", "up"], check=False)
        netem = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        tried = run_quiet(["ip", "netns", "exec", ns, *netem], check=False)
        if tried.returncode != 0:
            return (tried.stderr or tried.stdout).strip() or f"tc exited {tried.returncode}"
        return None
    finally:
        run_quiet(["ip", "netns", "del", ns], check=False)


# --------------------------------------------------------------------------------------
# The tools.
# --------------------------------------------------------------------------------------


class Tunnel:
    """A forward from 127.0.0.1:port on the client side to the sink on the server side."""

    key = ""
    label = ""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> float | None:
        """Start it; the set-up time in seconds where that means something, else None."""
        raise NotImplementedError

    def processes(self) -> list[psutil.Process]:
        """The processes whose memory counts."""
        return [p for proc in self.procs for p in tree(proc)]

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            PROCS.stop(proc)
        self.procs = []


class SshServer:
    """A throwaway sshd with its own host key, client key and config."""

    def __init__(self, site: Site, tmp: Path) -> None:
        self.site = site
        self.dir = tmp
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_key = tmp / "client_key"

    def start(self) -> None:
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        run_quiet([*keygen, "-f", str(self.dir / "host_key")])
        run_quiet([*keygen, "-f", str(self.client_key)])
        (self.dir / "authorized_keys").write_bytes((self.dir / "client_key.pub").read_bytes())
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.site.server_addr}\n"
            f"HostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "AllowTcpForwarding yes\n"
            "LogLevel ERROR\n"
        )
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        with open(self.dir / "sshd.log", "wb") as err:
            self.proc = PROCS.start(
                [sshd, "-D", "-f", str(config), "-e"], netns=self.site.server_ns, stderr=err
            )
        wait_port(self.port, self.site.server_ns, self.proc, "sshd", self.site.server_addr)

    def sessions(self) -> list[psutil.Process]:
        """sshd's per-connection processes (not the listener)."""
        assert self.proc is not None
        return tree(self.proc)[1:]

    def stop(self) -> None:
        if self.proc is not None:
            PROCS.stop(self.proc)
            self.proc = None


class SshTunnel(Tunnel):
    def __init__(self, site: Site, server: SshServer, key: str, cipher: str, label: str) -> None:
        super().__init__(site)
        self.server = server
        self.key, self.cipher, self.label = key, cipher, label

    def start(self) -> float | None:
        self.port = free_port()
        forward = f"{self.port}:127.0.0.1:{self.site.sink_port}"
        cmd = [
            "ssh", "-N", "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
            "-i", str(self.server.client_key), "-p", str(self.server.port), "-c", self.cipher,
            "-L", forward, f"{_user()}@{self.site.server_addr}",
        ]  # fmt: skip
        began = time.monotonic()
        proc = PROCS.start(cmd, netns=self.site.client_ns, stderr=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stderr is not None
        err = LineWatcher(proc.stderr)
        try:
            ready = wait_port(self.port, self.site.client_ns, proc, "ssh")
        except BenchError as exc:
            raise BenchError(f"{exc}: {err.last()}") from None
        return ready - began

    def processes(self) -> list[psutil.Process]:
        return super().processes() + self.server.sessions()

    def stop(self) -> None:
        super().stop()
        # The session processes go when the client does; wait, so the next tool starts clean.
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.server.sessions() and time.monotonic() < deadline:
            time.sleep(0.02)
        for p in self.server.sessions():
            with contextlib.suppress(psutil.Error):
                p.kill()


class SocatTls(Tunnel):
    key, label = "socat-tls", "socat TLS"

    def __init__(self, site: Site, cert: Path, key: Path) -> None:
        super().__init__(site)
        self.cert, self.keyfile = cert, key

    def start(self) -> float | None:
        self.port, tls_port = free_port(), free_port()
        server_addr, sink = self.site.server_addr, self.site.sink_port
        listen = (
            f"OPENSSL-LISTEN:{tls_port},bind={server_addr},reuseaddr,fork,backlog=1024,"
            f"cert={self.cert},key={self.keyfile},verify=0"
        )
        server = PROCS.start(
            ["socat", "-b65536", listen, f"TCP:127.0.0.1:{sink}"], netns=self.site.server_ns
        )
        self.procs.append(server)
        wait_port(tls_port, self.site.server_ns, server, "socat TLS server", server_addr)
        client = PROCS.start(
            [
                "socat", "-b65536",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                f"OPENSSL:{server_addr}:{tls_port},verify=0",
            ],
            netns=self.site.client_ns,
        )  # fmt: skip
        self.procs.append(client)
        wait_port(self.port, self.site.client_ns, client, "socat TLS client")
        return None


class SocatTcp(Tunnel):
    key, label = "socat-tcp", "socat TCP"

    def start(self) -> float | None:
        self.port = free_port()
        proc = PROCS.start(
            [
                "socat", "-b65536",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                f"TCP:{self.site.server_addr}:{self.site.sink_port}",
            ],
            netns=self.site.client_ns,
        )  # fmt: skip
        self.procs.append(proc)
        wait_port(self.port, self.site.client_ns, proc, "socat")
        return None


class Floor(Tunnel):
    """benchmarks/floor.py: the least a Python forwarder over one TLS link can do."""

    key, label = "floor", "Python floor"

    def __init__(self, site: Site, cert: Path, key: Path, own_tls: bool = False) -> None:
        super().__init__(site)
        self.cert, self.keyfile = cert, key
        self.tls = ["socket"] if own_tls else []  # tete-tunnel's TLS transport, or the loop's
        if own_tls:
            self.key, self.label = "floor-sock", "Python floor (tlssocket)"

    def start(self) -> float | None:
        self.port, tls_port = free_port(), free_port()
        script = str(Path(__file__).resolve().parent / "floor.py")
        server = PROCS.start(
            [sys.executable, script, "serve", str(tls_port), "127.0.0.1",
             str(self.site.sink_port), str(self.cert), str(self.keyfile), *self.tls],
            netns=self.site.server_ns,
        )  # fmt: skip
        self.procs.append(server)
        wait_port(tls_port, self.site.server_ns, server, "floor server", self.site.server_addr)
        client = PROCS.start(
            [sys.executable, script, "listen", str(self.port), self.site.server_addr,
             str(tls_port), *self.tls],
            netns=self.site.client_ns,
        )  # fmt: skip
        self.procs.append(client)
        wait_port(self.port, self.site.client_ns, client, "floor client")
        return None


class Tete(Tunnel):
    """Two `tete-tunnel forward` peers with separate identities; -L on the client side.

    `stagger`: seconds between starting the serving peer and the -L peer (0: together).
    """

    key, label = "tete", "tete-tunnel"

    def __init__(self, site: Site, ids: dict[str, tuple[Path, str]], stagger: float = 0.0) -> None:
        super().__init__(site)
        self.ids = ids  # "a"/"b" -> (identity dir, ID)
        self.stagger = stagger

    def start(self) -> float | None:
        self.port = free_port()
        pa, pb = free_port(), free_port()
        forward = f"{self.port}:127.0.0.1:{self.site.sink_port}"
        sides = [  # the serving peer first, then the -L peer; both are timed from the first
            ("b", self.site.server_ns, self.site.client_addr, pb, pa, "a", []),
            # --max-connections: the idle row holds 1,000 connections, over the default 512
            (
                "a",
                self.site.client_ns,
                self.site.server_addr,
                pa,
                pb,
                "b",
                ["-L", forward, "--max-connections", "4096"],
            ),
        ]
        watchers: list[tuple[subprocess.Popen[bytes], LineWatcher, LineWatcher, str]] = []
        began = time.monotonic()
        for me, ns, peer_ip, lport, rport, peer, extra in sides:
            proc = PROCS.start(
                [
                    *_tete_cmd(), "forward", "--peer-ip", peer_ip,
                    "--lport", str(lport), "--rport", str(rport),
                    "--identity", str(self.ids[me][0]), "--peer-id", self.ids[peer][1], *extra,
                ],
                netns=ns,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            self.procs.append(proc)
            assert proc.stdout is not None and proc.stderr is not None
            watchers.append((proc, LineWatcher(proc.stdout), LineWatcher(proc.stderr), me))
            if me == "b" and self.stagger:
                time.sleep(self.stagger)
        connected = [
            err.wait_for("Connected to peer!", proc, f"tete peer {me}")
            for proc, _, err, me in watchers
        ]
        proc, out, _, _ = watchers[1]
        out.wait_for("Forwarding", proc, "tete peer a")
        return max(connected) - began


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _tete_cmd() -> list[str]:
    script = Path(sys.executable).parent / "tete-tunnel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tete_tunnel"]


# --------------------------------------------------------------------------------------
# Measurements and the table.
# --------------------------------------------------------------------------------------


TOOL_KEYS = ["ssh-aes", "ssh-default", "socat-tls", "socat-tcp", "tete", "floor", "floor-sock"]
# The floor columns (benchmarks/floor.py) are a yardstick for development, asked for by name.
DEFAULT_TOOLS = TOOL_KEYS[:5]
TOOL_LABELS = {
    "ssh-aes": "ssh aes128-gcm",
    "ssh-default": "ssh chacha20",
    "socat-tls": "socat TLS",
    "socat-tcp": "socat TCP",
    "tete": "tete-tunnel",
    "floor": "Python floor",
    "floor-sock": "Python floor (tlssocket)",
}


@dataclasses.dataclass
class Row:
    key: str
    label: str
    unit: str
    better: str
    digits: int
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    extra: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # e.g. process counts
    note: str | None = None  # replaces the cells (e.g. n/a with a reason)

    def median(self, tool: str) -> float | None:
        vals = self.values.get(tool)
        return statistics.median(vals) if vals else None

    def ratio(self, tool: str, base: str) -> float | None:
        a, b = self.median(tool), self.median(base)
        return a / b if a is not None and b else None


@dataclasses.dataclass
class Plan:
    runs: int
    single_bytes: int
    multi_bytes: int
    seq_conns: int
    par_conns: int
    idle_streams: int
    rtt_bytes: int
    tools: list[str]
    # The measurements to run (ROW_GROUPS' names); the table shows only their rows.
    groups: list[str] = dataclasses.field(default_factory=lambda: list(ROW_GROUPS))

    def wants(self, *row_keys: str) -> bool:
        """Whether any of these rows is to be measured."""
        return any(k in ROW_GROUPS[g] for g in self.groups for k in row_keys)


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def make_rows(plan: Plan) -> dict[str, Row]:
    rows = [
        Row("single", f"1 stream, {_size(plan.single_bytes)}", "MB/s", HIGHER, 0),
        Row("single_cpu", "  tunnel CPU time per GiB, 1 stream", "s/GiB", LOWER, 2),
        Row(
            "multi",
            f"{MULTI_STREAMS} streams, {_size(plan.multi_bytes)} total",
            "MB/s",
            HIGHER,
            0,
        ),
        Row("multi_cpu", f"  tunnel CPU time per GiB, {MULTI_STREAMS} streams", "s/GiB", LOWER, 2),
        Row("seq_rate", f"short conns, sequential ({plan.seq_conns})", "conn/s", HIGHER, 0),
        Row("seq_p50", "  sequential latency p50", "ms", LOWER, 2),
        Row("seq_p90", "  sequential latency p90", "ms", LOWER, 2),
        Row("seq_p99", "  sequential latency p99", "ms", LOWER, 2),
        Row(
            "par_rate",
            f"short conns, {PARALLEL} parallel ({plan.par_conns})",
            "conn/s",
            HIGHER,
            0,
        ),
        Row("par_p50", "  parallel latency p50", "ms", LOWER, 2),
        Row("par_p90", "  parallel latency p90", "ms", LOWER, 2),
        Row("par_p99", "  parallel latency p99", "ms", LOWER, 2),
        Row("setup", "link set-up (tete: both Connected; ssh: -L accepts)", "s", LOWER, 3),
        Row("rss_up", "RSS, link up, no streams", "MiB", LOWER, 1),
        Row("rss_idle", f"RSS, {plan.idle_streams} idle streams open", "MiB", LOWER, 1),
        Row("pss_idle", f"  PSS (shared pages split), {plan.idle_streams} idle", "MiB", LOWER, 1),
        Row(
            "rtt",
            f"long RTT (netem {RTT_DELAY_MS} ms each end), 1 stream, {_size(plan.rtt_bytes)}",
            "MB/s",
            HIGHER,
            0,
        ),
        Row(
            "rtt_conns",
            f"  same path, short conns, sequential ({RTT_CONNS})",
            "conn/s",
            HIGHER,
            1,
        ),
        Row(
            "rtt_big",
            f"  same, kernel TCP buffer limits raised to {_size(BIG_TCP_BUFFERS)}",
            "MB/s",
            HIGHER,
            0,
        ),
        Row(
            "rtt_loss",
            f"  same path, {RTT_LOSS_PERCENT:g}% random loss each way, 1 stream, "
            f"{_size(min(plan.rtt_bytes, RTT_LOSS_BYTES))}",
            "MB/s",
            HIGHER,
            0,
        ),
    ]
    return {r.key: r for r in rows}


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1e3, cuts[89] * 1e3, cuts[98] * 1e3


def _client_timeout(nbytes: int) -> float:
    return 60 + nbytes / 5e6  # generous: even 5 MB/s finishes


def measure_round(tool: Tunnel, plan: Plan, rows: dict[str, Row]) -> None:
    """One round for one tool: start it, measure every row, stop it."""
    key, site = tool.key, tool.site
    baseline = 0  # the tool's process count when idle
    tried: set[str] = set()  # the rows this round has filled or failed

    def record(row: str, value: float) -> None:
        rows[row].values.setdefault(key, []).append(value)

    def settle() -> None:
        """Wait for per-connection processes (socat's forks) to finish exiting."""
        deadline = time.monotonic() + 30
        while len(tool.processes()) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)

    def attempt(name: str, rows_hit: list[str], fn: Callable[[], None]) -> None:
        if not plan.wants(*rows_hit):
            return
        if not tool.alive():
            raise BenchError(f"{tool.label} is no longer running")
        tried.update(rows_hit)
        began = time.monotonic()
        try:
            fn()
        except BenchError as exc:
            for r in rows_hit:
                rows[r].failures.setdefault(key, []).append(str(exc))
            log(f"    {name}: FAILED: {exc}")
            return
        finally:
            settle()
        log(f"    {name}: {_progress(rows, rows_hit, key)}  ({time.monotonic() - began:.1f} s)")

    try:
        try:
            setup = tool.start()
        except BenchError as exc:
            for r in rows.values():
                if not r.key.startswith("rtt"):
                    r.failures.setdefault(key, []).append(f"start: {exc}")
            log(f"    start: FAILED: {exc}")
            return
        tried.add("setup")
        if setup is not None:
            record("setup", setup)
        baseline = len(tool.processes())
        log(f"    started{f' in {setup:.3f} s' if setup is not None else ''}")

        def rss_up() -> None:
            time.sleep(0.3)
            record("rss_up", rss_mib(tool.processes()))

        def rss_idle() -> None:
            holder = PROCS.start(
                [*HELPER, "idle", str(tool.port), str(plan.idle_streams)],
                netns=site.client_ns,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                assert holder.stdout is not None
                _readline(holder, holder.stdout, 300)
                time.sleep(0.5)
                procs = tool.processes()
                record("rss_idle", rss_mib(procs))
                record("pss_idle", pss_mib(procs))
                rows["rss_idle"].extra.setdefault(key, []).append(len(procs))
            finally:
                PROCS.stop(holder)

        def throughput(row: str, nbytes: int, streams: int) -> Callable[[], None]:
            def run() -> None:
                args = ["stream", str(tool.port), str(nbytes), str(streams)]
                cpu_before = cpu_seconds(tool.processes())
                result = site.client(args, _client_timeout(nbytes))
                cpu = cpu_seconds(tool.processes()) - cpu_before
                record(row, result["bytes"] / result["seconds"] / 1e6)
                record(f"{row}_cpu", cpu / (result["bytes"] / (1 << 30)))

            return run

        def echo(prefix: str, count: int, parallel: int) -> Callable[[], None]:
            def run() -> None:
                args = ["echo", str(tool.port), str(count), str(parallel)]
                result = site.client(args, 60 + count * 0.5)
                record(f"{prefix}_rate", count / result["seconds"])
                for name, value in zip(
                    ("p50", "p90", "p99"), _percentiles(result["latencies"]), strict=True
                ):
                    record(f"{prefix}_{name}", value)

            return run

        attempt("RSS link up", ["rss_up"], rss_up)
        attempt(f"RSS {plan.idle_streams} idle", ["rss_idle", "pss_idle"], rss_idle)
        single = throughput("single", plan.single_bytes, 1)
        attempt("1 stream", ["single", "single_cpu"], single)
        streams = throughput("multi", plan.multi_bytes, MULTI_STREAMS)
        attempt(f"{MULTI_STREAMS} streams", ["multi", "multi_cpu"], streams)
        seq = ["seq_rate", "seq_p50", "seq_p90", "seq_p99"]
        attempt("sequential conns", seq, echo("seq", plan.seq_conns, 1))
        par = ["par_rate", "par_p50", "par_p90", "par_p99"]
        attempt("parallel conns", par, echo("par", plan.par_conns, PARALLEL))
    except BenchError as exc:  # the tool died: the rest of this round is lost
        for r in rows.values():
            if r.key not in tried and not r.key.startswith("rtt"):
                r.failures.setdefault(key, []).append(str(exc))
        log(f"    FAILED: {exc}")
    finally:
        tool.stop()


def measure_rtt_round(
    tool: Tunnel, plan: Plan, row: Row | None, conns: Row | None = None, nbytes: int = 0
) -> None:
    """One stream's throughput over the long path (into `row`, `nbytes`); with `conns`,
    short connections too."""
    nbytes = nbytes or plan.rtt_bytes
    try:
        tool.start()
        if isinstance(tool, Tete):
            log(f"    link: {link_rtt(tool.site)}")
        if row is not None:
            args = ["stream", str(tool.port), str(nbytes), "1"]
            result = tool.site.client(args, _client_timeout(nbytes) * 4)
            row.values.setdefault(tool.key, []).append(result["bytes"] / result["seconds"] / 1e6)
            log(f"    long RTT: {row.values[tool.key][-1]:.0f} MB/s")
    except BenchError as exc:
        if row is not None:
            row.failures.setdefault(tool.key, []).append(str(exc))
        log(f"    long RTT: FAILED: {exc}")
    else:
        if conns is not None:
            try:
                args = ["echo", str(tool.port), str(RTT_CONNS), "1"]
                result = tool.site.client(args, 60 + RTT_CONNS * 2)
                conns.values.setdefault(tool.key, []).append(RTT_CONNS / result["seconds"])
                log(f"    long RTT short conns: {conns.values[tool.key][-1]:.1f} conn/s")
            except BenchError as exc:
                conns.failures.setdefault(tool.key, []).append(str(exc))
                log(f"    long RTT short conns: FAILED: {exc}")
    finally:
        tool.stop()


def link_rtt(site: Site) -> str:
    """The punched connection's RTT state as its kernel sees it (`ss -ti`), for the log.

    When both peers' SYNs cross (a simultaneous open), the kernel takes the RTT of its first
    sample from its SYN-ACK, sent when the peer's SYN arrived, so the sample is only part of
    the round trip (the two sides' samples add up to it). TCP keeps that minimum RTT for
    minutes and BBR for 10 s, during which its congestion window stays far too small
    (docs/PERFORMANCE.md, "The stuck congestion window"). A min RTT far below the path's
    flags such a run.
    """
    out = run_quiet(
        ["ip", "netns", "exec", str(site.client_ns), "ss", "-tinH", "dst", site.server_addr],
        check=False,
    ).stdout
    found = {k: re.search(rf"\b{k}:([0-9.]+)", out) for k in ("rtt", "minrtt")}
    cc = next((c for c in ("bbr", "cubic", "reno") if f" {c} " in f" {out} "), "?")
    if not all(found.values()):
        return "no TCP info"
    srtt, minrtt = (float(m.group(1)) for m in found.values() if m is not None)
    flag = "  <- min RTT from a simultaneous open" if minrtt < 0.8 * RTT_DELAY_MS * 2 else ""
    return f"{cc}, srtt {srtt:.1f} ms, min RTT {minrtt:.1f} ms{flag}"


def _progress(rows: dict[str, Row], keys: list[str], tool: str) -> str:
    parts = []
    for k in keys:
        r = rows[k]
        if r.values.get(tool):
            parts.append(f"{r.values[tool][-1]:.{r.digits}f} {r.unit}")
    return ", ".join(parts)


def make_tools(
    site: Site,
    sshd: SshServer | None,
    assets: dict[str, Any],
    keys: list[str],
    tete_stagger: float = 0.0,
) -> list[Tunnel]:
    made: dict[str, Tunnel] = {}
    if sshd is not None:
        made["ssh-aes"] = SshTunnel(
            site, sshd, "ssh-aes", "aes128-gcm@openssh.com", TOOL_LABELS["ssh-aes"]
        )
        made["ssh-default"] = SshTunnel(
            site, sshd, "ssh-default", "chacha20-poly1305@openssh.com", TOOL_LABELS["ssh-default"]
        )
    made["socat-tls"] = SocatTls(site, assets["cert"], assets["key"])
    made["floor"] = Floor(site, assets["cert"], assets["key"])
    made["floor-sock"] = Floor(site, assets["cert"], assets["key"], own_tls=True)
    made["socat-tcp"] = SocatTcp(site)
    made["tete"] = Tete(site, assets["ids"], tete_stagger)
    return [made[k] for k in keys if k in made]


def rounds(tools: list[Tunnel], runs: int) -> Iterator[tuple[int, Tunnel]]:
    """ABAB...: every tool once per round; the first tool rotates from round to round."""
    for r in range(runs):
        shift = r % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            yield r, tool


def prepare_assets(tmp: Path) -> dict[str, Any]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    run_quiet(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", "/CN=tete-bench", "-keyout", str(key), "-out", str(cert),
        ]
    )  # fmt: skip
    ids: dict[str, tuple[Path, str]] = {}
    for name in ("a", "b"):
        path = tmp / f"tete-{name}"
        out = run_quiet([*_tete_cmd(), "id", "--identity", str(path)]).stdout.strip()
        ids[name] = (path, out.splitlines()[-1])
    return {"cert": cert, "key": key, "ids": ids}


def machine_info() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({exc})"
        lines = (r.stdout + r.stderr).strip().splitlines()
        return lines[0] if lines else "unknown"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": first_line(["openssl", "version"]),
        "python_ssl": ssl.OPENSSL_VERSION,
        "ssh": first_line(["ssh", "-V"]),
        "socat": _socat_version(),
        "tete": f"{first_line([*_tete_cmd(), '--version']).split()[-1]} (git {commit}"
        f"{', modified' if dirty and dirty != 'unknown' else ''})",
    }


def _socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    for line in out.splitlines():
        if line.startswith("socat version"):
            return line.strip()
    return "unknown"


def render(
    rows: dict[str, Row],
    tools: list[str],
    info: dict[str, str],
    plan: Plan,
    ceiling: dict[str, float],
) -> str:
    headers = ["measurement", "unit", *[TOOL_LABELS[t] for t in tools]]
    ratios = [
        (b, f"tete/{b}")
        for b in ("ssh-aes", "ssh-default", "socat-tcp")
        if b in tools and "tete" in tools
    ]
    headers += [name for _, name in ratios]
    table: list[list[str]] = []
    notes: list[str] = []
    for row in rows.values():
        cells = [row.label, row.unit]
        if row.note is not None:
            table.append([*cells, row.note])
            continue
        for t in tools:
            m = row.median(t)
            if m is not None:
                cell = f"{m:.{row.digits}f}"
                if row.failures.get(t):
                    cell += "*"
                    notes.append(
                        f"{row.key}/{t}: {len(row.failures[t])} run(s) failed: {row.failures[t][0]}"
                    )
            elif row.failures.get(t):
                cell = "failed"
                notes.append(f"{row.key}/{t}: {row.failures[t][0]}")
            else:
                cell = "n/a"
            cells.append(cell)
        for base, _ in ratios:
            r = row.ratio("tete", base)
            cells.append(f"{r:.2f}" if r is not None else "")
        table.append(cells)
    full = [r for r in table if len(r) == len(headers)]  # not the note rows
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        if len(cells) == 3:  # a note row
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
        out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(out)

    head = [
        f"machine: {info['nproc']} CPUs, {info['cpu']}; kernel {info['kernel']}",
        f"python {info['python']} ({info['python_ssl']}); {info['openssl']}",
        f"{info['ssh']}; {info['socat']}; tete-tunnel {info['tete']}",
        f"median of {plan.runs} interleaved round(s); MB = 10^6 bytes; "
        "ratios are tete / ssh or plain TCP (see benchmarks/README.md for which way is better)",
        f"harness ceiling (source -> sink, no tunnel, 1 run): {_ceiling_text(ceiling)}",
        f"1-minute load average: {info.get('load', '?')} (other work on the machine skews speeds; "
        "CPU s/GiB much less)",
        "",
        line(headers),
        "  ".join("-" * w for w in widths),
        *(line(r) for r in table),
    ]
    if ("socat-tls" in tools or "socat-tcp" in tools) and "rss_idle" in rows:
        counts = rows["rss_idle"].extra
        forks = ", ".join(
            f"{TOOL_LABELS[t]} {int(statistics.median(counts[t]))}"
            for t in ("socat-tls", "socat-tcp")
            if counts.get(t)
        )
        if forks:
            head.append(
                f"\nsocat forks a process per connection: RSS sums {forks} processes, counting "
                "shared pages once per process."
            )
    if notes:
        head.append("\nfailures (* = some runs failed; the median is over the rest):")
        head += [f"  {n}" for n in notes]
    return "\n".join(head)


def to_json(
    rows: dict[str, Row],
    tools: list[str],
    info: dict[str, str],
    plan: Plan,
    ceiling: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    return {
        "machine": info,
        "plan": dataclasses.asdict(plan),
        "harness_ceiling": ceiling,
        "elapsed_s": round(seconds, 1),
        "rows": [
            {
                "key": r.key,
                "label": r.label,
                "unit": r.unit,
                "better": r.better,
                "note": r.note,
                "median": {t: r.median(t) for t in tools},
                "runs": {t: r.values.get(t, []) for t in tools},
                "failures": {t: r.failures[t] for t in tools if r.failures.get(t)},
                "processes": r.extra or None,
                "tete/ssh-aes": r.ratio("tete", "ssh-aes"),
                "tete/ssh-default": r.ratio("tete", "ssh-default"),
                "tete/socat-tcp": r.ratio("tete", "socat-tcp"),
            }
            for r in rows.values()
        ],
    }


def _check_tools() -> None:
    missing = [
        t
        for t in ("sshd", "ssh", "ssh-keygen", "socat", "openssl")
        if shutil.which(t) is None and not (t == "sshd" and Path("/usr/sbin/sshd").exists())
    ]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)} (apt-get install openssh-server "
            "openssh-client socat openssl)"
        )


@contextlib.contextmanager
def _privsep_dir() -> Iterator[None]:
    """sshd insists on its privilege separation directory; make it if absent, remove it after."""
    path = Path("/run/sshd")
    made = False
    if not path.exists() and os.geteuid() == 0:
        path.mkdir(mode=0o755)
        made = True
    try:
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 runs, 128 MiB, fewer connections and idle streams",
    )
    parser.add_argument("--runs", type=int, help="rounds per cell (default 5; 2 with --quick)")
    parser.add_argument(
        "--gib", type=float, help="GiB for the throughput rows (default 1; 0.125 with --quick)"
    )
    parser.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help=f"comma-separated subset of {','.join(TOOL_KEYS)} (default: all but the floors)",
    )
    parser.add_argument(
        "--only",
        choices=["loopback", "rtt"],
        help="run only the loopback rows, or only the long-RTT rows (namespaces)",
    )
    parser.add_argument(
        "--rows",
        help="comma-separated measurements to run, nothing else (a row's key names its "
        f"measurement): {','.join(ROW_GROUPS)}",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON")
    args = parser.parse_args()

    chosen = {t.strip() for t in args.tools.split(",") if t.strip()}
    tools = [t for t in TOOL_KEYS if t in chosen]  # columns always in the same order
    unknown = chosen - set(TOOL_KEYS)
    if unknown or not tools:
        parser.error(f"--tools: unknown {', '.join(sorted(unknown))}; choose from {TOOL_KEYS}")
    groups = list(ROW_GROUPS)
    if args.only is not None:
        groups = RTT_GROUPS if args.only == "rtt" else LOOPBACK_GROUPS
    if args.rows is not None:
        asked = [r.strip() for r in args.rows.split(",") if r.strip()]
        by_row = {k: g for g, keys in ROW_GROUPS.items() for k in keys}
        unknown_rows = [r for r in asked if r not in ROW_GROUPS and r not in by_row]
        if unknown_rows or not asked:
            parser.error(
                f"--rows: unknown {', '.join(unknown_rows)}; choose from {','.join(ROW_GROUPS)}"
            )
        picked = {r if r in ROW_GROUPS else by_row[r] for r in asked}
        groups = [g for g in groups if g in picked]
        if not groups:
            parser.error(f"--rows {args.rows} has no row in --only {args.only}")
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    gib = args.gib if args.gib is not None else (0.125 if args.quick else 1.0)
    if runs < 1 or gib <= 0:
        parser.error("--runs must be >= 1 and --gib > 0")
    nbytes = int(gib * (1 << 30))
    plan = Plan(
        runs=runs,
        single_bytes=nbytes,
        multi_bytes=nbytes,
        seq_conns=100 if args.quick else 500,
        par_conns=400 if args.quick else 2000,
        idle_streams=200 if args.quick else 1000,
        rtt_bytes=min(nbytes, 256 << 20),
        tools=tools,
        groups=groups,
    )
    _check_tools()

    # A thousand idle streams through two socat hops need a few thousand descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(PROCS.stop_all)
    began = time.monotonic()
    info = machine_info()
    load_before = os.getloadavg()[0]
    rows = make_rows(plan)
    ceiling: dict[str, float] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="tete-compare-") as tmp_name,
            _privsep_dir(),
        ):
            tmp = Path(tmp_name)
            assets = prepare_assets(tmp)
            log(f"plan: {plan}")
            if any(g in LOOPBACK_GROUPS for g in groups):
                ceiling = loop_phase(tmp, assets, plan, rows)
            if any(g in RTT_GROUPS for g in groups):
                rtt_phase(tmp, assets, plan, rows, RTT_DELAY_MS)
            rows = {k: r for k, r in rows.items() if plan.wants(k)}  # what was asked for
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        PROCS.stop_all()
    seconds = time.monotonic() - began
    info["load"] = f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(render(rows, tools, info, plan, ceiling))
    print(f"\nruntime: {seconds:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(to_json(rows, tools, info, plan, ceiling, seconds), indent=2)
        )
    return 0


def start_sshd(site: Site, tmp: Path, plan: Plan, rows: list[Row]) -> SshServer | None:
    """The throwaway sshd, if ssh is compared; on failure the ssh cells say why."""
    if not any(t.startswith("ssh") for t in plan.tools):
        return None
    tmp.mkdir(exist_ok=True)
    sshd = SshServer(site, tmp)
    try:
        sshd.start()
    except BenchError as exc:
        sshd.stop()
        log(f"sshd: FAILED: {exc}")
        for row in rows:
            for t in plan.tools:
                if t.startswith("ssh") and row.note is None:
                    row.failures.setdefault(t, []).append(f"sshd: {exc}")
        return None
    return sshd


def harness_ceiling(site: Site, plan: Plan) -> dict[str, float]:
    """Source and sink with no tunnel between them: the most any tool can show on this machine."""
    port = str(site.sink_port)
    ceiling: dict[str, float] = {}
    try:
        for key, nbytes, streams in (
            ("single", plan.single_bytes, 1),
            ("multi", plan.multi_bytes, MULTI_STREAMS),
        ):
            if not plan.wants(key):
                continue
            result = site.client(["stream", port, str(nbytes), str(streams)], 600)
            ceiling[key] = result["bytes"] / result["seconds"] / 1e6
        for key, count, parallel in (
            ("seq_rate", plan.seq_conns, 1),
            ("par_rate", plan.par_conns, PARALLEL),
        ):
            if not plan.wants(key):
                continue
            result = site.client(["echo", port, str(count), str(parallel)], 600)
            ceiling[key] = count / result["seconds"]
    except BenchError as exc:
        log(f"harness ceiling: FAILED: {exc}")
    return ceiling


def loop_phase(
    tmp: Path, assets: dict[str, Any], plan: Plan, rows: dict[str, Row]
) -> dict[str, float]:
    """The loopback rows, in interleaved rounds; returns the harness ceiling."""
    site = Site("loopback", None, None, "127.0.0.1", "127.0.0.1", "127.0.0.1", tmp)
    site.start_sink()
    sshd: SshServer | None = None
    try:
        ceiling = harness_ceiling(site, plan)
        log(f"harness ceiling (no tunnel): {_ceiling_text(ceiling)}")
        sshd = start_sshd(site, tmp / "sshd", plan, list(rows.values()))
        tools = make_tools(site, sshd, assets, plan.tools)
        for r, tool in rounds(tools, plan.runs):
            log(f"round {r + 1}/{plan.runs}: {tool.label}")
            measure_round(tool, plan, rows)
        return ceiling
    finally:
        if sshd is not None:
            sshd.stop()
        if site.sink is not None:
            PROCS.stop(site.sink)


def _ceiling_text(ceiling: dict[str, float]) -> str:
    if not ceiling:
        return "not measured"
    parts = {
        "single": "1 stream {:.0f} MB/s",
        "multi": f"{MULTI_STREAMS} streams {{:.0f}} MB/s",
        "seq_rate": "sequential {:.0f} conn/s",
        "par_rate": f"{PARALLEL} parallel {{:.0f}} conn/s",
    }
    return ", ".join(text.format(ceiling[k]) for k, text in parts.items() if k in ceiling)


def rtt_phase(
    tmp: Path, assets: dict[str, Any], plan: Plan, rows: dict[str, Row], delay_ms: int | None
) -> None:
    """The long-RTT rows, across namespaces; without netem, through delayline.py.

    Up to three labs, for the rows asked for: the kernel's default TCP buffer limits, the
    limits raised, and the default limits with random loss.
    """
    userspace = False
    if delay_ms is not None:
        reason = probe_netem()
        if reason is not None:
            userspace = True
            why = reason.removeprefix("Error: ")
            rows["rtt"].label = (
                f"long RTT (userspace delay line {delay_ms} ms each way, netem unavailable), "
                f"1 stream, {_size(plan.rtt_bytes)}"
            )
            log(f"long RTT: netem unavailable ({why}); using {DELAYLINE.name} instead")
    loss_bytes = min(plan.rtt_bytes, RTT_LOSS_BYTES)
    labs = (  # (stream row, short connections row, TCP limits, loss %, bytes)
        (rows["rtt"], rows["rtt_conns"], None, 0.0, plan.rtt_bytes),
        (rows["rtt_big"], None, BIG_TCP_BUFFERS, 0.0, plan.rtt_bytes),
        (rows["rtt_loss"], None, None, RTT_LOSS_PERCENT, loss_bytes),
    )
    for stream_row, conns_row, buffers, loss, nbytes in labs:
        row = stream_row if plan.wants(stream_row.key) else None
        conns = conns_row if conns_row is not None and plan.wants(conns_row.key) else None
        if row is None and conns is None:
            continue
        named = row or conns
        assert named is not None
        lab = tmp / f"lab-{stream_row.key}"
        lab.mkdir(exist_ok=True)
        try:
            with nat_lab(lab, delay_ms, userspace, buffers, loss) as site:
                sshd: SshServer | None = None
                try:
                    sshd = start_sshd(site, lab / "sshd", plan, [r for r in (row, conns) if r])
                    tools = make_tools(site, sshd, assets, plan.tools, RTT_PEER_STAGGER)
                    for r, tool in rounds(tools, plan.runs):
                        log(f"{named.key} round {r + 1}/{plan.runs}: {tool.label}")
                        measure_rtt_round(tool, plan, row, conns, nbytes)
                finally:
                    if sshd is not None:
                        sshd.stop()
        except BenchError as exc:  # the lab itself failed (the rounds catch their own failures)
            for r in (row, conns):
                if r is not None:
                    r.note = f"n/a ({exc})"
            log(f"{named.key}: n/a ({exc})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":  # internal: a helper process
        sys.exit(helper_main(sys.argv[2:]))
    sys.exit(main())
