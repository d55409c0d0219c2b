"""The secure layer over socketpairs, both sides in one event loop."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from tests.conftest import Run
from tete_tunnel import tlssuites
from tete_tunnel.errors import AuthenticationError, HandshakeError
from tete_tunnel.identity import Identity, load_or_create
from tete_tunnel.secure import (
    Arbiter,
    Auth,
    CodeGuessFailed,
    Duplicate,
    Mode,
    Rejected,
    SecureLink,
    secure,
)


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity, Identity]:
    base = tmp_path_factory.mktemp("ids")
    return tuple(load_or_create(base / n) for n in "abc")  # type: ignore[return-value]


async def both(
    id_a: Identity, auth_a: Auth, id_b: Identity, auth_b: Auth
) -> tuple[SecureLink | BaseException, SecureLink | BaseException]:
    sa, sb = socket.socketpair()
    sa.setblocking(False)
    sb.setblocking(False)

    async def one(sock: socket.socket, identity: Identity, auth: Auth) -> SecureLink:
        try:
            return await secure(sock, identity, auth)
        except BaseException:
            sock.close()  # as the connector does: the other side sees the connection end
            raise

    results = await asyncio.wait_for(
        asyncio.gather(one(sa, id_a, auth_a), one(sb, id_b, auth_b), return_exceptions=True),
        timeout=20,
    )
    for r in results:
        if isinstance(r, SecureLink):
            r.carrier.transport.close()
    return results[0], results[1]


def run(coro):
    return asyncio.run(coro)


def test_unverified_links_with_equal_safety_codes(ids) -> None:
    a, b = run(both(ids[0], Auth(), ids[1], Auth()))
    assert isinstance(a, SecureLink) and isinstance(b, SecureLink)
    assert a.mode is b.mode is Mode.UNVERIFIED
    assert a.safety_code == b.safety_code
    assert a.peer_id == ids[1].id and b.peer_id == ids[0].id
    assert a.is_tls_client != b.is_tls_client  # roles from fingerprints, one of each
    assert a.is_tls_client == (ids[0].fingerprint < ids[1].fingerprint)


def test_safety_code_changes_with_every_connection(ids) -> None:
    first, _ = run(both(ids[0], Auth(), ids[1], Auth()))
    second, _ = run(both(ids[0], Auth(), ids[1], Auth()))
    assert isinstance(first, SecureLink) and isinstance(second, SecureLink)
    # Fresh committed nonces each time (equal only by a 1e-6 chance).
    assert first.safety_code != second.safety_code


def test_pinned_ids_connect(ids) -> None:
    a, b = run(
        both(
            ids[0],
            Auth(peer_fingerprint=ids[1].fingerprint),
            ids[1],
            Auth(peer_fingerprint=ids[0].fingerprint),
        )
    )
    assert isinstance(a, SecureLink) and isinstance(b, SecureLink)
    assert a.mode is Mode.PEER_ID


def test_wrong_pin_refused_on_both_sides(ids) -> None:
    """Refused, but as a dropped connection (Rejected): a stranger cannot end a run."""
    a, b = run(both(ids[0], Auth(peer_fingerprint=ids[2].fingerprint), ids[1], Auth()))
    assert isinstance(a, Rejected) and "peer ID mismatch" in str(a)
    assert ids[2].id in str(a) and ids[1].id in str(a)
    assert isinstance(b, Rejected) and "refused us" in str(b)
    assert not isinstance(a, AuthenticationError) and not isinstance(b, AuthenticationError)


def test_equal_codes_connect(ids) -> None:
    a, b = run(both(ids[0], Auth(code="7-purple-sausages"), ids[1], Auth(code="7-purple-sausages")))
    assert isinstance(a, SecureLink) and isinstance(b, SecureLink)
    assert a.mode is Mode.CODE and a.peer_id == ids[1].id


def test_unequal_codes_refused_on_both_sides(ids) -> None:
    a, b = run(both(ids[0], Auth(code="7-purple-sausages"), ids[1], Auth(code="7-purple-sausage")))
    for r in (a, b):  # the one guess of this run is used up: the run ends
        assert isinstance(r, CodeGuessFailed) and "wrong code" in str(r)
        assert "pick a new code" in str(r).lower()


@pytest.mark.parametrize("coded_side", [0, 1])
def test_code_on_one_side_only(ids, coded_side: int) -> None:
    auths = [Auth(), Auth()]
    auths[coded_side] = Auth(code="x")
    results = run(both(ids[0], auths[0], ids[1], auths[1]))
    assert isinstance(results[coded_side], Rejected)
    assert "did not use --code" in str(results[coded_side])
    assert isinstance(results[1 - coded_side], Rejected)
    assert "uses --code but we were given none" in str(results[1 - coded_side])


def test_same_identity_is_a_clear_error(ids) -> None:
    a, b = run(both(ids[0], Auth(), ids[0], Auth()))
    for r in (a, b):
        assert isinstance(r, Rejected)
        assert "same identity" in str(r) and "--identity" in str(r)


def test_tls_refuses_a_certificate_other_than_the_hello_one(ids, tmp_path: Path) -> None:
    """A peer that shows one certificate in HELLO and uses another key in TLS is refused."""
    import dataclasses

    impostor = dataclasses.replace(ids[2], cert_der=ids[1].cert_der)  # HELLO says b, TLS is c
    a, b = run(both(ids[0], Auth(), impostor, Auth()))
    assert isinstance(a, HandshakeError) and "TLS" in str(a)
    assert not isinstance(b, SecureLink)


@pytest.mark.parametrize("auth", [Auth(), Auth(code="7-purple-sausages")], ids=["plain", "code"])
def test_two_connections_at_once_give_one_link(ids, auth: Auth) -> None:
    """Two connections between the same peers at once (a dial each way, or two candidate
    addresses): the TLS server's arbiter lets one link and refuses the other as a duplicate
    before any code confirmation is sent on it, so both sides hold the same one link and no
    guess of the code is spent."""

    async def main() -> list[list[SecureLink | BaseException]]:
        pairs = [socket.socketpair() for _ in range(2)]
        for pair in pairs:
            for sock in pair:
                sock.setblocking(False)
        arbiters = [Arbiter(), Arbiter()]
        runs = [
            secure(pair[side], ids[side], auth, None, arbiters[side])
            for pair in pairs
            for side in (0, 1)
        ]
        results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 20)
        socks = [sock for pair in pairs for sock in pair]
        for r, sock in zip(results, socks, strict=True):
            if isinstance(r, SecureLink):
                r.carrier.transport.close()
            else:
                sock.close()
        return [results[0:2], results[2:4]]

    results = run(main())
    linked = [pair for pair in results if all(isinstance(r, SecureLink) for r in pair)]
    dropped = [pair for pair in results if all(isinstance(r, Duplicate) for r in pair)]
    assert len(linked) == 1 and len(dropped) == 1


def test_the_link_runs_aes_128_gcm(ids, run: Run) -> None:
    """Both sides put TLS_AES_128_GCM_SHA256 first (tlssuites): OpenSSL's own first choice,
    AES-256-GCM, costs a third more CPU per byte to encrypt."""
    a, b = run(both(ids[0], Auth(), ids[1], Auth()))
    assert isinstance(a, SecureLink) and isinstance(b, SecureLink)
    for link in (a, b):
        name, version, _ = link.carrier.transport.get_extra_info("cipher")
        assert (name, version) == ("TLS_AES_128_GCM_SHA256", "TLSv1.3")


@pytest.mark.parametrize(
    "preferring", [ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER], ids=["client", "server"]
)
def test_a_peer_with_openssls_order_still_links(ids, monkeypatch, preferring, run: Run) -> None:
    """A peer that leaves OpenSSL's order (an older version, or an ssl module whose layout
    tlssuites does not know) links all the same; the TLS server's order decides."""
    real = tlssuites.prefer_aes128

    def one_side_only(ctx: ssl.SSLContext) -> bool:
        return real(ctx) if ctx.protocol == preferring else False

    monkeypatch.setattr(tlssuites, "prefer_aes128", one_side_only)
    a, b = run(both(ids[0], Auth(), ids[1], Auth()))
    assert isinstance(a, SecureLink) and isinstance(b, SecureLink)
    expected = "TLS_AES_128_GCM_SHA256"
    if preferring == ssl.PROTOCOL_TLS_CLIENT:
        expected = "TLS_AES_256_GCM_SHA384"
    for link in (a, b):
        assert link.carrier.transport.get_extra_info("cipher")[0] == expected


def test_suites_stay_as_they_are_unless_openssl_confirms_the_layout(monkeypatch) -> None:
    """The pointer read from the SSLContext is used only if OpenSSL confirms that the probe
    SSL object belongs to it; here it does not, and nothing changes."""
    lib = tlssuites._openssl()

    class Unconfirmed:
        SSL_CTX_set_ciphersuites = lib.SSL_CTX_set_ciphersuites

        @staticmethod
        def SSL_get_SSL_CTX(ssl_ptr: int) -> int:
            return 1

    monkeypatch.setattr(tlssuites, "_openssl", lambda: Unconfirmed)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert tlssuites.prefer_aes128(ctx) is False
    assert ctx.get_ciphers()[0]["name"] == "TLS_AES_256_GCM_SHA384"
