"""Named peers: profiles kept in `peers.toml` so that `--peer NAME` is the whole command.

The file lives in the config directory (`$XDG_CONFIG_HOME/tete-tunnel`, the identity's
default directory; `--config-dir` or `$TETE_TUNNEL_CONFIG_DIR` choose another) and is meant
to be edited by hand as well (docs/PEERS.md):

    [peers.alice]
    id = "AAAA-BBBB-..."            # required: what `tete-tunnel id` prints on alice's side
    ip = "alice.example.org"        # --peer-ip (an IP or a host name), or
    via = "relay.example.org"       # --via
    port = 54312                    # --rport
    lport = 54312                   # --lport
    forward = ["-L", "2222:127.0.0.1:22"]
    keepalive = true

The file is checked whole when it is read, before any network activity: a malformed ID, an
unknown key or a value of the wrong type is one UsageError line naming the file and the peer.
It is read with `tomllib` and written with `tomli_w`; `peers add` and `peers remove` rewrite
it, so comments in it are not kept.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tete_tunnel.errors import TeteError, UsageError
from tete_tunnel.forward import parse_dynamic, parse_spec
from tete_tunnel.identity import default_identity_dir, format_id, parse_id
from tete_tunnel.policy import parse_pattern
from tete_tunnel.rendezvous import parse_relays

PEERS_FILE = "peers.toml"
CONFIG_DIR_ENV = "TETE_TUNNEL_CONFIG_DIR"
# Names end up in shell commands, systemd instance names and ssh's %h: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_FILE_SIZE = 1 << 20  # a hand-kept list of peers is a few KiB; more is not ours
FORWARD_FLAGS = ("-L", "-R", "-D")


def config_dir(override: Path | None = None) -> Path:
    """`--config-dir`, else `$TETE_TUNNEL_CONFIG_DIR`, else the identity's default directory."""
    if override is not None:
        return override
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else default_identity_dir()


def peers_file(directory: Path | None = None) -> Path:
    return config_dir(directory) / PEERS_FILE


@dataclass(frozen=True)
class Profile:
    """One named peer as stored; None or () means "not stored, use the command's default"."""

    name: str
    id: str
    path: Path | None = None  # the file it was read from (not stored)
    ip: str | None = None
    port: int | None = None
    lport: int | None = None
    via: str | None = None
    forward: tuple[str, ...] = ()  # flag, spec, flag, spec...
    keepalive: bool | None = None
    keepalive_interval: float | None = None
    keepalive_timeout: float | None = None
    allow_open: tuple[str, ...] = ()
    allow_listen: tuple[str, ...] = ()
    keep_going: bool | None = None
    max_connections: int | None = None

    def forwards(self, flag: str) -> list[str]:
        """The specs stored for one of FORWARD_FLAGS, in order."""
        pairs = zip(self.forward[::2], self.forward[1::2], strict=True)
        return [spec for f, spec in pairs if f == flag]

    def to_toml(self) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "path") or value is None or value == ():
                continue
            table[f.name] = list(value) if isinstance(value, tuple) else value
        return table


# key -> (what it must be, as said in an error; the check)
def _is_port(v: object) -> bool:
    return type(v) is int and 1 <= v <= 65535


def _is_seconds(v: object) -> bool:
    return type(v) in (int, float) and 0 <= v < float("inf")  # type: ignore[operator]


def _is_strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


_KEYS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "id": ("a tete-tunnel ID (a string)", lambda v: isinstance(v, str)),
    "ip": ("an IP address or host name (a string)", lambda v: isinstance(v, str) and bool(v)),
    "port": ("a TCP port (1-65535)", _is_port),
    "lport": ("a TCP port (1-65535)", _is_port),
    "via": ("RELAY[,RELAY...] (a string)", lambda v: isinstance(v, str) and bool(v)),
    "forward": ('a list like ["-L", "2222:127.0.0.1:22", "-R", ...]', _is_strings),
    "keepalive": ("true or false", lambda v: isinstance(v, bool)),
    "keepalive_interval": ("a number of seconds", _is_seconds),
    "keepalive_timeout": ("a number of seconds", _is_seconds),
    "allow_open": ('a list of "HOST:PORT" strings', _is_strings),
    "allow_listen": ('a list of "HOST:PORT" strings', _is_strings),
    "keep_going": ("true or false", lambda v: isinstance(v, bool)),
    "max_connections": ("a positive whole number", lambda v: type(v) is int and v >= 1),
}


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"peer name {name!r}: use letters, digits, '.', '_' and '-' (up to 64, "
            "starting with a letter or digit)"
        )
    return name


