"""The command line: parse, build a config, call the library, map errors to exit codes.

This is the one error boundary: a TeteError becomes one line on stderr and exit 1 (2 for
usage errors); anything else is a bug, shown as one line too, with the traceback at -vv.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import subprocess
import sys
import termios
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main

import tete_tunnel
from tete_tunnel import __version__, eventloop, peers, status
from tete_tunnel import log as logmod
from tete_tunnel import rendezvous as rv
from tete_tunnel.connector import DEFAULT_PORT, DEFAULT_TIMEOUT, DirectConnector, LinkConfig
from tete_tunnel.errors import TeteError, UsageError
from tete_tunnel.forward import DEFAULT_MAX_CONNECTIONS
from tete_tunnel.identity import load_or_create, parse_id
from tete_tunnel.log import log, setup_logging
from tete_tunnel.malloc import tune_malloc
from tete_tunnel.net import endpoint, family_of, resolve_peer_host
from tete_tunnel.relay import RelayLimits, run_relay
from tete_tunnel.rendezvous import DEFAULT_RELAY_PORT
from tete_tunnel.secure import MIN_CODE_BITS, Auth, Mode, SecureLink, code_strength
from tete_tunnel.session import Keepalive
from tete_tunnel.supervisor import App, supervise
from tete_tunnel.text import safe_lines
from tete_tunnel.via import RelayConnector, ViaConfig, whoami

app = typer.Typer(
    name="tete-tunnel",
    help="A private, authenticated TCP tunnel between two peers, through their NATs.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CONN = "Connection"
AUTH = "Authentication"

# Shared by every command that makes a link; the single-dash spellings are the seed tool's.
PeerIp = Annotated[
    str | None,
    typer.Option(
        "--peer-ip",
        "-peerip",
        help="The peer's public IP address or host name (dynamic DNS: looked up at start "
        "and before each reconnect; not needed with --via).",
        rich_help_panel=CONN,
    ),
]
Via = Annotated[
    str | None,
    typer.Option(
        "--via",
        metavar="RELAY[,RELAY...]",
        help="Meet the peer at a relay (HOST[:PORT], default port "
        f"{DEFAULT_RELAY_PORT}): no addresses to type; direct when the NATs allow it, "
        "through the relay when not. Without --code or --peer-id, makes up a code for "
        "the peer to type.",
        rich_help_panel=CONN,
    ),
]
MyIp = Annotated[
    str | None,
    typer.Option(
        "--my-ip",
        "-myip",
        help="Our public IP (optional; only checked for sanity, roles do not depend on it).",
        rich_help_panel=CONN,
    ),
]
LPort = Annotated[
    int | None,
    typer.Option(
        "--lport",
        "-lport",
        help=f"Our local port to punch from (default {DEFAULT_PORT}).",
        rich_help_panel=CONN,
    ),
]
RPort = Annotated[
    int | None,
    typer.Option(
        "--rport",
        "-rport",
        help=f"The peer's public port (default {DEFAULT_PORT}).",
        rich_help_panel=CONN,
    ),
]
PeerName = Annotated[
    str | None,
    typer.Option(
        "--peer",
        metavar="NAME",
        help="A peer saved with `tete-tunnel peers add`: its ID, address, and for forward "
        "its forwards and options. Options given here win (any -L/-R here replace the "
        "saved forwards).",
        rich_help_panel=CONN,
    ),
]
ConfigDir = Annotated[
    Path | None,
    typer.Option(
        "--config-dir",
        help=f"Directory of {peers.PEERS_FILE} (default ${peers.CONFIG_DIR_ENV}, else "
        "$XDG_CONFIG_HOME/tete-tunnel).",
        rich_help_panel=AUTH,
    ),
]
PeerId = Annotated[
    str | None,
    typer.Option(
        "--peer-id",
        help="Accept only the peer with this ID (what `tete-tunnel id` prints there).",
        rich_help_panel=AUTH,
    ),
]
Code = Annotated[
    str | None,
    typer.Option(
        "--code",
        help="A short secret both sides type; proves the peer and prints its ID to pin.",
        rich_help_panel=AUTH,
    ),
]
IdentityDir = Annotated[
    str | None,  # a str, not a Path: Path("") is the current directory, and '' is refused
    typer.Option(
        "--identity",
        help="Directory of our identity (default $XDG_CONFIG_HOME/tete-tunnel).",
        rich_help_panel=AUTH,
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        "--timeout", help="Seconds to keep punching before giving up.", rich_help_panel=CONN
    ),
]
KEEPALIVE = Keepalive()
KeepaliveFlag = Annotated[
    bool,
    typer.Option(
        "-k",
        "--keepalive",
        help=f"Detect a dead peer or a dropped NAT mapping: a ping every "
        f"{KEEPALIVE.interval:g} s, dead after {KEEPALIVE.timeout:g} s without an answer "
        "(plus TCP keepalive and TCP_USER_TIMEOUT to match). On by default for forward.",
        rich_help_panel=CONN,
    ),
]
KeepaliveInterval = Annotated[
    float | None,
    typer.Option(
        "--keepalive-interval",
        metavar="SECONDS",
        help=f"Seconds between pings (default {KEEPALIVE.interval:g}; 0: no pings). "
        "Turns keepalive on.",
        rich_help_panel=CONN,
    ),
]
KeepaliveTimeout = Annotated[
    float | None,
    typer.Option(
        "--keepalive-timeout",
        metavar="SECONDS",
        help=f"A peer that answers no ping for this long is dead (default "
        f"{KEEPALIVE.timeout:g}). Turns keepalive on.",
        rich_help_panel=CONN,
    ),
]
Verbose = Annotated[
    int,
    typer.Option(
        "-v",
        "--verbose",
        count=True,
        metavar="",
        show_default=False,
        help="More detail on stderr; -vv for debugging (a counter: -v, -vv).",
    ),
]
Quiet = Annotated[
    bool,
    typer.Option("-q", "--quiet", help="Print nothing on stderr but errors."),
]
# The end of every command's --help.
EXIT_CODES = "Exit codes: 0 ok, 1 failure, 2 usage error."
READY_FD_ENV = "TETE_TUNNEL_READY_FD"  # forward -f: the daemon writes "ready" there


def _epilog(*examples: str) -> str:
    """An Examples section (one paragraph per line, so none is run into the next)."""
    lines = "\n\n".join(f"  {e}" for e in examples)
    return f"Examples:\n\n{lines}\n\n{EXIT_CODES}"


def _link_config(
    peer_ip: str | None,
    my_ip: str | None,
    lport: int,
    rport: int,
    peer_id: str | None,
    code: str | None,
    identity: str | None,
    timeout: float,
    keepalive: Keepalive | None,
    via: str | None = None,
) -> LinkConfig | ViaConfig:
    identity_dir = _identity_dir(identity)
    if not 0 < timeout < math.inf:  # NaN fails `0 < timeout` too
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    if via is not None and peer_ip is not None:
        raise UsageError("--via finds the peer's address itself: leave out --peer-ip")
    if via is None and peer_ip is None:
        raise UsageError("give the peer's public address with --peer-ip, or a relay with --via")
    if peer_id is not None and code is not None:
        raise UsageError("use either --peer-id or --code, not both")
    if code is not None and not code.strip():
        raise UsageError("--code must not be empty")
    if code is not None and code_strength(code.strip()) < MIN_CODE_BITS:
        log.warning(
            "WARNING: --code %r is short: someone who can reach your port gets one guess per "
            "run, and a code this short may fall to it; use a longer one, e.g. a number and "
            "two words like 7-purple-sausages",
            code.strip(),
        )
    auth = Auth(
        peer_fingerprint=parse_id(peer_id) if peer_id is not None else None,
        code=code.strip() if code is not None else None,
    )
    if via is not None:
        via_config = ViaConfig(
            relays=tuple(rv.parse_relays(via)),
            local_port=lport,
            auth=auth,
            identity_dir=identity_dir,
            timeout=timeout,
            keepalive=keepalive,
        )
        via_config.check()
        return via_config
    assert peer_ip is not None
    host = peer_ip.strip("[]")
    resolved = resolve_peer_host(host, family_of(my_ip.strip("[]")) if my_ip else None)
    if resolved != host:
        log.info("--peer-ip %s resolves to %s", host, resolved)
    config = LinkConfig(
        peer_ip=resolved,
        peer_host=host if resolved != host else None,
        local_port=lport,
        peer_port=rport,
        my_ip=my_ip.strip("[]") if my_ip else None,
        auth=auth,
        identity_dir=identity_dir,
        timeout=timeout,
        keepalive=keepalive,
    )
    config.check()
    return config


@dataclasses.dataclass
class _LinkOptions:
    """The link options as typed; a profile fills in what was not."""

    peer_ip: str | None
    via: str | None
    lport: int | None
    rport: int | None
    peer_id: str | None
    code: str | None
    keepalive: bool
    keepalive_interval: float | None
    keepalive_timeout: float | None

    def fill(self, profile: peers.Profile | None) -> None:
        """Command-line values win; the profile gives the rest; then the defaults."""
        if profile is not None:
            if self.code is not None:
                raise UsageError(
                    f"--peer {profile.name} pins the saved ID: leave out --code (it is for "
                    "a first meeting)"
                )
            if self.peer_id is None:
                self.peer_id = profile.id
            if self.peer_ip is None and self.via is None:  # where to meet is one choice
                self.peer_ip, self.via = profile.ip, profile.via
            if self.peer_ip is None and self.via is None:
                raise UsageError(
                    f"peer {profile.name!r} has no ip or via saved in "
                    f"{profile.path}: give --peer-ip or --via"
                )
            if self.rport is None:
                self.rport = profile.port
            if self.lport is None:
                self.lport = profile.lport
            self.keepalive = self.keepalive or bool(profile.keepalive)
            if self.keepalive_interval is None:
                self.keepalive_interval = profile.keepalive_interval
            if self.keepalive_timeout is None:
                self.keepalive_timeout = profile.keepalive_timeout
        if self.lport is None:
            self.lport = DEFAULT_PORT
        if self.rport is None:
            self.rport = DEFAULT_PORT


def _load_profile(name: str | None, config_dir: Path | None) -> peers.Profile | None:
    if name is None:
        return None
    return peers.lookup(peers.check_name(name), config_dir)


def _identity_dir(text: str | None) -> Path | None:
    """--identity as a directory; '' is refused (it would be the current directory)."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError("--identity must name a directory, not ''")
    return Path(text)


