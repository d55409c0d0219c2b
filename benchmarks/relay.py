#!/usr/bin/env python3
"""Relay benchmark: `tete-tunnel relay`'s splice path against a plain socat TCP relay.

Both relays move bytes between two TCP connections on loopback: socat as
`socat -b65536 TCP-LISTEN:P,fork TCP:127.0.0.1:SINK` (a source connects to it, it connects
to the sink), tete-tunnel's relay by joining two peers' data connections after a rendezvous
(the wire protocol of tete_tunnel/rendezvous.py and relay.py, spoken by a small client here:
two control connections join one name, answer the relay's pings, report `result {direct:
false}`, take the splice token, then two data connections present it and wait for `go`).
The direct path is never tried: on loopback it would always work, and what is measured is
the relay.

Rows, for 1 session and for many at once (each cell min / median / max over the rounds):
aggregate MB/s, the relay's CPU seconds per GiB moved, its RSS with the sessions open and
the most sampled during the transfer, and the time to set the sessions up. The tools run in
interleaved rounds (ABAB..., the first rotating), each round with a fresh relay process.

Run from the repository root:

    .venv/bin/python benchmarks/relay.py [--quick] [--runs N] [--gib X] [--sessions 1,100]
                                         [--user nobody] [--json FILE]

`--user` runs both relays as that user (setpriv), as a relay runs in production: the
kernel's per-user limit on pipe buffers (fs.pipe-user-pages-soft) then applies to the
relay's splice pipes, which it does not to root. The relays inherit this script's raised
descriptor limit (up to 65536). Needs socat on PATH and psutil (in the venv). Every process
started here is ended by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import json
import os
import resource
import secrets
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (
    PROCS,
    BenchError,
    LineWatcher,
    _readline,
    _tete_cmd,
    cpu_seconds,
    free_port,
    log,
    machine_info,
    pss_mib,
    rss_mib,
    tree,
    wait_port,
)

from tete_tunnel import rendezvous as rv

SCRIPT = Path(__file__).resolve()
HELPER = [sys.executable, str(SCRIPT), "--helper"]
CHUNK = 1 << 20  # source write / sink read size
SETUP_TIMEOUT = 120.0  # all sessions of one round must be up within this
# Sessions set up at once: the relay closes new connections beyond 512 that have not yet
# sent their first message (RelayLimits.max_pending), so thousands at once would be refused.
SETUP_PARALLEL = 100
RSS_SAMPLE = 0.1  # seconds between RSS samples during a transfer (the first at once)
SOCAT_BUFFER = 65536  # socat -b, as in compare.py (its default is 8192)
TOOLS = {"socat": "socat TCP relay", "tete": "tete-tunnel relay"}

# --------------------------------------------------------------------------------------
# The helper process: sets up the sessions, then forks; the parent is the source (writes
# into one end of every session), the child the sink (reads the other end until EOF).
# --------------------------------------------------------------------------------------


async def _recv(sock: socket.socket) -> dict[str, Any]:
    """The next message that is not a ping (pings are answered, as a peer does)."""
    while True:
        message = await rv.recv_message(sock, "the relay")
        if message["op"] == "ping":
            await rv.send_message(sock, {"op": "pong"})
            continue
        if message["op"] == "error":
            raise ConnectionError(f"the relay said: {message.get('reason')}")
        return message


async def _expect(sock: socket.socket, op: str) -> dict[str, Any]:
    message = await _recv(sock)
    if message["op"] != op:
        raise ConnectionError(f"the relay sent {message['op']}, not {op}")
    return message


async def _connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _peer_control(port: int, name: str) -> tuple[socket.socket, str]:
    """One peer's control connection, from join to the splice token."""
    sock = await _connect(port)
    await rv.send_message(sock, {"op": "join", "name": name, "local": []})
    await _expect(sock, "observed")
    await _expect(sock, "paired")
    await _expect(sock, "punch")  # the relay measured our RTT on the way (ping/pong)
    await rv.send_message(sock, {"op": "result", "direct": False})
    token = (await _expect(sock, "splice"))["token"]
    return sock, token


async def _peer_data(port: int, token: str) -> socket.socket:
    sock = await _connect(port)
    await rv.send_message(sock, {"op": "splice", "token": token})
    await _expect(sock, "go")
    return sock


