"""Shared test helpers: run the real tool as processes, with files for its I/O."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TOOL = [sys.executable, "-m", "tete_tunnel"]
SERVERS = [sys.executable, "-m", "tests.servers"]
REPO = Path(__file__).resolve().parent.parent


def _port_block() -> range:
    """This test process's own ports: below the kernel's ephemeral range and split by xdist
    worker, so no other worker and no outgoing connection's source port can take a port
    between `free_ports` choosing it and the tool binding it (bind(0) allowed both)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, last = 20000, min(low, 32768)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
    size = (last - first) // count
    if size < 64:
        return range(0)
    return range(first + index * size, first + (index + 1) * size)


_BLOCK = _port_block()
_cursor = random.randrange(len(_BLOCK)) if _BLOCK else 0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports that are free right now, distinct, from this process's own block (see
    `_port_block`); the kernel's choice (bind to port 0) where there is no block."""
    global _cursor
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: list[int] = []
    for _ in range(len(_BLOCK)):
        if len(ports) == n:
            return ports
        port = _BLOCK[_cursor % len(_BLOCK)]
        _cursor += 1
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))  # no SO_REUSEADDR: a TIME_WAIT user counts as taken
            except OSError:
                continue
        ports.append(port)
    socks = []
    try:
        for _ in range(n - len(ports)):
            s = socket.socket(family)
            s.bind((host, 0))
            socks.append(s)
        return ports + [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def skip_without_ipv6() -> None:
    """Skip the calling test where there is no IPv6 loopback."""
    import pytest

    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")


def wait_for_text(path: Path, text: str, timeout: float, count: int = 1) -> str:
    """Wait until `text` occurs `count` times in a growing log file; return the file."""
    end = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace")
        content = content[: content.rfind("\n") + 1]  # whole lines only: no half a write
        if content.count(text) >= count:
            return content
        if time.monotonic() > end:
            raise AssertionError(
                f"{text!r} x{count} not seen in {path} within {timeout}s:\n{content}"
            )
        time.sleep(0.05)


def env_without_config(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(home / "xdg")
    env["PYTHONPATH"] = str(REPO)
    env.pop("PYTHONWARNINGS", None)
    return env


@dataclass
class Proc:
    """A tool process whose stdin/stdout/stderr are files in a directory."""

    popen: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    _files: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float) -> int:
        rc = self.popen.wait(timeout=timeout)
        for f in self._files:
            f.close()
        return rc

    @property
    def out(self) -> bytes:
        return self.out_path.read_bytes()

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


class Procs:
    """Starts processes and ends every one of them by pid, even when a test fails."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []
        self.count = 0

    def start(
        self,
        args: list[str],
        stdin: Path | bytes | None = None,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        stdin_fd: int | None = None,
        stdout_fd: int | None = None,
        command: list[str] | None = None,
    ) -> Proc:
        """Start the tool; stdin/stdout are files unless raw descriptors are given."""
        self.count += 1
        name = name or f"p{self.count}"
        if isinstance(stdin, bytes):
            path = self.tmp / f"{name}.in"
            path.write_bytes(stdin)
            stdin = path
        fin = open(stdin, "rb") if stdin is not None else subprocess.DEVNULL
        out_path, err_path = self.tmp / f"{name}.out", self.tmp / f"{name}.err"
        fout, ferr = open(out_path, "wb"), open(err_path, "wb")
        popen = subprocess.Popen(
            [*(prefix or []), *(command if command is not None else TOOL), *args],
            stdin=stdin_fd if stdin_fd is not None else fin,
            stdout=stdout_fd if stdout_fd is not None else fout,
            stderr=ferr,
            env=env or env_without_config(self.tmp),
            cwd=REPO,
        )
        files = [fout, ferr] + ([fin] if fin is not subprocess.DEVNULL else [])
        proc = Proc(popen, out_path, err_path, files)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.popen.wait(timeout=5)
            for f in proc._files:
                f.close()


@contextlib.contextmanager
def processes(tmp: Path) -> Iterator[Procs]:
    procs = Procs(tmp)
    try:
        yield procs
    finally:
        procs.close()


def pair_args(
    port_a: int, port_b: int, ip_a: str = "127.0.0.1", ip_b: str = "127.0.0.1"
) -> tuple[list[str], list[str]]:
    """Connection arguments for two peers that dial each other's public address."""
    return (
        ["--peer-ip", ip_b, "--lport", str(port_a), "--rport", str(port_b)],
        ["--peer-ip", ip_a, "--lport", str(port_b), "--rport", str(port_a)],
    )