def _keepalive(
    default_on: bool, flag: bool, interval: float | None, timeout: float | None
) -> Keepalive | None:
    """-k, or either option, turns keepalive on with the defaults for what is not given."""
    if interval == 0:
        return None
    if not (default_on or flag or interval is not None or timeout is not None):
        return None
    return Keepalive(
        interval=KEEPALIVE.interval if interval is None else interval,
        timeout=KEEPALIVE.timeout if timeout is None else timeout,
    )


def _linked(
    config: LinkConfig | ViaConfig,
    app: App,
    command: str,
    confirm: Callable[[SecureLink], Awaitable[bool]] | None = None,
    summary: bool = False,
) -> Coroutine[Any, Any, None]:
    """The work of a command that links to the peer: identity first, then the supervisor.
    `summary`: a summary line on stderr at the end (once a link was made)."""
    identity = load_or_create(config.identity_dir)  # a bad identity fails before the network
    log.info("our ID: %s", identity.id)
    connector: DirectConnector | RelayConnector
    if isinstance(config, ViaConfig):
        config = dataclasses.replace(config, peer_command=f"tete-tunnel {command}")
        connector = RelayConnector(config, identity, keep_control=command == "forward")
    else:
        connector = DirectConnector(config, identity)

    async def work() -> None:
        try:
            ending = await supervise(
                connector, app, timeout=config.timeout, keepalive=config.keepalive, confirm=confirm
            )
            logmod.event(ending.value)
        finally:
            if summary:
                line = _summary(app, asyncio.get_running_loop().time())
                if line is not None:
                    log.warning("%s", line)

    return work()


