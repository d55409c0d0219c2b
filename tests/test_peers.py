"""Named peers (`peers add/list/remove`, `--peer NAME`) between real processes on loopback."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.helpers import TOOL, Proc, Procs, env_without_config, free_ports, wait_for_text
from tests.test_forward import forwarded_port, start_server, stop

LOG_LINE = r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} "


def run(args: list[str], tmp: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_without_config(tmp),
        stdin=subprocess.DEVNULL,
    )


def ids(tmp: Path) -> tuple[str, str]:
    """The IDs of two identities a and b under tmp (created here)."""
    out = []
    for side in ("a", "b"):
        result = run(["id", "--identity", str(tmp / side)], tmp)
        assert result.returncode == 0, result.stderr
        out.append(result.stdout.strip())
    return out[0], out[1]


def add(tmp: Path, config: Path, *args: str) -> None:
    result = run(["peers", "add", *args, "--config-dir", str(config)], tmp)
    assert result.returncode == 0, result.stderr
    assert "saved peer" in result.stderr


def echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received


def test_add_list_remove_round_trip(tmp_path: Path) -> None:
    id_a, id_b = ids(tmp_path)
    config = tmp_path / "conf"
    add(tmp_path, config, "alice", id_a.lower().replace("-", ""), "--ip", "alice.example.org")
    add(
        tmp_path,
        config,
        "bob",
        id_b,
        "--via",
        "relay.example.org:54320",
        "--lport",
        "40000",
        "-L",
        "2222:127.0.0.1:22",
        "-R",
        "8080:127.0.0.1:80",
    )
    path = config / "peers.toml"
    assert tomllib.loads(path.read_text()) == {
        "peers": {
            "alice": {"id": id_a, "ip": "alice.example.org"},  # the ID as `id` prints it
            "bob": {
                "id": id_b,
                "via": "relay.example.org:54320",
                "lport": 40000,
                "forward": ["-L", "2222:127.0.0.1:22", "-R", "8080:127.0.0.1:80"],
            },
        }
    }
    assert path.stat().st_mode & 0o777 == 0o600
    listed = run(["peers", "list", "--config-dir", str(config)], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        f"alice  {id_a}  ip alice.example.org:54312",
        f"bob  {id_b}  via relay.example.org:54320  lport 40000  "
        "-L 2222:127.0.0.1:22 -R 8080:127.0.0.1:80",
    ]
    again = run(["peers", "add", "alice", id_b, "--config-dir", str(config)], tmp_path)
    assert again.returncode == 2 and "already in" in again.stderr and "--replace" in again.stderr
    removed = run(["peers", "remove", "alice", "--config-dir", str(config)], tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert list(tomllib.loads(path.read_text())["peers"]) == ["bob"]
    listed = run(["peers", "list", "--config-dir", str(config)], tmp_path)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["bob"]
    gone = run(["peers", "remove", "alice", "--config-dir", str(config)], tmp_path)
    assert gone.returncode == 2
    assert "no peer named 'alice'" in gone.stderr and "known: bob" in gone.stderr
    # The environment variable chooses the directory as --config-dir does.
    env = {**env_without_config(tmp_path), "TETE_TUNNEL_CONFIG_DIR": str(config)}
    by_env = subprocess.run(
        [*TOOL, "peers", "list"], capture_output=True, text=True, timeout=30, env=env
    )
    assert by_env.stdout.split()[0] == "bob", by_env.stderr


def write_peers(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)


GOOD_ID = "A" * 52


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # One character of a real-looking ID changed to one base32 has not: tampered.
        (f'id = "{"A" * 25}1{"A" * 26}"\nip = "127.0.0.1"', "not a tete-tunnel ID"),
        (f'id = "{"A" * 51}"\nip = "127.0.0.1"', "not a tete-tunnel ID"),
        (f'id = "{GOOD_ID}"\nip = "127.0.0.1"\nfrobnicate = 1', "unknown key 'frobnicate'"),
        (f'id = "{GOOD_ID}"\nip = "127.0.0.1"\nport = 70000', "port = 70000 is not a TCP port"),
        (f'id = "{GOOD_ID}"\nip = "127.0.0.1"\nforward = ["-L"]', "expected pairs of"),
        (f'id = "{GOOD_ID}"\nip = "127.0.0.1"\nforward = ["-L", "x"]', "bad -L 'x'"),
        ('ip = "127.0.0.1"', "no id"),
        (f'id = "{GOOD_ID}"\nip = "127.0.0.1"\nvia = "relay"', "ip or via, not both"),
    ],
)
def test_a_bad_profile_is_refused_naming_file_and_peer(
    body: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "conf" / "peers.toml"
    write_peers(path, f"[peers.alice]\n{body}\n")
    for args in (["pipe", "--peer", "alice"], ["forward", "--peer", "alice"], ["peers", "list"]):
        result = run([*args, "--config-dir", str(path.parent)], tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"{path}: peer 'alice': " in result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        assert "punching" not in result.stderr.lower()


def test_not_toml_and_a_missing_name_are_clear(tmp_path: Path) -> None:
    config = tmp_path / "conf"
    write_peers(config / "peers.toml", "[peers.alice\n")
    result = run(["pipe", "--peer", "alice", "--config-dir", str(config)], tmp_path)
    assert result.returncode == 2 and f"{config / 'peers.toml'}: not valid TOML" in result.stderr
    write_peers(config / "peers.toml", f'[peers.alice]\nid = "{GOOD_ID}"\nip = "127.0.0.1"\n')
    result = run(["pipe", "--peer", "carol", "--config-dir", str(config)], tmp_path)
    assert result.returncode == 2
    assert "no peer named 'carol'" in result.stderr and "(known: alice)" in result.stderr
    (config / "peers.toml").chmod(0o666)
    result = run(["pipe", "--peer", "alice", "--config-dir", str(config)], tmp_path)
    assert result.returncode == 1 and "can be changed by others" in result.stderr


def start_forwards(
    procs: Procs, tmp: Path, extra_a: list[str], extra_b: list[str]
) -> tuple[Proc, Proc]:
    a = procs.start(
        [
            "forward",
            "--peer",
            "b",
            "--config-dir",
            str(tmp / "conf-a"),
            "-v",
            *extra_a,
            "--identity",
            str(tmp / "a"),
        ],
        name="fwd-a",
    )
    b = procs.start(
        [
            "forward",
            "--peer",
            "a",
            "--config-dir",
            str(tmp / "conf-b"),
            "-v",
            *extra_b,
            "--identity",
            str(tmp / "b"),
        ],
        name="fwd-b",
    )
    wait_for_text(a.err_path, "Connected to peer!", 20)
    wait_for_text(b.err_path, "Connected to peer!", 20)
    return a, b


def assert_pinned(*procs: Proc) -> None:
    """Linked in --peer-id mode: nothing to verify or pin was said."""
    for p in procs:
        assert "not verified" not in p.err, p.err
        assert "peer ID:" not in p.err, p.err


def test_forward_by_name_is_the_whole_command(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    id_a, id_b = ids(tmp_path)
    pa, pb = free_ports(2)
    # a's profile of b holds a -L; b's profile of a only says who and where.
    add(tmp_path, tmp_path / "conf-a", "b", id_b, "--ip", "127.0.0.1", "--port", str(pb))
    add(tmp_path, tmp_path / "conf-b", "a", id_a, "--ip", "127.0.0.1", "--port", str(pa))
    path_a = tmp_path / "conf-a" / "peers.toml"
    text = path_a.read_text() + f'lport = {pa}\nforward = ["-L", "0:127.0.0.1:{echo}"]\n'
    path_a.write_text(text)  # by hand, as docs/PEERS.md shows
    path_b = tmp_path / "conf-b" / "peers.toml"
    path_b.write_text(path_b.read_text() + f"lport = {pb}\n")
    a, b = start_forwards(procs, tmp_path, [], [])
    port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) -> peer 127\.0\.0\.1:" + str(echo))
    payload = os.urandom(1 << 20)
    assert echo_through(port, payload) == payload
    assert_pinned(a, b)
    stop(a, b)


def test_a_wrong_saved_id_is_refused(procs: Procs, tmp_path: Path) -> None:
    """The saved ID is enforced: a profile naming another ID fails authentication."""
    id_a, _ = ids(tmp_path)
    pa, pb = free_ports(2)
    add(tmp_path, tmp_path / "conf-a", "b", id_a, "--ip", "127.0.0.1", "--port", str(pb))
    add(tmp_path, tmp_path / "conf-b", "a", id_a, "--ip", "127.0.0.1", "--port", str(pa))
    a = procs.start(
        [
            "pipe",
            "--peer",
            "b",
            "--lport",
            str(pa),
            "--timeout",
            "10",
            "--config-dir",
            str(tmp_path / "conf-a"),
            "--identity",
            str(tmp_path / "a"),
        ],
        stdin=b"A",
    )
    b = procs.start(
        [
            "pipe",
            "--peer",
            "a",
            "--lport",
            str(pb),
            "--timeout",
            "10",
            "--config-dir",
            str(tmp_path / "conf-b"),
            "--identity",
            str(tmp_path / "b"),
        ],
        stdin=b"B",
    )
    assert a.wait(30) == 1
    assert "peer ID mismatch" in a.err, a.err
    b.wait(30)
    assert a.out == b""


def test_command_line_wins_over_the_profile(procs: Procs, tmp_path: Path) -> None:
    echo = start_server(procs, "echo")
    id_a, id_b = ids(tmp_path)
    pa, pb, wrong = free_ports(3)
    # Both profiles name a port nobody punches from, and a's holds a -L to a dead port.
    add(
        tmp_path,
        tmp_path / "conf-a",
        "b",
        id_b,
        "--ip",
        "127.0.0.1",
        "--port",
        str(wrong),
        "-L",
        "0:127.0.0.1:1",
    )
    add(tmp_path, tmp_path / "conf-b", "a", id_a, "--ip", "127.0.0.1", "--port", str(wrong))
    a, b = start_forwards(
        procs,
        tmp_path,
        ["--lport", str(pa), "--rport", str(pb), "-L", f"0:127.0.0.1:{echo}"],
        ["--lport", str(pb), "--rport", str(pa)],
    )
    port = forwarded_port(a, r"Forwarding 127\.0\.0\.1:(\d+) -> peer 127\.0\.0\.1:" + str(echo))
    assert echo_through(port, b"hello\n" * 1000) == b"hello\n" * 1000
    # The saved -L to port 1 was replaced, not added (read after the link carried data).
    assert a.out.decode().count("Forwarding") == 1, a.out
    assert not re.search(r"peer 127\.0\.0\.1:1$", a.out.decode(), re.M), a.out
    assert_pinned(a, b)
    stop(a, b)


def test_peer_ip_may_be_a_host_name(procs: Procs, tmp_path: Path) -> None:
    pa, pb = free_ports(2)
    a = procs.start(
        [
            "pipe",
            "--peer-ip",
            "localhost",
            "--lport",
            str(pa),
            "--rport",
            str(pb),
            "-v",
            "--identity",
            str(tmp_path / "a"),
        ],
        stdin=b"from a\n",
    )
    b = procs.start(
        [
            "pipe",
            "--peer-ip",
            "localhost",
            "--lport",
            str(pb),
            "--rport",
            str(pa),
            "--identity",
            str(tmp_path / "b"),
        ],
        stdin=b"from b\n",
    )
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    assert (a.out, b.out) == (b"from b\n", b"from a\n")
    assert "--peer-ip localhost resolves to 127.0.0.1" in a.err


def test_a_host_name_that_does_not_resolve_is_one_line(tmp_path: Path) -> None:
    result = run(["pipe", "--peer-ip", "no-such-host.invalid"], tmp_path)
    assert result.returncode == 2
    assert "'no-such-host.invalid', nor a host name that resolves" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_line_printed_after_a_code_pairing_saves_the_peer(procs: Procs, tmp_path: Path) -> None:
    id_a, id_b = ids(tmp_path)
    pa, pb = free_ports(2)
    code = "7-purple-sausages-quietly"
    a = procs.start(
        [
            "pipe",
            "--peer-ip",
            "127.0.0.1",
            "--lport",
            str(pa),
            "--rport",
            str(pb),
            "--code",
            code,
            "--identity",
            str(tmp_path / "a"),
        ],
        stdin=b"1",
    )
    b = procs.start(
        [
            "pipe",
            "--peer-ip",
            "localhost",
            "--lport",
            str(pb),
            "--rport",
            str(pa),
            "--code",
            code,
            "--identity",
            str(tmp_path / "b"),
        ],
        stdin=b"2",
    )
    assert a.wait(30) == 0, a.err
    assert b.wait(30) == 0, b.err
    lines = {}
    for name, p, peer_id in (("a", a, id_b), ("b", b, id_a)):
        # The existing line stays as it was.
        assert re.search(
            LOG_LINE + f"peer ID: {peer_id} \\(pin it next time with --peer-id {peer_id}\\)$",
            p.err,
            re.M,
        ), p.err
        match = re.search(r"then use --peer NAME: (tete-tunnel peers add .*)$", p.err, re.M)
        assert match, p.err
        lines[name] = match.group(1)
    assert (
        lines["a"] == f"tete-tunnel peers add NAME {id_b} --ip 127.0.0.1 --port {pb} --lport {pa}"
    )
    assert (
        lines["b"] == f"tete-tunnel peers add NAME {id_a} --ip localhost --port {pa} --lport {pb}"
    )
    # Run each line as printed (NAME filled in), then link by name alone.
    for name, other in (("a", "b"), ("b", "a")):
        argv = shlex.split(lines[name].replace("NAME", other))
        assert argv[:3] == ["tete-tunnel", "peers", "add"]
        add(tmp_path, tmp_path / f"conf-{name}", *argv[3:])
    a2 = procs.start(
        [
            "pipe",
            "--peer",
            "b",
            "--config-dir",
            str(tmp_path / "conf-a"),
            "--identity",
            str(tmp_path / "a"),
        ],
        stdin=b"again from a",
    )
    b2 = procs.start(
        [
            "pipe",
            "--peer",
            "a",
            "--config-dir",
            str(tmp_path / "conf-b"),
            "--identity",
            str(tmp_path / "b"),
        ],
        stdin=b"again from b",
    )
    assert a2.wait(30) == 0, a2.err
    assert b2.wait(30) == 0, b2.err
    assert (a2.out, b2.out) == (b"again from b", b"again from a")
    assert_pinned(a2, b2)


def test_whoami_asks_the_saved_relay(procs: Procs, tmp_path: Path) -> None:
    from tests.test_relay import start_relay

    relay = start_relay(procs)
    id_a, _ = ids(tmp_path)
    (port,) = free_ports(1)
    config = tmp_path / "conf"
    add(tmp_path, config, "r", id_a, "--via", relay.address, "--lport", str(port))
    add(tmp_path, config, "direct", id_a, "--ip", "127.0.0.1")
    who = procs.start(["whoami", "--peer", "r", "--config-dir", str(config)], name="who")
    assert who.wait(15) == 0, who.err
    assert who.out.decode().splitlines()[-1] == f"127.0.0.1:{port}"
    result = run(["whoami", "--peer", "direct", "--config-dir", str(config)], tmp_path)
    assert result.returncode == 2 and "has no via saved" in result.stderr


def test_a_host_name_is_looked_up_again_before_a_reconnect() -> None:
    """A dynamic-DNS peer that moved is punched at its new address on the next link."""
    import asyncio

    from tete_tunnel.connector import DirectConnector, LinkConfig

    stale = LinkConfig(peer_ip="127.0.0.2", peer_host="localhost", local_port=1, peer_port=2)
    connector = DirectConnector(stale, identity=None)  # type: ignore[arg-type]
    asyncio.run(connector._resolve_again())
    assert connector.config.peer_ip == "127.0.0.1"
    gone = LinkConfig(peer_ip="127.0.0.2", peer_host="no-such-host.invalid", peer_port=2)
    connector = DirectConnector(gone, identity=None)  # type: ignore[arg-type]
    asyncio.run(connector._resolve_again())  # a failed lookup keeps the last address
    assert connector.config.peer_ip == "127.0.0.2"


def test_ssh_proxycommand_pipe_peer_percent_h(procs: Procs, tmp_path: Path) -> None:
    """contrib/ssh_config.example's `ProxyCommand tete-tunnel pipe --peer %h` with a real
    sshd: ssh's %h (the Host, `friend`) names the saved peer; one login, `echo hello`."""
    import shutil
    import sys

    from tests.test_pipe_endings import (
        RECORDER,
        _end_recorded,
        _ssh_login,
        _until,
        _wait_listening,
    )

    tools = {name: shutil.which(name) for name in ("ssh", "ssh-keygen", "socat")}
    tools["sshd"] = "/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server socat)")
    if os.geteuid() != 0:
        pytest.skip("runs its own sshd and logs in as root: needs root")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    for key in ("hostkey", "client"):
        subprocess.run(
            [tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key)],
            check=True,
            timeout=30,
        )
    shutil.copy(keys / "client.pub", keys / "authorized_keys")
    (sshd_port,) = free_ports(1)
    (tmp_path / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{sshd_port}\nHostKey {keys / 'hostkey'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "PidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PrintMotd no\nPrintLastLog no\nUseDNS no\n"
    )
    sshd = procs.start(
        [], command=[tools["sshd"], "-D", "-e", "-f", str(tmp_path / "sshd_config")], name="sshd"
    )
    _wait_listening(sshd_port, sshd, 10)

    # Our identity is "a", the friend's "b"; each side saves the other under a name.
    id_a, id_b = ids(tmp_path)
    pa, pb = free_ports(2)
    ours, theirs = tmp_path / "conf-ours", tmp_path / "conf-friend"
    add(tmp_path, ours, "friend", id_b, "--ip", "127.0.0.1", "--port", str(pb), "--lport", str(pa))
    add(tmp_path, theirs, "us", id_a, "--ip", "127.0.0.1", "--port", str(pa), "--lport", str(pb))
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    pids = tmp_path / "recorded.pids"
    py = sys.executable
    ours_log, friend_log = tmp_path / "ours", tmp_path / "friend"
    friend_script = tmp_path / "friend.sh"
    friend_script.write_text(
        f"#!/bin/sh\nexec {py} {recorder} {friend_log}.rc {friend_log}.err {pids} "
        f"{py} -m tete_tunnel pipe --peer us --config-dir {theirs} --identity {tmp_path / 'b'}\n"
    )
    friend_script.chmod(0o755)
    env = env_without_config(tmp_path)
    try:
        socat = procs.start(
            [f"TCP:127.0.0.1:{sshd_port}", f"EXEC:{friend_script}"],
            command=[tools["socat"]],
            env=env,
            name="socat",
        )
        proxy = (
            f"{py} {recorder} {ours_log}.rc {ours_log}.err {pids} {py} -m tete_tunnel "
            f"pipe --peer %h --config-dir {ours} --identity {tmp_path / 'a'}"
        )
        ssh = _ssh_login(procs, tools["ssh"], keys, env, proxy, "ssh")
        assert ssh.wait(60) == 0, ssh.err
        assert ssh.out == b"hello\n"
        assert socat.wait(30) == 0, socat.err
        _until(lambda: Path(f"{ours_log}.rc").exists(), 20, "our pipe's exit")
        our_err = Path(f"{ours_log}.err").read_text(errors="replace")
        assert Path(f"{ours_log}.rc").read_text() == "0", our_err
        assert "Connected to peer!" in our_err and "peer ID:" not in our_err, our_err
    finally:
        _end_recorded(pids, str(recorder))
