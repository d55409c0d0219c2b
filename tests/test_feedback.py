"""Feedback for a person at a terminal, silence in pipelines, and ssh's habits (issue 12).

Terminal feedback shows only when stderr is a terminal: these tests give the tool a pseudo
terminal (the `pty` module) on stderr, and files otherwise. Every process is ended by pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    SERVERS,
    TOOL,
    Proc,
    Procs,
    env_without_config,
    free_ports,
    pair_args,
    wait_for_text,
)

MiB = 1 << 20
ERASE = "\r\x1b[K"
COMMANDS = (
    "id",
    "pipe",
    "forward",
    "relay",
    "whoami",
    "netcheck",
    "demo",
    "peers add",
    "peers list",
    "peers remove",
)


def _with_pty_stderr(
    args: list[str],
    tmp: Path,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    timeout: float = 60,
    during: threading.Thread | None = None,
    columns: int = 0,
) -> tuple[int, str]:
    """Run the tool with a pseudo terminal as its stderr; its exit code and all it wrote.
    `columns`: the terminal's width (0: unknown, as a fresh pty)."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [*TOOL, *args],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=slave,
        env=env_without_config(tmp),
        cwd=REPO,
    )
    os.close(slave)
    chunks: list[bytes] = []
    try:
        if during is not None:
            during.start()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last holder of the terminal's other end is gone
                data = b""
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def _raw(p: Proc) -> str:
    """What a process wrote on stderr, carriage returns kept (read_text turns them into \\n)."""
    return p.err_path.read_bytes().decode(errors="replace")


def _left_values(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"\.\.\. (\d+) s left", text)}


