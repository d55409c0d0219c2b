"""`tete-tunnel netcheck --via RELAY` (issue 12, point 6): on loopback for the output and
the errors, and through the NAT lab for what it says of a port-preserving NAT and of a
symmetric one."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest

from tests.helpers import Proc, Procs, free_ports, skip_without_ipv6, wait_for_text
from tests.natlab import NatLab, natlab_available
from tete_tunnel import rendezvous as rv
from tete_tunnel.netcheck import Netcheck, Observation, describe

LOOPBACK = "127.0.0.1"
RELAY_PORT = 54320
LPORT = 40011
LOG_LINE = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d "


def start_relay(procs: Procs, *extra: str, prefix: list[str] | None = None, listen: str) -> Proc:
    relay = procs.start(["relay", "--listen", listen, *extra], prefix=prefix, name="relay")
    wait_for_text(relay.err_path, "relay listening on", 15)
    return relay


def stop(relay: Proc) -> None:
    relay.signal(signal.SIGTERM)
    assert relay.wait(15) == 0, relay.err


def two_free_ports() -> int:
    """A port whose next one is free too (the relay's default second port)."""
    for _ in range(50):
        port = free_ports(1)[0]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind((LOOPBACK, port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two free ports in a row")


def test_loopback_report_lines(procs: Procs) -> None:
    """Every finding on its own line; the relay's second port is its --listen port + 1."""
    port = two_free_ports()
    relay = start_relay(procs, listen=f"{LOOPBACK}:{port}")
    assert f"relay listening on {LOOPBACK}:{port} (and port {port + 1} for netcheck)" in relay.err
    lport = free_ports(1)[0]
    p = procs.start(["netcheck", "--via", f"{LOOPBACK}:{port}", "--lport", str(lport)])
    assert p.wait(20) == 0, p.err
    stop(relay)
    lines = p.out.decode().splitlines()
    assert re.fullmatch(
        rf"relay: {LOOPBACK}:{port}: \d+\.\d ms to connect, \d+\.\d ms to answer", lines[0]
    ), lines
    assert lines[1] == f"public address: {LOOPBACK}:{lport} (from local port {lport})"
    assert lines[2] == "NAT: none seen (the relay sees our own address)"
    assert lines[3] == (
        f"mapping: the same public port for two destinations ({lport}): endpoint-independent"
    )
    assert lines[4].startswith("IPv6: "), lines
    assert lines[5].startswith("in short: no NAT on our side: direct connections should work")
    assert len(lines) == 6, lines
    assert p.err == "", p.err


def test_relay_over_ipv6(procs: Procs) -> None:
    """A relay given as an IPv6 address is reached over IPv6, and said so."""
    skip_without_ipv6()
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    relay = start_relay(procs, "--second-port", "0", listen=f"[::1]:{port}")
    lport = free_ports(1)[0]
    p = procs.start(["netcheck", "--via", f"[::1]:{port}", "--lport", str(lport)])
    assert p.wait(20) == 0, p.err
    stop(relay)
    out = p.out.decode()
    assert f"public address: [::1]:{lport}" in out, out
    assert f"IPv6: yes, the relay sees [::1]:{lport}" in out, out
    assert "endpoint-independent" in out, out


def test_relay_without_second_port_says_the_mapping_was_not_tested(procs: Procs) -> None:
    port = free_ports(1)[0]
    relay = start_relay(procs, "--no-second-port", listen=f"{LOOPBACK}:{port}")
    assert relay.err.count("relay listening on") == 1 and "netcheck" not in relay.err
    p = procs.start(["netcheck", "--via", f"{LOOPBACK}:{port}", "--lport", str(free_ports(1)[0])])
    assert p.wait(20) == 0, p.err
    stop(relay)
    out = p.out.decode()
    assert "mapping: could not be tested: the relay listens on one port only" in out, out


def test_relay_down_is_one_error_line(procs: Procs) -> None:
    port = free_ports(1)[0]  # nothing listens there
    p = procs.start(["netcheck", "--via", f"{LOOPBACK}:{port}", "--lport", str(free_ports(1)[0])])
    assert p.wait(20) == 1, p.err
    assert p.out == b""
    assert re.fullmatch(
        LOG_LINE + rf"error: the relay {LOOPBACK}:{port} did not answer: Connection refused\n",
        p.err,
    ), p.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--via", "127.0.0.1:1,127.0.0.1:2"], "netcheck asks one relay"),
        (["--via", "127.0.0.1:1", "--lport", "0"], "--lport 0 is not a TCP port"),
    ],
)
def test_netcheck_usage_errors(procs: Procs, args: list[str], message: str) -> None:
    p = procs.start(["netcheck", *args])
    assert p.wait(20) == 2, p.err
    assert message in p.err and "Traceback" not in p.err, p.err


def test_relay_second_port_options_checked(procs: Procs) -> None:
    for args, message in (
        (["--second-port", "70000"], "--second-port 70000 is not a TCP port"),
        (["--second-port", "5", "--no-second-port"], "either --second-port or --no-second-port"),
    ):
        p = procs.start(["relay", "--listen", f"{LOOPBACK}:{free_ports(1)[0]}", *args])
        assert p.wait(20) == 2, p.err
        assert message in p.err, p.err


def observation(port: int, second_port: int | None = 2) -> Observation:
    return Observation(("192.168.1.2", 40000), ("203.0.113.1", port), 1.0, 1.0, second_port)


RELAY = rv.RelayAddress("198.51.100.1", 54320)


def test_describe_symmetric_and_untested() -> None:
    """What the lines say for each finding, without a network."""
    symmetric = Netcheck(RELAY, 40000, observation(40000), observation(51000), None, None, "x")
    text = "\n".join(describe(symmetric))
    assert "port: the NAT keeps the port (40000)" in text
    assert "changes the port per destination" in text and "symmetric" in text
    assert "in short: expect to be relayed" in text
    untested = Netcheck(RELAY, 40000, observation(40123, None), None, "no second", None, "x")
    text = "\n".join(describe(untested))
    assert "port: the NAT changes the port (40000 -> 40123)" in text
    assert "mapping: could not be tested: no second" in text
    assert "in short: unsure" in text


# -- through real NATs ----------------------------------------------------------------------

reason = natlab_available()
natlab = pytest.mark.skipif(reason is not None, reason=f"NAT lab unavailable: {reason}")


def netcheck_in_lab(procs: Procs, lab: NatLab) -> str:
    relay = start_relay(procs, prefix=lab.exec_argv("wan", []), listen=f"{lab.wan_ip}:54320")
    p = procs.start(
        ["netcheck", "--via", f"{lab.wan_ip}:{RELAY_PORT}", "--lport", str(LPORT)],
        prefix=lab.exec_argv("alice", []),
        name="netcheck",
    )
    assert p.wait(30) == 0, p.err
    stop(relay)
    assert "Traceback" not in p.err, p.err
    return p.out.decode()


@natlab
def test_port_preserving_nat_keeps_the_port(procs: Procs, tmp_path: Path) -> None:
    with NatLab("drop") as lab:
        out = netcheck_in_lab(procs, lab)
        public = lab.alice_public
    assert f"public address: {public}:{LPORT} (from local port {LPORT})" in out, out
    assert f"port: the NAT keeps the port ({LPORT})" in out, out
    assert "endpoint-independent" in out, out
    assert "in short: direct connections should work" in out, out


@natlab
def test_symmetric_nat_changes_the_port(procs: Procs, tmp_path: Path) -> None:
    with NatLab("drop") as lab:
        lab.set_nat("natA", random_fully=True)
        out = netcheck_in_lab(procs, lab)
        public = lab.alice_public
    assert f"public address: {public}:" in out, out
    assert "changes the port per destination" in out, out
    assert "keeps the port" not in out, out
    assert "in short: expect to be relayed" in out, out