MAX_ANSWER = 1024  # bytes of an answer to the safety-code question


async def _confirm_on_terminal(link: SecureLink) -> bool:
    """ssh's host-key question, for an unverified link: the safety code, y or N (EOF: N).
    Typed-ahead input is discarded first: only an answer given after the question counts."""
    if link.mode is not Mode.UNVERIFIED:
        return True
    fd = sys.stdin.fileno()
    with contextlib.suppress(termios.error):
        termios.tcflush(fd, termios.TCIFLUSH)
    print(
        f"Does the peer see the same safety code {link.safety_code}? [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()
    line = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(fd, MAX_ANSWER)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        line.extend(chunk)
        if (not chunk or b"\n" in line or len(line) >= MAX_ANSWER) and not answered.done():
            answered.set_result(bytes(line))

    loop.add_reader(fd, readable)
    try:
        answer = await answered
    finally:
        loop.remove_reader(fd)
    if not answer.endswith(b"\n"):
        print(file=sys.stderr)  # EOF: end the question's line
    return answer.decode(errors="replace").strip().lower() in ("y", "yes")


def _summary(app: App, now: float) -> str | None:
    """`summary: 12.3 s, sent 10.0 MiB (10485760 B), received 12 B, 1 stream, direct`;
    None before any link."""
    started = getattr(app, "started_at", None)
    if started is None:
        return None

    def amount(n: int) -> str:
        return status.size(n) + (f" ({n} B)" if n >= 1024 else "")

    sent, received, streams = (getattr(app, k) for k in ("sent", "received", "streams"))
    return (
        f"summary: {status.seconds(now - started)}, sent {amount(sent)}, received "
        f"{amount(received)}, {streams} stream{'' if streams == 1 else 's'}, {app.path}"  # type: ignore[attr-defined]
    )


def _run(
    verbose: int,
    work: Callable[[], Coroutine[Any, Any, None] | None],
    quiet: bool = False,
    command: str = "",
) -> None:
    """Run a command's work inside the error boundary and exit with its code."""
    if quiet and verbose:
        raise typer.BadParameter("-q and -v contradict each other", param_hint="-q")
    setup_logging(-1 if quiet else verbose)
    status.enable(status.stderr_is_terminal() and not quiet)
    tune_malloc()
    try:
        coro = work()
        if coro is not None:
            eventloop.run(coro)
    except TeteError as exc:
        if verbose >= 2:
            print(safe_lines(traceback.format_exc()), end="", file=sys.stderr)
        log.error("error: %s", exc)
        if isinstance(exc, UsageError):
            _help_hint(f"tete-tunnel {command}".strip())
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(1) from None
    except Exception as exc:
        if verbose >= 2:
            print(safe_lines(traceback.format_exc()), end="", file=sys.stderr)
        log.error("internal error (a bug; run with -vv for details): %r", exc)
        raise typer.Exit(1) from None


def _help_hint(command_path: str) -> None:
    print(f"Try '{command_path} --help' for help.", file=sys.stderr)


@app.command("id", epilog=_epilog("tete-tunnel id", "tete-tunnel id --identity ~/.tete-work"))
def id_command(identity: IdentityDir = None, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Print our ID (creating our identity on first use). The peer pins it with --peer-id."""

    def work() -> None:
        ident = load_or_create(_identity_dir(identity))
        logging.getLogger("tete_tunnel").info("identity file: %s", ident.path)
        print(ident.id)

    _run(verbose, work, quiet, "id")


@app.command(
    "pipe",
    epilog=_epilog(
        "tar c mydir | tete-tunnel pipe --via relay.example.org       (prints a code to tell)",
        "tete-tunnel pipe --via relay.example.org --code 7-purple-sausages | tar x",
        "tete-tunnel pipe --peer-ip 203.0.113.7 --peer-id ID < file.iso",
        "ssh -o ProxyCommand='tete-tunnel pipe -q --peer-ip 203.0.113.7 --peer-id ID' host",
    ),
)
def pipe_command(
    peer_ip: PeerIp = None,
    via: Via = None,
    my_ip: MyIp = None,
    lport: LPort = None,
    rport: RPort = None,
    peer: PeerName = None,
    peer_id: PeerId = None,
    code: Code = None,
    identity: IdentityDir = None,
    config_dir: ConfigDir = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    keepalive: KeepaliveFlag = False,
    keepalive_interval: KeepaliveInterval = None,
    keepalive_timeout: KeepaliveTimeout = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Bytes each way, rates and time on stderr, updated in place, like pv "
            "(default: on when stderr is a terminal and stdout is not).",
            show_default=False,
        ),
    ] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Send stdin to the peer and write the peer's bytes to stdout.

    Works in pipelines (tar c dir | tete-tunnel pipe ...) and as an ssh ProxyCommand.
    Exits 0 only when both directions ended in order and the peer confirmed it took all of
    our data; a transfer cut short on either side exits 1 on both. At the end, a summary
    line on stderr when it is a terminal, or with -v.
    """
    from tete_tunnel.pipe import PipeApp

    def work() -> Coroutine[Any, Any, None]:
        o = _LinkOptions(
            peer_ip,
            via,
            lport,
            rport,
            peer_id,
            code,
            keepalive,
            keepalive_interval,
            keepalive_timeout,
        )
        o.fill(_load_profile(peer, config_dir))
        assert o.lport is not None and o.rport is not None
        alive = _keepalive(False, o.keepalive, o.keepalive_interval, o.keepalive_timeout)
        config = _link_config(
            o.peer_ip, my_ip, o.lport, o.rport, o.peer_id, o.code, identity, timeout, alive, o.via
        )
        terminal = status.stderr_is_terminal()
        show = (terminal and not _isatty(1)) if progress is None else progress
        if show and not quiet:
            status.enable(True)  # --progress forces the status line, even into a file
        app = PipeApp(progress=show and not quiet)
        return _linked(config, app, "pipe", summary=(terminal or verbose > 0) and not quiet)

    _run(verbose, work, quiet, "pipe")


@app.command(
    "forward",
    epilog=_epilog(
        "tete-tunnel forward --via relay.example.org -L 8080:localhost:80   (prints a code)",
        "tete-tunnel forward --via relay.example.org --code 7-purple-sausages",
        "tete-tunnel forward --peer-ip 203.0.113.7 --peer-id ID -R 2222:localhost:22",
        "tete-tunnel forward -f --pid-file tunnel.pid --peer-ip 203.0.113.7 --peer-id ID "
        "-L 5432:db.internal:5432",
    ),
)
def forward_command(
    peer_ip: PeerIp = None,
    via: Via = None,
    local: Annotated[
        list[str] | None,
        typer.Option(
            "-L",
            "--local",
            metavar="[BIND:]PORT:HOST:HOSTPORT",
            help="Listen here on BIND:PORT (default bind 127.0.0.1); each connection goes "
            "to HOST:HOSTPORT as seen from the peer. Repeatable.",
            rich_help_panel="Forwards",
        ),
    ] = None,
    remote: Annotated[
        list[str] | None,
        typer.Option(
            "-R",
            "--remote",
            metavar="[BIND:]PORT:HOST:HOSTPORT",
            help="Ask the peer to listen on its BIND:PORT (default its 127.0.0.1; port 0: it "
            "picks one); each connection comes to HOST:HOSTPORT as seen from here. Repeatable.",
            rich_help_panel="Forwards",
        ),
    ] = None,
    dynamic: Annotated[
        list[str] | None,
        typer.Option(
            "-D",
            "--dynamic",
            metavar="[BIND:]PORT",
            help="A SOCKS5 (and 4a) proxy here on BIND:PORT (default bind 127.0.0.1); each "
            "connection goes to the host:port its client asks for, as seen from the peer "
            "(the peer resolves names and checks its access policy). Repeatable.",
            rich_help_panel="Forwards",
        ),
    ] = None,
    allow_open: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-open",
            metavar="HOST:PORT",
            help="Let the peer make us connect there too (default: loopback only). "
            "HOST:*, *:PORT and 'any' work. Repeatable.",
            rich_help_panel="Access policy",
        ),
    ] = None,
    allow_listen: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-listen",
            metavar="HOST:PORT",
            help="Let the peer make us listen there too (default: loopback only). Repeatable.",
            rich_help_panel="Access policy",
        ),
    ] = None,
    keep_going: Annotated[
        bool,
        typer.Option(
            "--keep-going",
            help="Go on when a forward cannot be set up (default: exit 1, like ssh's "
            "ExitOnForwardFailure).",
            rich_help_panel="Forwards",
        ),
    ] = False,
    no_reconnect: Annotated[
        bool,
        typer.Option(
            "--no-reconnect",
            help="Exit 1 when the link to the peer is lost (default: keep the -L ports "
            "open and punch again until the peer is back).",
            rich_help_panel=CONN,
        ),
    ] = False,
    max_connections: Annotated[
        int | None,
        typer.Option(
            "--max-connections",
            metavar="N",
            help="Client connections at once per listener; more are reset with a log line "
            f"(default {DEFAULT_MAX_CONNECTIONS}).",
            rich_help_panel="Forwards",
        ),
    ] = None,
    background: Annotated[
        bool,
        typer.Option(
            "-f",
            "--background",
            help="Go to the background once the link is up and every forward is set up "
            "(like ssh -f); stderr stays where it was.",
        ),
    ] = False,
    pid_file: Annotated[
        Path | None,
        typer.Option(
            "--pid-file",
            metavar="FILE",
            help="Write our process ID there once every forward is set up (with -f: the "
            "background process's).",
        ),
    ] = None,
    my_ip: MyIp = None,
    lport: LPort = None,
    rport: RPort = None,
    peer: PeerName = None,
    peer_id: PeerId = None,
    code: Code = None,
    identity: IdentityDir = None,
    config_dir: ConfigDir = None,
    timeout: Timeout = DEFAULT_TIMEOUT,
    keepalive: KeepaliveFlag = False,
    keepalive_interval: KeepaliveInterval = None,
    keepalive_timeout: KeepaliveTimeout = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Forward TCP ports ssh-style: -L here to there, -R there to here, -D a SOCKS proxy.

    With no -L, -R or -D, only serves the peer's requests (within the access policy). Stays up
    when the link is lost: -L and -D ports stay open and the link is made again (the same peer ID
    is required); Ctrl-C on either side ends both. With -v, a summary line at exit.
    """
    from tete_tunnel.forward import Forwarder, parse_dynamic, parse_spec
    from tete_tunnel.policy import Policy, parse_pattern

    if background:
        setup_logging(-1 if quiet else verbose)
        _background(sys.argv[1:])  # returns only by exiting
    ready_fd = os.environ.pop(READY_FD_ENV, None)

    def work() -> Coroutine[Any, Any, None]:
        profile = _load_profile(peer, config_dir)
        o = _LinkOptions(
            peer_ip,
            via,
            lport,
            rport,
            peer_id,
            code,
            keepalive,
            keepalive_interval,
            keepalive_timeout,
        )
        o.fill(profile)
        assert o.lport is not None and o.rport is not None
        forwards_l, forwards_r, forwards_d = local or [], remote or [], dynamic or []
        opens, listens = allow_open or [], allow_listen or []
        going, most = keep_going, max_connections
        if profile is not None:
            if not (forwards_l or forwards_r or forwards_d):  # any given here replace the saved
                forwards_l, forwards_r = profile.forwards("-L"), profile.forwards("-R")
                forwards_d = profile.forwards("-D")
            opens = opens or list(profile.allow_open)
            listens = listens or list(profile.allow_listen)
            going = going or bool(profile.keep_going)
            most = most if most is not None else profile.max_connections
        most = most if most is not None else DEFAULT_MAX_CONNECTIONS
        if most < 1:
            raise UsageError("--max-connections must be at least 1")
        forwarder = Forwarder(
            local=[parse_spec(t, "-L") for t in forwards_l],
            remote=[parse_spec(t, "-R") for t in forwards_r],
            dynamic=[parse_dynamic(t, "-D") for t in forwards_d],
            policy=Policy(
                allow_open=tuple(parse_pattern(t, "--allow-open") for t in opens),
                allow_listen=tuple(parse_pattern(t, "--allow-listen") for t in listens),
            ),
            keep_going=going,
            reconnect=not no_reconnect,
            max_connections=most,
            on_ready=_on_ready(pid_file, int(ready_fd) if ready_fd else None),
        )
        for option, specs in (("-L", forwarder.local), ("-R", forwarder.remote)):
            seen: dict[tuple[str, int], str] = {}
            for spec in specs:
                where = (spec.bind_host, spec.bind_port)
                if spec.bind_port != 0 and where in seen:
                    raise UsageError(
                        f"{option} {spec.text!r} is a duplicate: {option} {seen[where]!r} "
                        f"already listens on {endpoint(*where)}"
                    )
                seen[where] = spec.text
        alive = _keepalive(True, o.keepalive, o.keepalive_interval, o.keepalive_timeout)
        config = _link_config(
            o.peer_ip, my_ip, o.lport, o.rport, o.peer_id, o.code, identity, timeout, alive, o.via
        )
        # Like ssh's question about an unknown host key: on a terminal, an unverified link
        # is served only once its user confirms the safety code (pipe's stdin is its data).
        unverified = o.peer_id is None and o.code is None and o.via is None
        confirm = _confirm_on_terminal if unverified and sys.stdin.isatty() else None
        return _linked(config, forwarder, "forward", confirm, summary=verbose > 0 and not quiet)

    try:
        _run(verbose, work, quiet, "forward")
    finally:
        _remove_pid_file(pid_file)


def _remove_pid_file(pid_file: Path | None) -> None:
    """At exit, the pid file goes, if it still names us (not a later run's)."""
    if pid_file is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if int(pid_file.read_text()) == os.getpid():
            pid_file.unlink()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _on_ready(pid_file: Path | None, ready_fd: int | None) -> Callable[[], None] | None:
    """What `forward` does once every forward is set up: write the pid file, and in the
    background process of -f tell the waiting parent and let go of its stdout."""
    if pid_file is None and ready_fd is None:
        return None

    def ready() -> None:
        if pid_file is not None:
            try:
                pid_file.write_text(f"{os.getpid()}\n")
            except OSError as exc:
                raise TeteError(f"cannot write --pid-file {pid_file}: {exc.strerror}") from exc
        if ready_fd is not None:
            sys.stdout.flush()
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            status.enable(False)  # in the background: no line redrawn over the shell's
            # Whoever started us may wait for the end of our stdout: let go of it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    return ready


def _background(args: list[str]) -> None:
    """forward -f: run the same command, without -f, as a process in a session of its own;
    return once it says it is ready, or exit with its code if it ends before (its stderr is
    ours, so its error has been printed)."""
    args = [a for a in args if a not in ("-f", "--background")]
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env[READY_FD_ENV] = str(write_fd)
    # The same code as ours, whatever the current directory holds (-P: no cwd on sys.path).
    here = str(Path(tete_tunnel.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    try:
        child = subprocess.Popen(
            [sys.executable, "-P", "-m", "tete_tunnel", *args],
            stdin=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as said:
        try:
            answer = said.read()
        except KeyboardInterrupt:
            child.terminate()
            child.wait()
            raise
    if answer.startswith(b"ready"):
        log.info("in the background as process %d", child.pid)
        raise typer.Exit(0)
    raise typer.Exit(child.wait() or 1)


@app.command(
    "relay",
    epilog=_epilog("tete-tunnel relay", "tete-tunnel relay --listen 0.0.0.0:4001 -v"),
)
def relay_command(
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            metavar="[HOST:]PORT",
            help=f"Where to listen (default all addresses, port {DEFAULT_RELAY_PORT}).",
        ),
    ] = str(DEFAULT_RELAY_PORT),
    max_sessions: Annotated[
        int, typer.Option("--max-sessions", metavar="N", help="Relayed pairs at once.")
    ] = RelayLimits.max_sessions,
    idle_timeout: Annotated[
        float,
        typer.Option(
            "--idle-timeout",
            metavar="SECONDS",
            help="Cut a relayed pair that moves no byte for this long.",
        ),
    ] = RelayLimits.idle_timeout,
    max_session_bytes: Annotated[
        int,
        typer.Option(
            "--max-session-bytes",
            metavar="N",
            help="Cut a relayed pair after this many bytes (0: no limit).",
        ),
    ] = RelayLimits.max_session_bytes,
    upgrade_interval: Annotated[
        float,
        typer.Option(
            "--upgrade-interval",
            metavar="SECONDS",
            help="How often a relayed pair is told to try a direct path again.",
        ),
    ] = RelayLimits.upgrade_interval,
    second_port: Annotated[
        int | None,
        typer.Option(
            "--second-port",
            metavar="PORT",
            help="A second port that answers like the first, so `netcheck` can tell whether "
            "a NAT maps one local port to the same public port for two destinations "
            "(default: the --listen port + 1; 0: any free port).",
        ),
    ] = None,
    no_second_port: Annotated[
        bool, typer.Option("--no-second-port", help="Listen on one port only.")
    ] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Run a rendezvous and relay server for peers that use --via.

    It sees rendezvous names (a hash of two IDs, or a code's leading number), addresses and
    ciphertext, nothing else: authentication and TLS run end to end between the peers.
    """

    def work() -> Coroutine[Any, Any, None]:
        host, port = _host_port(listen, "--listen", "0.0.0.0")
        times = (idle_timeout, upgrade_interval)
        if max_sessions < 1 or max_session_bytes < 0 or not all(0 < t < math.inf for t in times):
            raise UsageError("relay limits must be positive numbers")  # NaN fails `0 < t` too
        limits = RelayLimits(
            max_sessions=max_sessions,
            idle_timeout=idle_timeout,
            max_session_bytes=max_session_bytes,
            upgrade_interval=upgrade_interval,
        )
        if second_port is not None and no_second_port:
            raise UsageError("use either --second-port or --no-second-port, not both")
        if second_port is not None and not 0 <= second_port <= 65535:
            raise UsageError(f"--second-port {second_port} is not a TCP port (0-65535)")
        if second_port is not None and second_port == port != 0:
            raise UsageError("--second-port must differ from the --listen port")
        second = second_port
        if second is None and not no_second_port and port < 65535:
            second = port + 1 if port else 0
        return run_relay(host, port, limits, second, second_default=second_port is None)

    _run(verbose, work, quiet, "relay")


@app.command(
    "whoami",
    epilog=_epilog("tete-tunnel whoami --via relay.example.org --lport 54312"),
)
def whoami_command(
    via: Annotated[
        str | None,
        typer.Option("--via", metavar="RELAY[,RELAY...]", help="The relay to ask."),
    ] = None,
    lport: LPort = None,
    peer: Annotated[
        str | None,
        typer.Option("--peer", metavar="NAME", help="Ask the relay saved for this peer."),
    ] = None,
    config_dir: ConfigDir = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Print our public address as a relay sees it (the port our NAT gives --lport).

    The last line of standard output is IP:PORT: tell it to a peer that uses --peer-ip and
    --rport.
    """

    def work() -> Coroutine[Any, Any, None]:
        relay, port = via, lport
        profile = _load_profile(peer, config_dir)
        if profile is not None:
            relay = relay or profile.via
            port = port if port is not None else profile.lport
            if relay is None:
                raise UsageError(f"peer {profile.name!r} has no via saved in {profile.path}")
        if relay is None:
            raise UsageError("give the relay to ask with --via (or --peer NAME)")
        port = port if port is not None else DEFAULT_PORT
        relays = tuple(rv.parse_relays(relay))
        if not 1 <= port <= 65535:
            raise UsageError(f"--lport {port} is not a TCP port (1-65535)")
        local_port: int = port

        async def ask() -> None:
            print(await whoami(relays, local_port), flush=True)

        return ask()

    _run(verbose, work, quiet, "whoami")


peers_app = typer.Typer(
    name="peers",
    help=f"Named peers, kept in {peers.PEERS_FILE} (docs/PEERS.md): then --peer NAME.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(peers_app)


@peers_app.command(
    "add",
    epilog=_epilog(
        "tete-tunnel peers add alice JWAV-DIXD-... --ip alice.example.org --port 40001",
        "tete-tunnel peers add bob 7Q2M-... --via relay.example.org -L 2222:127.0.0.1:22",
    ),
)
def peers_add_command(
    name: Annotated[str, typer.Argument(help="The name to use with --peer.")],
    peer_id: Annotated[str, typer.Argument(metavar="ID", help="The peer's ID.")],
    ip: Annotated[
        str | None,
        typer.Option("--ip", metavar="IP|HOST", help="Its public address (--peer-ip)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", metavar="N", help="Its public port (--rport).")
    ] = None,
    lport: Annotated[
        int | None, typer.Option("--lport", metavar="N", help="Our port to punch from.")
    ] = None,
    via: Annotated[
        str | None, typer.Option("--via", metavar="RELAY[,RELAY...]", help="Meet at a relay.")
    ] = None,
    local: Annotated[
        list[str] | None,
        typer.Option("-L", "--local", metavar="SPEC", help="A -L for forward. Repeatable."),
    ] = None,
    remote: Annotated[
        list[str] | None,
        typer.Option("-R", "--remote", metavar="SPEC", help="A -R for forward. Repeatable."),
    ] = None,
    dynamic: Annotated[
        list[str] | None,
        typer.Option("-D", "--dynamic", metavar="SPEC", help="A -D for forward. Repeatable."),
    ] = None,
    keepalive: Annotated[
        bool, typer.Option("-k", "--keepalive", help="Keepalive on (pipe too).")
    ] = False,
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite a peer of the same name.")
    ] = False,
    config_dir: ConfigDir = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Save a peer under a name: then `pipe --peer NAME`, `forward --peer NAME`."""

    def work() -> None:
        forward: list[str] = []
        for spec in local or []:
            forward += ["-L", spec]
        for spec in remote or []:
            forward += ["-R", spec]
        for spec in dynamic or []:
            forward += ["-D", spec]
        profile = peers.Profile(
            name=peers.check_name(name),
            id=peer_id,
            ip=ip.strip("[]") if ip else None,
            port=port,
            lport=lport,
            via=via,
            forward=tuple(forward),
            keepalive=True if keepalive else None,
        )
        path = peers.add(profile, config_dir, replace=replace)
        log.warning("saved peer %r in %s", name, path)

    _run(verbose, work, quiet, "peers add")


@peers_app.command("list", epilog=_epilog("tete-tunnel peers list"))
def peers_list_command(
    config_dir: ConfigDir = None, verbose: Verbose = 0, quiet: Quiet = False
) -> None:
    """List the saved peers: name, ID, where to meet, forwards."""

    def work() -> None:
        profiles = peers.load(config_dir)
        if not profiles:
            log.warning("no peers saved in %s", peers.peers_file(config_dir))
        for profile in profiles.values():
            print("  ".join(_describe(profile)))

    _run(verbose, work, quiet, "peers list")


def _describe(profile: peers.Profile) -> list[str]:
    words = [profile.name, profile.id]
    if profile.ip is not None:
        ip = f"[{profile.ip}]" if ":" in profile.ip else profile.ip
        words.append(f"ip {ip}:{profile.port or DEFAULT_PORT}")
    if profile.via is not None:
        words.append(f"via {profile.via}")
    if profile.lport is not None:
        words.append(f"lport {profile.lport}")
    if profile.forward:
        words.append(" ".join(profile.forward))
    return words


@peers_app.command("remove", epilog=_epilog("tete-tunnel peers remove alice"))
def peers_remove_command(
    name: Annotated[str, typer.Argument(help="The peer to forget.")],
    config_dir: ConfigDir = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Forget a saved peer."""

    def work() -> None:
        path = peers.remove(name, config_dir)
        log.warning("removed peer %r from %s", name, path)

    _run(verbose, work, quiet, "peers remove")


@app.command(
    "netcheck",
    epilog=_epilog(
        "tete-tunnel netcheck --via relay.example.org",
        "tete-tunnel netcheck --via relay.example.org:54320 --lport 40000",
    ),
)
def netcheck_command(
    via: Annotated[
        str,
        typer.Option("--via", metavar="RELAY", help="The relay to ask (HOST[:PORT])."),
    ],
    lport: LPort = DEFAULT_PORT,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """What our network means for a direct link: our public address, whether the NAT keeps
    our port and maps it the same for every destination, IPv6, and how far the relay is.

    Exits 0 when the relay answered, 1 when it did not.
    """
    from tete_tunnel.netcheck import describe, probe

    def work() -> Coroutine[Any, Any, None]:
        relays = rv.parse_relays(via)
        if len(relays) != 1:
            raise UsageError("netcheck asks one relay: give one --via HOST[:PORT]")
        if not 1 <= lport <= 65535:
            raise UsageError(f"--lport {lport} is not a TCP port (1-65535)")

        async def check() -> None:
            for line in describe(await probe(relays[0], lport)):
                print(line, flush=True)

        return check()

    _run(verbose, work, quiet, "netcheck")


def _host_port(text: str, option: str, default_host: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected [HOST:]PORT") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"{option} {text!r}: port out of range")
    return host, port


@app.command("demo", epilog=_epilog("tete-tunnel demo"))
def demo_command(verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Try it on this machine: two peers, a web page through -L, data through pipe."""
    from tete_tunnel.demo import run_demo

    _run(verbose, run_demo, quiet, "demo")


def _version(value: bool) -> None:
    if value:
        print(f"tete-tunnel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """A private, authenticated TCP tunnel between two peers, through their NATs."""


def main() -> None:
    """Run the command line; a usage error is one `error:` line and where to find help,
    exit 2, the same as our own usage errors."""
    from typer._click import exceptions as click_errors

    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="tete-tunnel", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click_errors.ClickException as exc:
        setup_logging(0)
        log.error("error: %s", exc.format_message())
        if isinstance(exc, click_errors.UsageError):
            ctx = exc.ctx
            _help_hint(ctx.command_path if ctx is not None else "tete-tunnel")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