def _no_status_in_log_lines(text: str) -> None:
    """Every log line begins at the start of the line: the status line was erased first."""
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = line.rsplit("\x1b[K", 1)[-1]
        if re.search(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", shown):
            assert re.match(r"\d{4}/\d\d/\d\d ", shown), f"a log line after other text: {line!r}"


def _no_peer_args(tmp: Path, timeout: str) -> list[str]:
    a, b = free_ports(2)
    return [
        "pipe",
        "--peer-ip",
        "127.0.0.1",
        "--lport",
        str(a),
        "--rport",
        str(b),
        "--timeout",
        timeout,
        "--identity",
        str(tmp / "i"),
    ]


# ------------------------------------------------------------ the waiting line


def test_waiting_line_counts_down_under_a_terminal(tmp_path: Path) -> None:
    rc, err = _with_pty_stderr(_no_peer_args(tmp_path, "3.5"), tmp_path)
    assert rc == 1, err
    assert "waiting for the peer at 127.0.0.1:" in err
    assert len(_left_values(err)) >= 2, f"the seconds left never changed:\n{err!r}"
    # Erased before the error line, which starts its own line.
    before_error = err[: err.index(" error: ")]
    assert before_error.rstrip("0123456789/: ").endswith(ERASE), repr(err[-400:])
    _no_status_in_log_lines(err)


def test_status_line_fits_the_terminal(tmp_path: Path) -> None:
    """Cut to the terminal's width: a line that wraps could not be erased with a \\r."""
    rc, err = _with_pty_stderr(_no_peer_args(tmp_path, "1.5"), tmp_path, columns=30)
    assert rc == 1, err
    shown = [part for part in err.split(ERASE) if part and " error: " not in part]
    assert shown and all(len(part) <= 29 for part in shown), shown
    assert "waiting for the peer" in shown[0]


def test_no_waiting_line_in_a_pipeline(procs: Procs, tmp_path: Path) -> None:
    p = procs.start(_no_peer_args(tmp_path, "2.5"))
    assert p.wait(30) == 1
    assert " error: " in p.err
    assert "\r" not in _raw(p) and "left" not in p.err and "\x1b" not in _raw(p), _raw(p)


# ------------------------------------------------------------ pipe: progress and summary


def test_progress_and_summary(procs: Procs, tmp_path: Path) -> None:
    """A sends 4 MiB + 5 bytes from a slow writer with stderr a terminal: its progress line
    updates, its summary is shown (a terminal) with the exact figures. B runs in a pipeline
    with -v: a summary with the same figures, and no terminal feedback at all."""
    payload = os.urandom(4 * MiB + 5)
    reply = b"thanks\n"
    port_a, port_b = free_ports(2)
    link_a, link_b = pair_args(port_a, port_b)
    read_fd, write_fd = os.pipe()

    def slow_writer() -> None:
        try:
            time.sleep(1.0)  # the link comes up meanwhile: progress starts at 0 B
            for i in range(0, len(payload), 256 * 1024):
                os.write(write_fd, payload[i : i + 256 * 1024])
                time.sleep(0.12)
        finally:
            os.close(write_fd)

    out_a = tmp_path / "a.out"
    b = procs.start(
        ["pipe", *link_b, "--identity", str(tmp_path / "b"), "-v"], stdin=reply, name="b"
    )
    with open(out_a, "wb") as fout:
        rc, err_a = _with_pty_stderr(
            ["pipe", *link_a, "--identity", str(tmp_path / "a")],
            tmp_path,
            stdin=read_fd,
            stdout=fout.fileno(),
            during=threading.Thread(target=slow_writer),
        )
    os.close(read_fd)
    assert rc == 0, err_a
    assert b.wait(30) == 0, b.err
    assert out_a.read_bytes() == reply
    assert b.out == payload

    sent_values = set(re.findall(r"sent ([\d.]+ [KMG]?i?B) \(", err_a))
    assert len(sent_values) >= 3, f"the progress line did not update:\n{err_a!r}"
    assert "/s), received" in err_a
    _no_status_in_log_lines(err_a)
    for line in ("Connected to peer!", "Peer closed connection", "Closed connection"):
        assert line in err_a and line in b.err
    n = len(payload)
    assert re.search(
        rf"summary: [\d.]+ s, sent 4\.0 MiB \({n} B\), received 7 B, 1 stream, direct", err_a
    ), err_a
    summary_b = [line for line in b.err.splitlines() if "summary:" in line]
    assert len(summary_b) == 1, b.err
    assert f"sent 7 B, received 4.0 MiB ({n} B), 1 stream, direct" in summary_b[0]
    assert "\r" not in _raw(b) and "left" not in b.err and "/s)" not in b.err, _raw(b)


def test_no_progress_nor_summary_in_a_pipeline(procs: Procs, tmp_path: Path) -> None:
    link_a, link_b = pair_args(*free_ports(2))
    a = procs.start(["pipe", *link_a, "--identity", str(tmp_path / "a")], stdin=os.urandom(MiB))
    b = procs.start(["pipe", *link_b, "--identity", str(tmp_path / "b")], stdin=b"")
    assert a.wait(30) == 0 and b.wait(30) == 0, a.err + b.err
    for p in (a, b):
        assert "Connected to peer!" in p.err
        assert "\r" not in _raw(p) and "left" not in p.err and "summary" not in p.err, _raw(p)


def test_progress_forced_into_a_file(procs: Procs, tmp_path: Path) -> None:
    """--progress forces it where it would not show (stderr a file); a tiny transfer still
    draws the line once and erases it."""
    link_a, link_b = pair_args(*free_ports(2))
    a = procs.start(
        ["pipe", *link_a, "--identity", str(tmp_path / "a"), "--progress"], stdin=b"x" * 1000
    )
    b = procs.start(["pipe", *link_b, "--identity", str(tmp_path / "b")], stdin=b"")
    assert a.wait(30) == 0 and b.wait(30) == 0, a.err + b.err
    assert "sent 0 B (0 B/s), received 0 B" in a.err and ERASE in _raw(a), _raw(a)
    assert "\r" not in _raw(b)


# ------------------------------------------------------------ -q


def test_quiet_prints_only_errors(procs: Procs, tmp_path: Path) -> None:
    link_a, link_b = pair_args(*free_ports(2))
    a = procs.start(["pipe", *link_a, "--identity", str(tmp_path / "a"), "-q"], stdin=b"hi")
    b = procs.start(["pipe", *link_b, "--identity", str(tmp_path / "b"), "--quiet"], stdin=b"")
    assert a.wait(30) == 0 and b.wait(30) == 0, a.err + b.err
    assert b.out == b"hi"
    assert a.err == "" and b.err == "", a.err + b.err

    wrong = subprocess.run(
        [*TOOL, "pipe", "-q", "--frobnicate"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_without_config(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert wrong.returncode == 2
    assert "error: No such option: --frobnicate" in wrong.stderr

    failing = procs.start([*_no_peer_args(tmp_path, "1"), "-q"])
    assert failing.wait(30) == 1
    lines = failing.err.splitlines()
    assert lines and all(" error: " in line for line in lines), failing.err


# ------------------------------------------------------------ forward: summary, -f


def _server(procs: Procs, kind: str) -> int:
    proc = procs.start([kind, "0"], command=SERVERS, name=f"server-{kind}")
    return int(wait_for_text(proc.out_path, "ready", 15).split()[1])


def _echo_through(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_forward_summary_at_exit_with_v(procs: Procs, tmp_path: Path) -> None:
    echo = _server(procs, "echo")
    local = free_ports(1)[0]
    link_a, link_b = pair_args(*free_ports(2))
    a = procs.start(
        [
            "forward",
            *link_a,
            "--identity",
            str(tmp_path / "a"),
            "-v",
            "-L",
            f"{local}:127.0.0.1:{echo}",
        ],
        name="a",
    )
    b = procs.start(["forward", *link_b, "--identity", str(tmp_path / "b")], name="b")
    wait_for_text(a.out_path, "Forwarding", 20)
    data = os.urandom(300_000)
    assert _echo_through(local, data) == data
    a.signal(signal.SIGINT)
    assert a.wait(15) == 0, a.err
    b.wait(15)
    summary = [line for line in a.err.splitlines() if "summary:" in line]
    assert len(summary) == 1, a.err
    match = re.search(
        r"sent [\d.]+ KiB \((\d+) B\), received [\d.]+ KiB \((\d+) B\), 1 stream, direct",
        summary[0],
    )
    assert match, summary[0]
    # The data each way, and the few bytes that open the stream.
    assert 0 <= int(match.group(1)) - len(data) < 100
    assert 0 <= int(match.group(2)) - len(data) < 100
    assert "summary" not in b.err  # no -v there


def _pids_with_arg(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_forward_f_goes_to_the_background_once_forwards_are_up(
    procs: Procs, tmp_path: Path
) -> None:
    echo = _server(procs, "echo")
    local = free_ports(1)[0]
    link_a, link_b = pair_args(*free_ports(2))
    pid_file = tmp_path / "tunnel.pid"
    procs.start(["forward", *link_b, "--identity", str(tmp_path / "b")], name="b")
    out, err = tmp_path / "a.out", tmp_path / "a.err"
    try:
        with open(out, "wb") as fout, open(err, "wb") as ferr:
            started = time.monotonic()
            parent = subprocess.run(
                [
                    *TOOL,
                    "forward",
                    "-f",
                    "--pid-file",
                    str(pid_file),
                    *link_a,
                    "--identity",
                    str(tmp_path / "a"),
                    "-L",
                    f"{local}:127.0.0.1:{echo}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=fout,
                stderr=ferr,
                env=env_without_config(tmp_path),
                cwd=REPO,
                timeout=40,
            )
        assert parent.returncode == 0, err.read_text()
        assert time.monotonic() - started < 30
        # Back at the shell with the forward up: its line is out, the -L port answers.
        assert f"Forwarding 127.0.0.1:{local} -> peer 127.0.0.1:{echo}" in out.read_text()
        assert "Connected to peer!" in err.read_text()
        pid = int(pid_file.read_text())
        assert _running(pid)
        assert pid in _pids_with_arg(str(pid_file))
        assert os.getsid(pid) == pid  # a session of its own: the terminal's hangup misses it
        data = os.urandom(100_000)
        assert _echo_through(local, data) == data
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while _running(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _running(pid), "the background forward did not exit on SIGTERM"
        assert not pid_file.exists(), "the pid file outlived its process"
        assert "Closed connection" in err.read_text()
    finally:
        for pid in _pids_with_arg(str(pid_file)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_forward_f_failing_before_ready_exits_with_its_error(tmp_path: Path) -> None:
    """No peer: the parent waits for the background process, which fails; its code and error
    line come back, and no process is left."""
    a, b = free_ports(2)
    pid_file = tmp_path / "never.pid"
    result = subprocess.run(
        [
            *TOOL,
            "forward",
            "-f",
            "--pid-file",
            str(pid_file),
            "--peer-ip",
            "127.0.0.1",
            "--lport",
            str(a),
            "--rport",
            str(b),
            "--timeout",
            "1.5",
            "--identity",
            str(tmp_path / "i"),
        ],
        capture_output=True,
        text=True,
        timeout=40,
        env=env_without_config(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    try:
        assert result.returncode == 1, result.stderr
        assert "error: could not connect to the peer" in result.stderr
        assert not pid_file.exists()
        assert not [p for p in _pids_with_arg(str(pid_file)) if _running(p)]
    finally:
        for pid in _pids_with_arg(str(pid_file)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------ help and usage errors


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env_without_config(tmp), "COLUMNS": "100"},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_has_examples_and_exit_codes(command: str, tmp_path: Path) -> None:
    result = _run([*command.split(), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Examples:" in result.stdout
    assert f"tete-tunnel {command}" in result.stdout.split("Examples:")[1]
    assert "Exit codes: 0 ok, 1 failure, 2 usage error." in result.stdout
    verbose = [line for line in result.stdout.splitlines() if "--verbose" in line]
    assert verbose and "<int>" not in verbose[0] and "INTEGER" not in verbose[0], verbose
    assert "--quiet" in result.stdout


def test_completion_is_offered(tmp_path: Path) -> None:
    result = _run(["--help"], tmp_path)
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    env = {
        **env_without_config(tmp_path),
        "_TETE_TUNNEL_COMPLETE": "complete_bash",
        "COMP_WORDS": "tete-tunnel fo",
        "COMP_CWORD": "1",
    }
    completed = subprocess.run(
        [*TOOL], capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL
    )
    assert completed.stdout.split() == ["forward"], completed


@pytest.mark.parametrize(
    "args",
    [["pipe", "--frobnicate"], ["forward", "--lport", "x"], ["pipe", "--peer-ip", "nope"]],
)
def test_one_error_style(args: list[str], tmp_path: Path) -> None:
    result = _run(args, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert " error: " in lines[0]
    assert lines[1] == f"Try 'tete-tunnel {args[0]} --help' for help."
    assert "╭" not in result.stderr and "Traceback" not in result.stderr