def _profile(path: Path, name: str, table: object) -> Profile:
    where = f"{path}: peer {name!r}"
    if not _NAME.match(name):
        raise UsageError(f"{where}: not a usable name (letters, digits, '.', '_', '-')")
    if not isinstance(table, dict):
        raise UsageError(f"{where}: expected a table ([peers.{name}] with id = ...)")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise UsageError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)}); see docs/PEERS.md"
        )
    if "id" not in table:
        raise UsageError(f'{where}: no id (add id = "..." as printed by `tete-tunnel id`)')
    for key, value in table.items():
        what, ok = _KEYS[key]
        if not ok(value):
            raise UsageError(f"{where}: {key} = {value!r} is not {what}")
    try:
        peer_id = format_id(parse_id(table["id"]))
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    forward = tuple(table.get("forward", ()))
    if len(forward) % 2 or any(f not in FORWARD_FLAGS for f in forward[::2]):
        raise UsageError(
            f"{where}: forward = {list(forward)!r}: expected pairs of "
            f'{"/".join(FORWARD_FLAGS)} and a spec, like ["-L", "2222:127.0.0.1:22"]'
        )
    if "ip" in table and "via" in table:
        raise UsageError(f"{where}: give ip or via, not both (via finds the address itself)")
    try:  # the same checks as on the command line, said with the file and the peer
        for flag, spec in zip(forward[::2], forward[1::2], strict=True):
            if flag == "-D":
                parse_dynamic(spec, flag)
            else:
                parse_spec(spec, flag)
        for key in ("allow_open", "allow_listen"):
            for pattern in table.get(key, ()):
                parse_pattern(pattern, key)
        if "via" in table:
            parse_relays(table["via"], "via")
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    values["id"] = peer_id
    return Profile(name=name, path=path, **values)


def _read(path: Path) -> bytes | None:
    """The file's bytes (None if there is none), refused if others could have changed it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TeteError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TeteError(f"{path} is not a regular file: refused")
        # The file says which IDs to trust: one others can write could swap a pin.
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise TeteError(
                f"{path} can be changed by others (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o}): refused, it says which peer IDs to trust "
                f"(chmod go-w {path})"
            )
        data = f.read(_MAX_FILE_SIZE + 1)
    if len(data) > _MAX_FILE_SIZE:
        raise TeteError(f"{path} is larger than {_MAX_FILE_SIZE} bytes: not a peers file")
    return data


def load(directory: Path | None = None) -> dict[str, Profile]:
    """Every profile in the file (none if there is no file), each checked."""
    path = peers_file(directory)
    data = _read(path)
    if data is None:
        return {}
    import tomllib  # only when a profile is read

    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"peers"})
    if unknown:
        raise UsageError(f"{path}: unknown table or key {unknown[0]!r} (expected [peers.NAME])")
    table = document.get("peers", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: 'peers' must be a table of [peers.NAME] tables")
    return {name: _profile(path, name, t) for name, t in table.items()}


def lookup(name: str, directory: Path | None = None) -> Profile:
    profiles = load(directory)
    if name in profiles:
        return profiles[name]
    path = peers_file(directory)
    known = ", ".join(sorted(profiles)) if profiles else "none yet"
    raise UsageError(
        f"no peer named {name!r} in {path} (known: {known}); "
        "add one with `tete-tunnel peers add NAME ID`"
    )


def save(profiles: dict[str, Profile], directory: Path | None = None) -> Path:
    """Write the whole file at once (a temporary file renamed over it), mode 0600."""
    path = peers_file(directory)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = {"peers": {name: p.to_toml() for name, p in sorted(profiles.items())}}
    import tomli_w

    text = tomli_w.dumps(document)
    temporary = path.with_name(f".{PEERS_FILE}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def add(profile: Profile, directory: Path | None = None, *, replace: bool = False) -> Path:
    profiles = load(directory)
    if profile.name in profiles and not replace:
        raise UsageError(
            f"a peer named {profile.name!r} is already in {peers_file(directory)}: "
            "add --replace to overwrite it, or pick another name"
        )
    # Checked as if read back, so that what we write is always loadable.
    checked = _profile(peers_file(directory), profile.name, profile.to_toml())
    profiles[profile.name] = checked
    return save(profiles, directory)


def remove(name: str, directory: Path | None = None) -> Path:
    profiles = load(directory)
    if name not in profiles:
        lookup(name, directory)  # raises, listing the names there are
    del profiles[name]
    return save(profiles, directory)
