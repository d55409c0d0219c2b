"""Each README recipe that can run on one machine is exercised by a test.

The two peers' commands run side by side on this machine: loopback addresses for the public
ones, free ports for 40000/40001/2222/8080/3000, a temporary identity directory per peer,
and a local server that stands in for sshd or the friend's app.

===================================================  ==========================================
README recipe (section heading)                      test that runs it
===================================================  ==========================================
Quick start: ``tete-tunnel demo``                    test_forward.py::
                                                     test_demo_exits_0_and_reports_fetch_and_pipe
Quick start: the ``tete-tunnel`` console script      test_cli.py::
                                                     test_python_dash_m_and_console_script_agree
Reach a friend's ssh: both ``--peer-id``,            test_readme.py::
``-L 2222:127.0.0.1:22``, the ``Forwarding`` line    test_reach_a_friends_ssh (banner server in
                                                     place of sshd)
Share a local web app: ``-R 8080:127.0.0.1:3000``    test_readme.py::
to ``python -m http.server``, ``-R 0`` line,         test_share_a_local_web_app
Ctrl-C ends both sides, ports free, exit 0
Share a local web app: refused remote listen /       test_forward.py::test_keep_going_survives_a_
``--keep-going``, a taken port names its holder      refused_remote_forward,
                                                     test_local_port_taken_exits_1_naming_the_holder
Browse through your friend's machine (SOCKS,         test_socks.py::test_curl_through_two_D_by_
``-D``): ``curl --socks5-hostname``, code 2 (97)     name_and_by_ip_next_to_L_and_R,
                                                     test_a_target_the_peers_policy_forbids_...
Security defaults: ``--allow-listen``                test_forward.py::test_non_loopback_listen_*
Pipe data to a friend: ``tar c | pipe`` /            test_pipe_endings.py::
``pipe | tar x`` (Bob at a prompt)                   test_readme_tar_recipe_typed_at_a_prompt
Pipe data to a friend: ssh ``ProxyCommand``          test_pipe_endings.py::
                                                     test_ssh_proxycommand_recipe_three_logins
Who is on the other end?: ``tete-tunnel id``         test_identity.py::
                                                     test_id_created_in_xdg_config_home_...
Who is on the other end?: ``--peer-id`` and         test_mitm.py::test_pinned_and_coded_pipes_
``--code`` pairing (prints the peer's ID)            connect_and_code_mode_prints_peer_id
Who is on the other end?: safety code question       test_prompt.py::
                                                     test_yes_serves_and_a_pinned_peer_shows_...
Named peers (``--peer NAME``): ``peers add``,        test_peers.py::
``forward --peer alice``, the printed add line       test_forward_by_name_is_the_whole_command,
                                                     test_the_line_printed_after_a_code_pairing_...
Options shared...: single-dash spellings             test_pipe_loopback.py::
(``pipe -myip ... -peerip ... -k -v``)               test_seed_command_line_still_works
At a terminal, and in pipelines: ``forward -f        test_feedback.py::
--pid-file ...``, ``kill "$(cat tunnel.pid)"``       test_forward_f_goes_to_the_background_...
When punching fails: ``netcheck --via RELAY``        test_netcheck.py::test_loopback_report_lines
Meet at a relay: generated code, then ``--code``     test_relay.py::test_a_generated_code
Meet at a relay: ``--code 42-correct-horse``         test_relay.py::
                                                     test_pipe_via_a_relay_with_a_code
Meet at a relay: several relays                      test_relay.py::
                                                     test_two_relays_the_first_one_down
Meet at a relay: ``whoami --via``                    test_relay.py::test_whoami
Meet at a relay: ``netcheck --via``                  test_netcheck.py::test_loopback_report_lines
Development: ``ruff check .``, ``pytest -n 3``       the suite itself (not a test)
Benchmarks                                           figures, not tests (not run here)
===================================================  ==========================================
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers import SERVERS, TOOL, Proc, Procs, env_without_config, free_ports, wait_for_text

BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"  # what tests/servers.py's banner server writes first


def _id_of(identity: Path, tmp: Path) -> str:
    """`tete-tunnel id` for this identity directory: the ID the other side pins."""
    result = subprocess.run(
        [*TOOL, "id", "--identity", str(identity)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env_without_config(tmp),
    )
    assert result.returncode == 0, result.stderr
    ident = result.stdout.strip()
    assert re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){12}", ident), result.stdout
    return ident


def _end_cleanly(*procs: Proc) -> None:
    """Ctrl-C on each side: the README promises exit 0 and no traceback."""
    for p in procs:
        if p.popen.poll() is None:
            p.signal(signal.SIGINT)
    for p in procs:
        assert p.wait(15) == 0, p.err
        assert "Traceback" not in p.err, p.err


def _wait_listening(port: int, server: Proc, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if server.popen.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"server did not listen on {port}:\n{server.err}") from None
            time.sleep(0.05)


def test_reach_a_friends_ssh(procs: Procs, tmp_path: Path) -> None:
    """Both sides pin the other's ID; you forward local port 2222 to the friend's sshd."""
    server = procs.start(["banner", "0"], command=SERVERS, name="sshd-standin")
    sshd = int(wait_for_text(server.out_path, "ready", 15).split()[1])
    you_port, friend_port, local_2222 = free_ports(3)
    you_dir, friend_dir = tmp_path / "you", tmp_path / "friend"
    your_id, their_id = _id_of(you_dir, tmp_path), _id_of(friend_dir, tmp_path)
    assert your_id != their_id

    # Your friend only serves your requests:
    friend = procs.start(
        ["forward", "--peer-ip", "127.0.0.1", "--lport", str(friend_port),
         "--rport", str(you_port), "--peer-id", your_id, "--identity", str(friend_dir)],
        name="friend",
    )  # fmt: skip
    # You forward local port 2222 to their sshd:
    you = procs.start(
        ["forward", "--peer-ip", "127.0.0.1", "--lport", str(you_port),
         "--rport", str(friend_port), "--peer-id", their_id, "--identity", str(you_dir),
         "-L", f"{local_2222}:127.0.0.1:{sshd}"],
        name="you",
    )  # fmt: skip
    line = f"Forwarding 127.0.0.1:{local_2222} -> peer 127.0.0.1:{sshd}"
    assert line in wait_for_text(you.out_path, line, 20).splitlines()
    wait_for_text(friend.err_path, "Connected to peer!", 20)

    # `ssh -p 2222 localhost`: the client meets the friend's sshd, twice in a row.
    for _ in range(2):
        with socket.create_connection(("localhost", local_2222), timeout=10) as client:
            client.settimeout(10)
            got = b""
            while not got.endswith(b"\r\n"):
                chunk = client.recv(100)
                assert chunk, got
                got += chunk
            assert got == BANNER
            client.sendall(b"not ssh\r\n")  # the server answers, then closes: both ways work
            rest = b""
            while chunk := client.recv(100):
                rest += chunk
            assert rest == b"Invalid SSH identification string.\r\n"
    # The pins held: no unverified-link warning on either side.
    for p in (you, friend):
        assert "the peer is verified by its ID" in p.err, p.err
        assert "not verified" not in p.err, p.err
    _end_cleanly(you, friend)


def test_share_a_local_web_app(procs: Procs, tmp_path: Path) -> None:
    """Your app on 127.0.0.1:3000 opens as your friend's http://localhost:8080; -R 0 too."""
    site = tmp_path / "site"
    site.mkdir()
    page = os.urandom(300_000)
    (site / "page.bin").write_bytes(page)
    you_port, friend_port, app_port, port_8080 = free_ports(4)
    app = procs.start(
        ["-m", "http.server", str(app_port), "--bind", "127.0.0.1", "--directory", str(site)],
        command=[sys.executable],
        name="app",
    )
    _wait_listening(app_port, app, 15)

    friend = procs.start(
        ["forward", "--peer-ip", "127.0.0.1", "--lport", str(friend_port),
         "--rport", str(you_port), "--identity", str(tmp_path / "friend")],
        name="friend",
    )  # fmt: skip
    you = procs.start(
        ["forward", "--peer-ip", "127.0.0.1", "--lport", str(you_port),
         "--rport", str(friend_port), "--identity", str(tmp_path / "you"),
         "-R", f"{port_8080}:127.0.0.1:{app_port}", "-R", f"0:127.0.0.1:{app_port}"],
        name="you",
    )  # fmt: skip
    fixed = f"Forwarding peer 127.0.0.1:{port_8080} -> 127.0.0.1:{app_port}"
    out = wait_for_text(you.out_path, "Forwarding peer", 20, count=2)
    assert fixed in out.splitlines(), out
    picked = re.findall(
        rf"^Forwarding peer 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:{app_port}$", out, re.M
    )
    assert len(picked) == 2, out
    port_0 = next(int(p) for p in picked if int(p) != port_8080)
    assert port_0 != 0
    wait_for_text(friend.err_path, "Connected to peer!", 20)

    # The friend opens http://localhost:8080 (and the port -R 0 picked): your app's bytes.
    for port in (port_8080, port_0):
        with urllib.request.urlopen(f"http://localhost:{port}/page.bin", timeout=20) as r:
            assert r.status == 200
            assert r.read() == page
    with urllib.request.urlopen(f"http://localhost:{port_8080}/", timeout=20) as r:
        assert b"page.bin" in r.read()  # the directory listing of your app

    # Ctrl-C ends both sides cleanly: listeners closed, ports free, exit 0.
    _end_cleanly(you, friend)
    for port in (port_8080, port_0):
        socket.create_server(("127.0.0.1", port)).close()