async def _tete_session(port: int) -> tuple[list[socket.socket], socket.socket, socket.socket]:
    """Two peers meet on a fresh name and are relayed: (controls, data a, data b)."""
    name = "id-" + secrets.token_hex(20)  # as for pinned IDs: a hash of both
    (ca, token), (cb, token_b) = await asyncio.gather(
        _peer_control(port, name), _peer_control(port, name)
    )
    if token != token_b:
        raise ConnectionError("the two peers got different splice tokens")
    da, db = await asyncio.gather(_peer_data(port, token), _peer_data(port, token))
    return [ca, cb], da, db


async def _tete_sessions(port: int, count: int) -> tuple[list[Any], list[Any], list[Any]]:
    gate = asyncio.Semaphore(SETUP_PARALLEL)

    async def one() -> tuple[list[socket.socket], socket.socket, socket.socket]:
        async with gate:
            return await _tete_session(port)

    async with asyncio.timeout(SETUP_TIMEOUT):
        made = await asyncio.gather(*(one() for _ in range(count)))
    controls = [c for m in made for c in m[0]]
    return controls, [m[1] for m in made], [m[2] for m in made]


def _tcp_sessions(port: int, sink: socket.socket, count: int) -> tuple[list[Any], list[Any]]:
    """`count` connections to port (socat, or the sink itself), and the sink's accepts."""
    sources, sinks = [], []
    for _ in range(count):
        sources.append(socket.create_connection(("127.0.0.1", port), timeout=SETUP_TIMEOUT))
        conn, _ = sink.accept()
        sinks.append(conn)
    return sources, sinks


def _source(socks: list[socket.socket], each: int) -> None:
    """Write `each` bytes into every socket, then shut its sending side."""
    payload = memoryview(os.urandom(CHUNK))
    sel = selectors.DefaultSelector()
    left = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE)
        left[s] = each
    while left:
        for key, _ in sel.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                n = s.send(payload[: min(CHUNK, left[s])])
            except BlockingIOError:
                continue
            left[s] -= n
            if not left[s]:
                s.shutdown(socket.SHUT_WR)
                sel.unregister(s)
                del left[s]


def _sink(socks: list[socket.socket]) -> list[int]:
    """Read every socket to EOF (then shut our side, so the session ends); the counts."""
    buf = bytearray(CHUNK)
    sel = selectors.DefaultSelector()
    counts = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        counts[s] = 0
    open_ = len(socks)
    while open_:
        for key, _ in sel.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                continue
            if n:
                counts[s] += n
                continue
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            sel.unregister(s)
            open_ -= 1
    return [counts[s] for s in socks]


