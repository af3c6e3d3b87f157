"""proxy/revocation.py: CRLs checked against trusted issuers, all or nothing; table tests."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import Set
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ca.crl import Revoked, build_crl, crl_bundle_pem
from proxy.ca.issuer import Issuer, issue_leaf, make_intermediate, make_root, new_key
from proxy.revocation import (
    EMPTY,
    MAX_CRL_BYTES,
    CrlRejected,
    RevocationList,
    compact,
    from_compact,
    load_crls,
    merge,
)

pytestmark = pytest.mark.unit

TD = "corp.example"
WEB = "spiffe://corp.example/ns/shop/sa/web"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issuer]:
    # Dated from NOW (fixed at import), which the tests pass as the time of checking.
    root = make_root(TD, 1, now=NOW)
    inter = make_intermediate(TD, 1, root, now=NOW)
    other_root = make_root(TD, 9, now=NOW)
    # same subject name as `inter`, another key: what a forger would make
    impostor = make_intermediate(TD, 1, other_root, now=NOW)
    return {"root": root, "inter": inter, "other_root": other_root, "impostor": impostor}


def _leaf(issuer: Issuer) -> x509.Certificate:
    return issue_leaf(issuer, new_key().public_key(), spiffe_id=WEB)


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def _crl(issuer: Issuer, serials: list[int], *, now: dt.datetime = NOW, number: int = 1) -> bytes:
    entries = [Revoked(s, now - dt.timedelta(minutes=1), "keyCompromise") for s in serials]
    return _pem(build_crl(issuer, entries, number=number, now=now))


def test_good_crl_with_its_intermediate_checked_against_the_root(pki: dict[str, Issuer]) -> None:
    inter = pki["inter"]
    revoked, kept = _leaf(inter), _leaf(inter)
    crl = build_crl(
        inter,
        [Revoked(revoked.serial_number, NOW, "keyCompromise")],
        number=7,
        now=NOW,
    )
    pem = crl_bundle_pem([crl], [inter.cert])
    rl = load_crls(pem, [pki["root"].cert], now=NOW)
    assert rl.is_revoked(revoked) and not rl.is_revoked(kept)
    assert rl.is_revoked(revoked.serial_number, inter.cert.subject)
    # the same serial from another issuer is another certificate
    assert not rl.is_revoked(revoked.serial_number, pki["root"].cert.subject)
    assert len(rl) == 1 and not rl.stale
    (info,) = rl.crls
    assert info.number == 7 and info.revoked == 1
    assert rl.next_update == NOW + dt.timedelta(hours=24)
    assert rl.this_update is not None and rl.this_update <= NOW
    # the intermediate itself as trusted issuer, CRL alone: also fine
    assert load_crls(_pem(crl), [inter.cert], now=NOW).is_revoked(revoked)
    assert not EMPTY.is_revoked(revoked) and EMPTY.next_update is None


def test_expired_crl_is_accepted_but_stale(pki: dict[str, Issuer]) -> None:
    old = NOW - dt.timedelta(days=2)
    rl = load_crls(_crl(pki["inter"], [5], now=old), [pki["inter"].cert], now=NOW)
    assert rl.stale and rl.next_update is not None and rl.next_update < NOW
    assert rl.is_revoked(5, pki["inter"].cert.subject)


def _cases(pki: dict[str, Issuer]) -> list[tuple[str, bytes, list[x509.Certificate], str]]:
    inter, root, impostor = pki["inter"], pki["root"], pki["impostor"]
    good = _crl(inter, [3])
    forged = _crl(impostor, [3])  # the right issuer name, signed by another key
    future = _crl(inter, [3], now=NOW + dt.timedelta(hours=1))
    bad_base64 = b"-----BEGIN X509 CRL-----\nnot base64 at all\n-----END X509 CRL-----\n"
    key_pem = new_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    leaf_pem = _leaf(inter).public_bytes(serialization.Encoding.PEM)
    delta = _pem(
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter.cert.subject)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(hours=1))
        .add_extension(x509.DeltaCRLIndicator(1), critical=True)
        .sign(inter.key, hashes.SHA256())
    )
    return [
        ("forged (signed by another key)", forged, [inter.cert], "signature does not verify"),
        ("untrusted issuer", good, [pki["other_root"].cert], "not from an issuer we trust"),
        (
            "impostor intermediate beside it",
            crl_bundle_pem([x509.load_pem_x509_crl(forged)], [impostor.cert]),
            [root.cert],
            "not signed by a trusted root",
        ),
        ("a leaf beside it", good + leaf_pem, [root.cert], "not a CA that signs CRLs"),
        ("garbage", b"hello, world", [inter.cert], "no CRL found"),
        ("empty", b"", [inter.cert], "no CRL found"),
        ("bad base64", bad_base64, [inter.cert], "cannot be parsed"),
        ("a private key inside", good + key_pem, [inter.cert], "unexpected PEM block"),
        ("dated in the future", future, [inter.cert], "in the future"),
        ("delta CRL", delta, [inter.cert], "delta CRL"),
        # all or nothing: one good CRL does not carry a forged one
        ("good then forged", good + forged, [inter.cert], "CRL 2"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_crls_are_refused_with_a_reason(pki: dict[str, Issuer], index: int) -> None:
    cases = _cases(pki)
    assert len(cases) == 11
    name, pem, trusted, words = cases[index]
    with pytest.raises(CrlRejected) as caught:
        load_crls(pem, trusted, now=NOW)
    assert words in str(caught.value), name


def test_string_input_and_several_issuers(pki: dict[str, Issuer]) -> None:
    inter = pki["inter"]
    second = make_intermediate(TD, 2, pki["root"], now=NOW)
    pem = (_crl(inter, [11]) + _crl(second, [12])).decode()
    rl = load_crls(pem, [inter.cert, second.cert], now=NOW)
    assert rl.is_revoked(11, inter.cert.subject) and rl.is_revoked(12, second.cert.subject)
    assert not rl.is_revoked(12, inter.cert.subject)
    with pytest.raises(TypeError):
        rl.is_revoked(11)


_ROOT = make_root(TD, 1, now=NOW)
_INTER = make_intermediate(TD, 1, _ROOT, now=NOW)
_GOOD = crl_bundle_pem(
    [build_crl(_INTER, [Revoked(99, NOW, "superseded")], number=1, now=NOW)], [_INTER.cert]
)
_GOOD_DER = x509.load_pem_x509_crl(_GOOD.split(b"-----BEGIN CERTIFICATE")[0]).public_bytes(
    serialization.Encoding.DER
)


def _only_crl_rejected(pem: bytes) -> None:
    try:
        rl = load_crls(pem, [_ROOT.cert], now=NOW)
    except CrlRejected as exc:
        assert str(exc)
        return
    assert all(c.issuer == _INTER.cert.subject.rfc4514_string() for c in rl.crls)


@settings(deadline=None, max_examples=300)
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4))
def test_mutated_crls_are_refused_or_still_genuine(edits: list[tuple[int, int]]) -> None:
    der = bytearray(_GOOD_DER)
    for pos, value in edits:
        der[pos % len(der)] = value
    body = base64.encodebytes(bytes(der))
    _only_crl_rejected(b"-----BEGIN X509 CRL-----\n" + body + b"-----END X509 CRL-----\n")


@settings(deadline=None, max_examples=300)
@given(data=st.binary(max_size=300), text=st.text(max_size=100))
def test_arbitrary_input_is_refused(data: bytes, text: str) -> None:
    _only_crl_rejected(data)
    _only_crl_rejected(text.encode())
    _only_crl_rejected(b"-----BEGIN X509 CRL-----\n" + data + b"\n-----END X509 CRL-----\n")


def test_a_crl_of_an_unknown_version_is_refused() -> None:
    der = _GOOD_DER.replace(b"\x02\x01\x01", b"\x02\x01\x07", 1)  # version v2 -> "v8"
    body = base64.encodebytes(der)
    with pytest.raises(CrlRejected, match="CRL 1 cannot be parsed"):
        load_crls(b"-----BEGIN X509 CRL-----\n" + body + b"-----END X509 CRL-----\n", [_ROOT.cert])


@settings(deadline=None, max_examples=200)
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4))
def test_mutated_intermediates_beside_the_crl_are_refused_or_genuine(
    edits: list[tuple[int, int]],
) -> None:
    der = bytearray(_INTER.cert.public_bytes(serialization.Encoding.DER))
    for pos, value in edits:
        der[pos % len(der)] = value
    crl_part = _GOOD.split(b"-----BEGIN CERTIFICATE")[0]
    cert = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der))
    _only_crl_rejected(crl_part + cert + b"-----END CERTIFICATE-----\n")


# --- never backwards, CA by CA (issue 22, defect 2) ---------------------------------------------


def _load(pem: bytes, pki: dict[str, Issuer], now: dt.datetime = NOW) -> RevocationList:
    return load_crls(pem, [pki["root"].cert], now=now)


def test_a_lower_crl_number_is_refused_even_with_a_newer_this_update(
    pki: dict[str, Issuer],
) -> None:
    inter = pki["inter"]
    current = _load(crl_bundle_pem_of(inter, [5], number=9, now=NOW), pki)
    later = NOW + dt.timedelta(minutes=1)
    replay = _load(crl_bundle_pem_of(inter, [], number=8, now=later), pki, later)
    merged = merge(current, replay, [pki["root"].cert], now=later)
    assert not merged.changed and merged.result is current
    (why,) = merged.refused
    assert "older" in why and "CRL number 8 is lower than 9" in why
    assert merged.result.is_revoked(5, inter.cert.subject)
    # Same number, other content: refused as well; the same CRL again: no change, no refusal.
    twin = _load(crl_bundle_pem_of(inter, [], number=9, now=later), pki, later)
    assert "other content" in merge(current, twin, [pki["root"].cert], now=later).refused[0]
    same = merge(current, _load(crl_bundle_pem_of(inter, [5], number=9, now=NOW), pki), [])
    assert not same.changed and not same.refused
    # A higher number replaces it, whatever its thisUpdate.
    newer = _load(crl_bundle_pem_of(inter, [], number=10, now=NOW), pki)
    taken = merge(current, newer, [pki["root"].cert], now=later)
    assert taken.changed and not taken.refused and len(taken.result) == 0


def test_a_trusted_issuers_crl_may_not_disappear(pki: dict[str, Issuer]) -> None:
    """After an intermediate rotation the file holds two CRLs; dropping the one that lists
    a compromised certificate keeps that CRL, and says so."""
    root, old = pki["root"], pki["inter"]
    new = make_intermediate(TD, 2, root, now=NOW)
    crl_old = build_crl(old, [Revoked(77, NOW, "keyCompromise")], number=3, now=NOW)
    crl_new = build_crl(new, [Revoked(78, NOW, "keyCompromise")], number=4, now=NOW)
    both = _load(crl_bundle_pem([crl_old, crl_new], [old.cert, new.cert]), pki)
    assert len(both.crls) == 2
    crl_new2 = build_crl(new, [Revoked(79, NOW, "keyCompromise")], number=5, now=NOW)
    without_old = _load(crl_bundle_pem([crl_new2], [new.cert]), pki)
    merged = merge(both, without_old, [root.cert], now=NOW)
    assert merged.changed  # the new intermediate's newer CRL is taken...
    assert merged.result.is_revoked(79, new.cert.subject)
    assert merged.result.is_revoked(77, old.cert.subject)  # ...and the old one kept
    (why,) = merged.refused
    assert "missing" in why and "CRL number 3" in why and "issuing CA G1" in why
    # Once its intermediate has expired (so have its certificates), it may go.
    much_later = old.cert.not_valid_after_utc + dt.timedelta(days=1)
    gone = merge(both, without_old, [root.cert], now=much_later)
    assert not gone.refused and not gone.result.is_revoked(77, old.cert.subject)
    # A root no longer trusted: its intermediates' CRLs may go too.
    assert not merge(both, without_old, [pki["other_root"].cert], now=NOW).refused


def test_two_crls_of_one_issuer_in_one_input_are_refused(pki: dict[str, Issuer]) -> None:
    inter = pki["inter"]
    pem = crl_bundle_pem_of(inter, [1], number=1) + crl_bundle_pem_of(inter, [], number=2)
    with pytest.raises(CrlRejected, match="CRL 1 and CRL 2 are both from issuer"):
        _load(pem, pki)


def crl_bundle_pem_of(
    issuer: Issuer, serials: list[int], *, number: int, now: dt.datetime = NOW
) -> bytes:
    entries = [Revoked(s, now - dt.timedelta(minutes=1), "keyCompromise") for s in serials]
    return crl_bundle_pem([build_crl(issuer, entries, number=number, now=now)], [issuer.cert])


# --- big lists (issue 22, defect 1) --------------------------------------------------------------


def test_padding_between_blocks_is_ignored_and_oversized_input_refused(
    pki: dict[str, Issuer],
) -> None:
    pem = _crl(pki["inter"], [3])
    padded = (
        pem
        + b"x" * (17 * 1024 * 1024)
        + b"\n"
        + pki["inter"].cert.public_bytes(serialization.Encoding.PEM)
    )
    assert _load(padded, pki).is_revoked(3, pki["inter"].cert.subject)
    with pytest.raises(CrlRejected, match="more than the 64 MiB accepted"):
        _load(pem + b" " * MAX_CRL_BYTES, pki)


@given(
    st.lists(
        st.lists(st.integers(min_value=1, max_value=(1 << 170)), max_size=50),
        max_size=4,
    ),
    st.integers(min_value=1, max_value=7),
)
@settings(max_examples=50, deadline=None)
def test_compact_form_round_trips(groups: list[list[int]], step: int) -> None:
    index: dict[bytes, Set[int]] = {bytes([i, 0x30]): set(g) for i, g in enumerate(groups)}
    rl = RevocationList(crls=(), _index=index)
    headers, payload = compact(rl)
    build = from_compact(json.loads(json.dumps(headers)), payload, step=step)
    steps = 0
    while True:
        try:
            next(build)
            steps += 1
        except StopIteration as done:
            back = done.value
            break
    assert back._index == index and len(back) == len(rl)
    assert steps == sum(-(-len(set(g)) // step) for g in groups)


def test_a_bad_compact_form_is_a_value_error() -> None:
    headers, payload = compact(RevocationList(crls=(), _index={b"\x30\x00": {1, 2, 300}}))
    for bad_headers, bad_payload in (
        (headers, payload[:-1]),
        (headers, payload + b"\0"),
        ([{**headers[0], "width": "2"}], payload),
        ([{"issuer": "30"}], b""),
        (["not a mapping"], b""),
    ):
        with pytest.raises(ValueError):
            list(from_compact(bad_headers, bad_payload))


def test_an_oversized_crl_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from proxy.certsource.files import CrlFile

    path = tmp_path / "crl.pem"
    with path.open("wb") as f:
        f.truncate(MAX_CRL_BYTES + 1)  # sparse: no 64 MiB written
    got: list[bytes] = []
    CrlFile(path, on_crl=got.append).load()
    assert got == []
    path.write_bytes(b"small")
    CrlFile(path, on_crl=got.append).load()
    assert got == [b"small"]


def test_an_oversized_crl_from_the_ca_is_refused_while_downloading(
    pki: dict[str, Issuer],
) -> None:
    """GET /v1/crl stops reading past MAX_CRL_BYTES and refuses with the reason."""
    from aiohttp import web

    from proxy.certsource.ca import CaRefused, CaSource

    sent = 0

    async def crl(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"#" * (1 << 20)
        try:
            for _ in range(MAX_CRL_BYTES // len(chunk) + 8):
                await resp.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client went away: what the test wants
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/crl", crl)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        got: list[bytes] = []
        # Plain HTTP and the roots preset: only the size check is under test here.
        source = CaSource(f"https://127.0.0.1:{port}", "t", "ab" * 32, WEB, on_update=print)
        source.url = f"http://127.0.0.1:{port}"
        source._ca_roots = pki["root"].cert.public_bytes(serialization.Encoding.PEM)
        source._on_crl = got.append
        try:
            with pytest.raises(CaRefused, match="more than the 64 MiB accepted"):
                await source.refresh_crl()
        finally:
            await runner.cleanup()
        assert got == []

    asyncio.run(main())
