"""Smoke test for tests/natlab.py using plain sockets only (no project code).

Proves the lab's NATs behave like the real thing: a TCP simultaneous open punches through
port-preserving NATs (whether they drop or RST unsolicited SYNs), and does not punch
through NATs that randomise ports.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.natlab import NatLab, natlab_available

_reason = natlab_available()
if _reason:
    pytest.skip(f"NatLab unavailable: {_reason}", allow_module_level=True)

PORT = 40123

# argv: local_port remote_host remote_port my_line deadline_seconds start_delay_seconds
PUNCH = r"""
import errno, socket, sys, time
lport, rhost, rport, line, budget, delay = sys.argv[1:]
time.sleep(float(delay))
deadline = time.monotonic() + float(budget)
errors = {}
while time.monotonic() < deadline:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", int(lport)))
    s.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
    try:
        s.connect((rhost, int(rport)))
    except OSError as e:
        key = errno.errorcode.get(e.errno, type(e).__name__)
        errors[key] = errors.get(key, 0) + 1
        s.close()
        time.sleep(0.05)
        continue
    s.settimeout(5)
    s.sendall((line + "\n").encode())
    got = s.makefile("rb").readline().decode().strip()
    print(got, flush=True)
    print(f"connected errors={errors}", file=sys.stderr)
    sys.exit(0 if got else 3)
print(f"gave up errors={errors}", file=sys.stderr)
sys.exit(1)
"""

ECHO_SERVER = r"""
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
conn, _ = srv.accept()
conn.sendall(conn.makefile("rb").readline())
"""

ECHO_CLIENT = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
conn.sendall(b"echo from alice\n")
print(conn.makefile("rb").readline().decode(), end="")
"""


def _punch(lab: NatLab, budget: float, bob_delay: float) -> dict[str, tuple[int, str, str]]:
    """Run the punching script in alice and bob; return rc/stdout/stderr for each.

    Bob starts bob_delay seconds late so alice's first SYN meets natB with no mapping yet,
    which is what exercises the drop-vs-RST difference.
    """
    plan = {
        "alice": (lab.bob_public, "hello from alice", 0.0),
        "bob": (lab.alice_public, "hello from bob", bob_delay),
    }
    procs = {
        host: lab.popen(
            host,
            [
                sys.executable,
                "-c",
                PUNCH,
                str(PORT),
                peer,
                str(PORT),
                line,
                str(budget),
                str(delay),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for host, (peer, line, delay) in plan.items()
    }
    results = {}
    for host, p in procs.items():
        out, err = p.communicate(timeout=budget + 10)
        results[host] = (p.returncode, out.strip(), err.strip())
    return results


def _leftover(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix + "-")]


@pytest.mark.parametrize(
    ("kind", "alice_refused"), [("drop", False), ("rst", True), ("no-nat", True)]
)
def test_punch_connects(kind: str, alice_refused: bool) -> None:
    with NatLab(kind) as lab:
        res = _punch(lab, budget=20, bob_delay=1.0)
    assert res["alice"] == (0, "hello from bob", res["alice"][2]), res
    assert res["bob"] == (0, "hello from alice", res["bob"][2]), res
    # "drop" must swallow alice's early SYN; "rst" and a bare bob must refuse it.
    assert ("ECONNREFUSED" in res["alice"][2]) == alice_refused, res
    assert _leftover(lab.prefix) == []


def test_same_lan_direct() -> None:
    # Connect-only punching is a race on a firewall-less LAN: each SYN is refused at once
    # by the other kernel. So check the plumbing with a plain listener instead.
    with NatLab("same-lan") as lab:
        assert lab.alice_public == lab.alice_ip and lab.bob_public == lab.bob_ip
        server = lab.popen(
            "bob", [sys.executable, "-c", ECHO_SERVER, str(PORT)], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        client = [sys.executable, "-c", ECHO_CLIENT, lab.bob_public, str(PORT)]
        assert lab.run("alice", client).stdout == "echo from alice\n"
        server.wait(timeout=5)
        server.stdout.close()
    assert _leftover(lab.prefix) == []


def test_symmetric_nat_does_not_punch() -> None:
    with NatLab("symmetric") as lab:
        res = _punch(lab, budget=6, bob_delay=0.0)
    assert res["alice"][0] != 0 and res["bob"][0] != 0, res
    assert res["alice"][1] == res["bob"][1] == "", res
    assert _leftover(lab.prefix) == []


def test_cleanup_on_error_and_missing_host() -> None:
    with pytest.raises(RuntimeError, match="boom"), NatLab("no-nat") as lab:
        sleeper = lab.popen("bob", ["sleep", "60"])
        with pytest.raises(ValueError, match="natB"):
            lab.run("natB", ["true"])
        assert lab.wan_if("natA") == "wan0" and lab.wan_if("bob") == "wan0"
        raise RuntimeError("boom")
    assert sleeper.returncode is not None
    assert _leftover(lab.prefix) == []