def helper_drive(kind: str, port: int, sink_port: int, count: int, each: int) -> int:
    """Set up `count` sessions, print `ready {json}`; on a line on stdin, move `each` bytes
    through every one of them; print the result as JSON."""
    began = time.perf_counter()
    controls: list[socket.socket] = []
    if kind == "tete":
        controls, sources, sinks = asyncio.run(_tete_sessions(port, count))
    else:
        listener = socket.create_server(("127.0.0.1", sink_port), backlog=4096)
        target = sink_port if kind == "direct" else port
        sources, sinks = _tcp_sessions(target, listener, count)
        listener.close()
    setup = time.perf_counter() - began
    print("ready " + json.dumps({"setup_s": setup}), flush=True)
    sys.stdin.readline()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the sink
        os.close(r)
        code = 1
        try:
            for s in sources + controls:
                s.close()
            counts = _sink(sinks)
            os.write(w, json.dumps({"end": time.perf_counter(), "counts": counts}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    for s in sinks:
        s.close()
    start = time.perf_counter()
    _source(sources, each)
    with os.fdopen(r, "rb") as pipe:
        raw = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not raw:
        raise SystemExit("the sink failed")
    sunk = json.loads(raw)
    wrong = [c for c in sunk["counts"] if c != each]
    if wrong:
        raise SystemExit(f"{len(wrong)} of {count} sessions delivered {wrong[0]} bytes, not {each}")
    for s in sources + controls:
        s.close()
    seconds = sunk["end"] - start
    print(json.dumps({"seconds": seconds, "bytes": each * count, "setup_s": setup}), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# The relays under test.
# --------------------------------------------------------------------------------------


class Relay:
    key = label = ""

    def __init__(self, sessions: int, prefix: list[str] | None = None) -> None:
        self.sessions = sessions
        self.prefix = prefix or []  # e.g. setpriv, to run the relay as another user
        self.port = 0
        self.sink_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def processes(self) -> list[psutil.Process]:
        return tree(self.proc) if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None:
            PROCS.stop(self.proc)
            self.proc = None


class SocatRelay(Relay):
    key, label = "socat", TOOLS["socat"]

    def __init__(self, sessions: int, prefix: list[str], buffer: int) -> None:
        super().__init__(sessions, prefix)
        self.buffer = buffer

    def start(self) -> None:
        self.port, self.sink_port = free_port(), free_port()
        self.proc = PROCS.start(
            [
                *self.prefix, "socat", f"-b{self.buffer}",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                f"TCP:127.0.0.1:{self.sink_port}",
            ]
        )  # fmt: skip
        wait_port(self.port, None, self.proc, "socat")


class TeteRelay(Relay):
    key, label = "tete", TOOLS["tete"]

    def start(self) -> None:
        self.port = free_port()
        self.proc = PROCS.start(
            [
                *self.prefix, *_tete_cmd(), "relay", "--listen", f"127.0.0.1:{self.port}",
                "--max-sessions", str(max(100, self.sessions)),
            ],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        LineWatcher(self.proc.stderr).wait_for("relay listening on", self.proc, "tete relay")


# --------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    key: str
    label: str
    unit: str
    digits: int
    higher_better: bool
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, tool: str, value: float) -> None:
        self.values.setdefault(tool, []).append(value)

    def median(self, tool: str) -> float | None:
        vals = self.values.get(tool)
        return statistics.median(vals) if vals else None

    def cell(self, tool: str) -> str:
        vals = self.values.get(tool)
        if not vals:
            return "failed" if self.failures.get(tool) else "n/a"
        d = self.digits
        star = "*" if self.failures.get(tool) else ""
        if len(vals) == 1:
            return f"{vals[0]:.{d}f}{star}"
        return f"{min(vals):.{d}f} / {statistics.median(vals):.{d}f} / {max(vals):.{d}f}{star}"

    def ratio(self) -> float | None:
        a, b = self.median("tete"), self.median("socat")
        return a / b if a is not None and b else None


def make_rows(sessions: list[int], total: int) -> dict[str, Row]:
    rows = []
    for n in sessions:
        what = f"{n} session{'s' if n > 1 else ''}, {_size(total)}{' total' if n > 1 else ''}"
        rows += [
            Row(f"rate{n}", f"{what}", "MB/s", 0, True),
            Row(f"cpu{n}", "  relay CPU per GiB", "s/GiB", 3, False),
            Row(f"rss{n}", f"  relay RSS, {n} session(s) open", "MiB", 1, False),
            Row(f"pss{n}", "  relay PSS (shared pages split), same", "MiB", 1, False),
            Row(f"peak{n}", "  relay RSS, most sampled in transfer", "MiB", 1, False),
            Row(f"setup{n}", f"  set-up of {n} session(s) at once", "s", 3, False),
        ]
    rows.append(Row("rss0", "relay RSS, started, no session", "MiB", 1, False))
    return {r.key: r for r in rows}


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


class Sampler:
    """The largest RSS sum of a relay's processes, sampled in a thread."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.relay.processes()))
            if self._stop.wait(RSS_SAMPLE):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def settle(relay: Relay, baseline: int) -> None:
    """Wait until socat's per-connection forks have exited (and been reaped)."""
    deadline = time.monotonic() + 30
    while len(relay.processes()) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)


def drive(relay: Relay, kind: str, count: int, each: int, rows: dict[str, Row] | None) -> dict:
    """One transfer through `relay` (or straight to the sink, kind "direct")."""
    sink_port = relay.sink_port or free_port()
    proc = PROCS.start(
        [*HELPER, "drive", kind, str(relay.port), str(sink_port), str(count), str(each)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors = LineWatcher(proc.stderr)
    try:
        try:
            line = _readline(proc, proc.stdout, SETUP_TIMEOUT + 10)
        except BenchError:
            proc.wait(5)
            time.sleep(0.1)  # the last line of stderr
            raise BenchError(f"set-up failed: {errors.last()}") from None
        if not line.startswith("ready "):
            raise BenchError(f"helper: {line or errors.last()}")
        ready = json.loads(line[6:])
        baseline = 1
        if rows is not None:
            time.sleep(0.3)
            procs = relay.processes()
            rows[f"rss{count}"].add(relay.key, rss_mib(procs))
            rows[f"pss{count}"].add(relay.key, pss_mib(procs))
        cpu_before = cpu_seconds(relay.processes())
        sampler = Sampler(relay)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        line = _readline(proc, proc.stdout, 60 + each * count / 5e6)
        peak = sampler.stop()
        if not line.startswith("{"):
            raise BenchError(f"helper: {errors.last()}")
        result = dict(json.loads(line))
        settle(relay, baseline)
        cpu = cpu_seconds(relay.processes()) - cpu_before
        result.update(cpu=cpu, peak=peak, setup_s=ready["setup_s"])
        return result
    finally:
        PROCS.stop(proc)


def measure_round(relay: Relay, sessions: list[int], each: dict[int, int], rows: dict) -> None:
    key = relay.key
    try:
        relay.start()
    except BenchError as exc:
        for r in rows.values():
            r.failures.setdefault(key, []).append(f"start: {exc}")
        log(f"    start: FAILED: {exc}")
        return
    try:
        time.sleep(0.3)
        rows["rss0"].add(key, rss_mib(relay.processes()))
        for n in sessions:
            began = time.monotonic()
            try:
                result = drive(relay, key, n, each[n], rows)
            except BenchError as exc:
                for k in ("rate", "cpu", "peak", "setup", "rss", "pss"):
                    rows[f"{k}{n}"].failures.setdefault(key, []).append(str(exc))
                log(f"    {n} session(s): FAILED: {exc}")
                continue
            gib = result["bytes"] / (1 << 30)
            rows[f"rate{n}"].add(key, result["bytes"] / result["seconds"] / 1e6)
            rows[f"cpu{n}"].add(key, result["cpu"] / gib)
            rows[f"peak{n}"].add(key, result["peak"])
            rows[f"setup{n}"].add(key, result["setup_s"])
            log(
                f"    {n} session(s): {rows[f'rate{n}'].values[key][-1]:.0f} MB/s, "
                f"{rows[f'cpu{n}'].values[key][-1]:.3f} CPU s/GiB, "
                f"RSS {rows[f'rss{n}'].values[key][-1]:.1f} MiB open, "
                f"{result['peak']:.1f} MiB peak, set-up {result['setup_s']:.3f} s "
                f"({time.monotonic() - began:.1f} s)"
            )
    finally:
        relay.stop()


def harness_ceiling(sessions: list[int], each: dict[int, int]) -> dict[int, float]:
    """Source and sink with nothing between them: the most any relay can show here."""
    ceiling = {}
    for n in sessions:
        direct = Relay(n)
        try:
            result = drive(direct, "direct", n, each[n], None)
        except BenchError as exc:
            log(f"harness ceiling, {n} session(s): FAILED: {exc}")
            continue
        ceiling[n] = result["bytes"] / result["seconds"] / 1e6
        log(f"harness ceiling, {n} session(s): {ceiling[n]:.0f} MB/s")
    return ceiling


def rounds(relays: list[Relay], runs: int) -> Iterator[tuple[int, Relay]]:
    for r in range(runs):
        shift = r % len(relays)
        for relay in relays[shift:] + relays[:shift]:
            yield r, relay


def render(
    rows: dict[str, Row], tools: list[str], info: dict[str, str], runs: int, ceiling: dict
) -> str:
    headers = ["measurement", "unit", *(TOOLS[t] for t in tools)]
    both = "tete" in tools and "socat" in tools
    if both:
        headers.append("tete/socat")
    table = []
    for row in rows.values():
        cells = [row.label, row.unit, *(row.cell(t) for t in tools)]
        if both:
            r = row.ratio()
            cells.append(f"{r:.2f}" if r is not None else "")
        table.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(out)

    ceil = ", ".join(f"{n} session(s) {v:.0f} MB/s" for n, v in ceiling.items())
    out = [
        f"machine: {info['nproc']} CPUs, {info['cpu']}; kernel {info['kernel']}",
        f"python {info['python']}; {info['socat']}; tete-tunnel {info['tete']}",
        f"min / median / max of {runs} interleaved round(s); MB = 10^6 bytes; ratio = median "
        "tete / median socat (above 1 is better for MB/s, below 1 for the rest)",
        f"harness ceiling (source -> sink, no relay, 1 run): {ceil or 'not measured'}",
        f"1-minute load average: {info.get('load', '?')}",
        f"relays run as: {info.get('user', 'this user')}",
        "",
        line(headers),
        "  ".join("-" * w for w in widths),
        *(line(r) for r in table),
    ]
    notes = [f"  {r.key}/{t}: {r.failures[t][0]}" for r in rows.values() for t in r.failures]
    if notes:
        out += ["", "failures (* = some runs failed; the figures are over the rest):", *notes]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 128 MiB per row")
    parser.add_argument("--runs", type=int, help="rounds (default 5; 2 with --quick)")
    parser.add_argument(
        "--gib", type=float, help="GiB per row, split over its sessions (default 1)"
    )
    parser.add_argument(
        "--sessions",
        default="1,100",
        help="comma-separated session counts, one row group each (default 1,100)",
    )
    parser.add_argument("--tools", default="socat,tete", help="subset of socat,tete")
    parser.add_argument(
        "--socat-buffer", type=int, default=SOCAT_BUFFER, help=f"socat -b (default {SOCAT_BUFFER})"
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="run both relays as this user (setpriv; a relay does not run as root in "
        "production, and the kernel's per-user pipe limits then apply)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    gib = args.gib if args.gib is not None else (0.125 if args.quick else 1.0)
    try:
        sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        parser.error("--sessions: comma-separated numbers")
    tools = [t for t in TOOLS if t in {x.strip() for x in args.tools.split(",")}]
    if runs < 1 or gib <= 0 or not sessions or min(sessions) < 1 or not tools:
        parser.error("--runs >= 1, --gib > 0, --sessions >= 1, --tools socat and/or tete")
    total = int(gib * (1 << 30))
    each = {n: total // n for n in sessions}

    # Every session holds several descriptors in the helper (and the relay holds its own).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(PROCS.stop_all)

    began = time.monotonic()
    info = machine_info()
    load = os.getloadavg()[0]
    rows = make_rows(sessions, total)
    prefix = []
    if args.user:
        import pwd

        try:
            gid = pwd.getpwnam(args.user).pw_gid
        except KeyError:
            parser.error(f"--user: no user {args.user!r}")
        prefix = ["setpriv", f"--reuid={args.user}", f"--regid={gid}", "--clear-groups"]
        info["user"] = args.user
    made: dict[str, Callable[[], Relay]] = {
        "socat": lambda: SocatRelay(max(sessions), prefix, args.socat_buffer),
        "tete": lambda: TeteRelay(max(sessions), prefix),
    }
    relays = [made[t]() for t in tools]
    try:
        ceiling = harness_ceiling(sessions, each)
        for r, relay in rounds(relays, runs):
            log(f"round {r + 1}/{runs}: {relay.label}")
            measure_round(relay, sessions, each, rows)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        PROCS.stop_all()
    info["load"] = f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(render(rows, tools, info, runs, ceiling))
    print(f"\nruntime: {time.monotonic() - began:.0f} s")
    if args.json:
        data = {
            "machine": info,
            "runs": runs,
            "sessions": sessions,
            "bytes_per_row": total,
            "socat_buffer": args.socat_buffer,
            "harness_ceiling": ceiling,
            "rows": [
                {
                    **dataclasses.asdict(r),
                    "median": {t: r.median(t) for t in tools},
                    "tete/socat": r.ratio(),
                }
                for r in rows.values()
            ],
        }
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":  # internal: a helper process
        if sys.argv[2] != "drive":
            raise SystemExit(f"unknown helper {sys.argv[2]!r}")
        a = sys.argv[3:]
        sys.exit(helper_drive(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4])))
    sys.exit(main())
