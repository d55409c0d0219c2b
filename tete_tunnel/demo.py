"""`tete-tunnel demo`: show a newcomer the whole tool on one machine, then clean up.

Two real peers (separate identities in a temporary directory, loopback ports), an HTTP
server behind one, a -L forward on the other, a page fetched through it, a few MiB through
`pipe`, each checked by SHA-256 and timed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tete_tunnel.errors import TeteError

PAGE_SIZE = 1 << 20
PIPE_SIZE = 32 << 20
STEP_TIMEOUT = 30.0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _http_server(body: bytes) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _Peers:
    """The peer processes of the demo; every one is ended by pid on the way out."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], stdin: Path | None = None) -> subprocess.Popen:
        out = open(self.tmp / f"{name}.out", "wb")
        err = open(self.tmp / f"{name}.err", "wb")
        fin = open(stdin, "rb") if stdin else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tete_tunnel", *args, "--identity", str(self.tmp / name)],
                stdin=fin,
                stdout=out,
                stderr=err,
            )
        finally:
            for f in (out, err) + ((fin,) if stdin else ()):
                f.close()
        self.procs.append(proc)
        return proc

    def text(self, name: str, stream: str = "err") -> str:
        return (self.tmp / f"{name}.{stream}").read_text(errors="replace")

    def wait_for(self, name: str, stream: str, needle: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while needle not in self.text(name, stream):
            if proc.poll() is not None:
                raise TeteError(f"peer {name} exited early: {self._last_line(name)}")
            if time.monotonic() > deadline:
                raise TeteError(f"peer {name} did not say {needle!r} in time")
            time.sleep(0.02)

    def _last_line(self, name: str) -> str:
        lines = self.text(name).strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def stop(self, proc: subprocess.Popen) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def _say(step: str) -> None:
    print(step, flush=True)


def run_demo() -> None:
    """Run the demo; raises TeteError with the failed step."""
    _say("tete-tunnel demo: two peers on this machine, talking through loopback")
    body = os.urandom(PAGE_SIZE)
    with tempfile.TemporaryDirectory(prefix="tete-demo-") as tmp_name, _http_server(body) as http:
        tmp = Path(tmp_name)
        peers = _Peers(tmp)
        try:
            _demo_forward(peers, http, body)
            _demo_pipe(peers, tmp)
        finally:
            peers.close()
    _say("  cleaned up: processes ended, temporary identities removed")
    _say("demo OK: both peers authenticated each other, the page and the pipe data arrived intact")


def _link(lport: int, rport: int) -> list[str]:
    """A peer's connection options: both peers run here, on loopback."""
    return ["--peer-ip", "127.0.0.1", "--lport", str(lport), "--rport", str(rport)]


def _demo_forward(peers: _Peers, http_port: int, body: bytes) -> None:
    pa, pb, local = _free_ports(3)
    started = time.monotonic()
    server = peers.start("bob", ["forward", *_link(pb, pa)])
    client = peers.start(
        "alice", ["forward", *_link(pa, pb), "-L", f"{local}:127.0.0.1:{http_port}"]
    )
    peers.wait_for("alice", "out", "Forwarding", client)
    peers.wait_for("bob", "err", "Connected to peer!", server)
    _say(f"  linked two peers (hole punch, mutual TLS 1.3) in {time.monotonic() - started:.2f} s")
    _say(f"  alice: -L {local}:127.0.0.1:{http_port}  (bob runs a web server on port {http_port})")
    started = time.monotonic()
    url = f"http://127.0.0.1:{local}/"
    try:
        with urllib.request.urlopen(url, timeout=STEP_TIMEOUT) as response:
            page = response.read()
    except OSError as exc:
        raise TeteError(f"fetching {url} through the tunnel failed: {exc}") from exc
    elapsed = time.monotonic() - started
    if hashlib.sha256(page).digest() != hashlib.sha256(body).digest():
        raise TeteError(f"the page fetched through the tunnel differs ({len(page)} bytes)")
    _say(
        f"  fetched {url} through the tunnel: {len(page)} bytes, SHA-256 equal, "
        f"{len(page) / elapsed / 1e6:.0f} MB/s"
    )
    for name, proc in (("alice", client), ("bob", server)):
        if peers.stop(proc) != 0:
            raise TeteError(f"peer {name} did not end cleanly: {peers._last_line(name)}")


def _demo_pipe(peers: _Peers, tmp: Path) -> None:
    pa, pb = _free_ports(2)
    data = os.urandom(PIPE_SIZE)
    (tmp / "data").write_bytes(data)
    sender = peers.start("alice", ["pipe", *_link(pa, pb)], stdin=tmp / "data")
    receiver = peers.start("bob", ["pipe", *_link(pb, pa)])
    peers.wait_for("bob", "err", "Connected to peer!", receiver)
    started = time.monotonic()  # the transfer, not the start-up of two Pythons
    for name, proc in (("alice", sender), ("bob", receiver)):
        try:
            rc = proc.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TeteError(f"pipe peer {name} did not finish in time") from None
        if rc != 0:
            raise TeteError(f"pipe peer {name} failed: {peers._last_line(name)}")
    elapsed = time.monotonic() - started
    got = (tmp / "bob.out").read_bytes()
    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        raise TeteError(f"the piped data differs ({len(got)} of {len(data)} bytes arrived)")
    _say(
        f"  piped {PIPE_SIZE >> 20} MiB from alice to bob with `tete-tunnel pipe`: SHA-256 equal, "
        f"{len(data) / elapsed / 1e6:.0f} MB/s once linked"
    )
