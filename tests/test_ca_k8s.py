"""Enrolment by Kubernetes service-account token: the JWT checks (table), and `ca serve` with a
JWKS file and with an issuer's discovery document served on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.ca.issuer import fingerprint, make_csr, new_key
from proxy.ca.k8s import (
    JwksSource,
    KeysUnavailable,
    SaTokenRejected,
    UnknownKey,
    looks_like_jwt,
    parse_jwks,
    verify_sa_token,
)
from proxy.ca.store import CaDir
from proxy.ca.tokens import make_token, new_secret
from proxy.certsource.ca import CaSource
from proxy.material import Material
from tests.harness import free_port
from tests.test_ca_service import CaServer, _call, _init_ca

TD = "corp.example"
ISSUER = "https://kubernetes.default.svc.cluster.local"
WEB = "spiffe://corp.example/ns/shop/sa/web"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_P384 = ec.generate_private_key(ec.SECP384R1())


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "RS256"
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "ES256"
    jwk.update(kid=kid, use="sig")
    return jwk


def _jwks(*pairs: tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, str]) -> str:
    return json.dumps({"keys": [_jwk(k, kid) for k, kid in pairs]})


def _claims(
    ns: str = "shop", sa: str = "web", *, ttl: float = 600, k8s: bool = True, **over: Any
) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": ["mtls-sidecar"],
        "exp": now + int(ttl),
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": "c0ffee",
        "kubernetes.io": {
            "namespace": ns,
            "pod": {"name": f"{sa}-7d9f", "uid": "u1"},
            "serviceaccount": {"name": sa, "uid": "u2"},
        },
        "sub": f"system:serviceaccount:{ns}:{sa}",
    }
    claims.update(over)
    if not k8s:
        del claims["kubernetes.io"]
    return {k: v for k, v in claims.items() if v is not None}


def _sign(
    claims: dict[str, Any],
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = RSA_KEY,
    kid: str = "k1",
    alg: str = "RS256",
) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _tampered() -> str:
    head, _, sig = _sign(_claims()).split(".")
    body = _b64(json.dumps(_claims(sa="admin")).encode())
    return f"{head}.{body}.{sig}"


def _alg_none() -> str:
    head = _b64(json.dumps({"alg": "none", "kid": "k1", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(_claims()).encode())}."


def _hs256_with_public_key() -> str:
    # the classic key-confusion forgery: HMAC keyed with the (public) RSA key
    head = _b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(_claims()).encode())}.{_b64(b'x' * 32)}"


KEYS = parse_jwks(_jwks((RSA_KEY, "k1"), (EC_KEY, "e1")), "test")

# (name, token, status, words in the reason)
BAD: list[tuple[str, str, int, str]] = [
    ("wrong audience", _sign(_claims(aud=["api"])), 401, "audience is ['api']"),
    ("expired", _sign(_claims(ttl=-120)), 401, "expired at"),
    ("wrong issuer", _sign(_claims(iss="https://evil.example")), 401, "issuer 'https://evil"),
    ("other key, same kid", _sign(_claims(), OTHER_KEY), 401, "signature does not verify"),
    ("unknown kid", _sign(_claims(), OTHER_KEY, kid="k9"), 401, "key id 'k9'"),
    ("tampered payload", _tampered(), 401, "signature does not verify"),
    ("alg none", _alg_none(), 401, "algorithm 'none' is not accepted"),
    ("HS256 with the public key", _hs256_with_public_key(), 401, "'HS256' is not accepted"),
    ("RS256 for an EC key", _sign(_claims(), RSA_KEY, "e1"), 401, "does not fit the type"),
    ("ES256 for an RSA key", _sign(_claims(), EC_KEY, "k1", "ES256"), 401, "does not fit"),
    ("ES384 for a P-256 key", _sign(_claims(), EC_P384, "e1", "ES384"), 401, "does not verify"),
    ("not yet valid", _sign(_claims(nbf=int(time.time()) + 3600)), 401, "not valid yet"),
    ("no expiry", _sign(_claims(exp=None)), 401, "lacks the 'exp' claim"),
    ("garbage", "eyJhbGciOi.bm9wZQ.c2ln", 401, "malformed"),
    (
        "claims disagree",
        _sign(_claims(sub="system:serviceaccount:kube-system:admin")),
        403,
        "claims disagree",
    ),
    (
        "no service account",
        _sign(_claims(k8s=False, sub="alice")),
        403,
        "names no namespace",
    ),
    ("bad namespace", _sign(_claims(ns="Shop_1")), 403, "invalid namespace"),
]


@pytest.mark.parametrize(("name", "token", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_tokens_are_refused_with_a_reason(
    name: str, token: str, status: int, words: str
) -> None:
    with pytest.raises(SaTokenRejected) as caught:
        verify_sa_token(token, KEYS, issuer=ISSUER, trust_domain=TD)
    assert caught.value.status == status and words in str(caught.value), str(caught.value)
    assert isinstance(caught.value, UnknownKey) == (name == "unknown kid")


def test_good_tokens_name_the_service_account() -> None:
    good = verify_sa_token(_sign(_claims()), KEYS, issuer=ISSUER, trust_domain=TD)
    assert good.identity == WEB and good.pod == "web-7d9f" and good.jti == "c0ffee"
    assert good.requester() == "service account shop/web pod=web-7d9f jti=c0ffee"
    # EC key, and the flat `sub` form without the kubernetes.io claim
    flat = _claims(ns="db", sa="pg", k8s=False)
    got = verify_sa_token(_sign(flat, EC_KEY, "e1", "ES256"), KEYS, issuer=ISSUER, trust_domain=TD)
    assert got.identity == "spiffe://corp.example/ns/db/sa/pg" and got.pod is None
    # a single audience as a string is fine too
    one = _sign(_claims(aud="mtls-sidecar"))
    assert verify_sa_token(one, KEYS, issuer=ISSUER, trust_domain=TD).identity == WEB


@pytest.mark.parametrize(
    ("token", "jwt_shape"),
    [
        (_sign(_claims()), True),
        (make_token(new_secret(), WEB, 60), False),  # our join token: three parts, but ours
        (_alg_none(), True),
        ("a.b", False),
        ("a.b.c.d", False),
        ("a b.c.d", False),
        ("", False),
    ],
)
def test_tokens_are_told_apart_by_shape(token: str, jwt_shape: bool) -> None:
    assert looks_like_jwt(token) is jwt_shape


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nope", "not JSON"),
        ("[]", "not a JWKS"),
        ('{"keys": {}}', "not a JWKS"),
        ('{"keys": [{"kty": "oct", "k": "AAAA"}]}', "no usable signing key"),
        ('{"keys": [{"kty": "RSA", "n": "x"}]}', "no usable signing key"),
    ],
)
def test_bad_jwks_documents(text: str, words: str) -> None:
    with pytest.raises(KeysUnavailable, match=words):
        parse_jwks(text, "test")


# -- the real service ----------------------------------------------------------------------


def _rows(ca_dir: Path) -> int:
    store = CaDir.open(ca_dir).store()
    try:
        return len(store.issued())
    finally:
        store.close()


def _free_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def sa_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    tmp = tmp_path_factory.mktemp("sa")
    ca_dir, _ = _init_ca(tmp)
    jwks = tmp / "jwks.json"
    jwks.write_text(_jwks((RSA_KEY, "k1"), (EC_KEY, "e1")))
    server = CaServer(
        ca_dir,
        tmp / "ca.log",
        leaf_ttl="1h",
        extra=("--k8s-issuer", ISSUER, "--k8s-jwks", str(jwks)),
    )
    server.start()
    yield server
    server.stop()


def _enrol(server: CaServer, token: str, identity: str = WEB) -> tuple[int, str, str | None]:
    body = {"token": token, "csr": make_csr(new_key(), identity).decode()}
    answer = asyncio.run(_call(server, "POST", "/v1/enroll", body))
    chain = answer.body.get("chain")
    ident = None
    if chain:
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ident = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
    return answer.status, answer.body.get("error", ""), ident


def test_service_account_enrolment_with_a_jwks_file(sa_served: CaServer) -> None:
    server = sa_served
    status, _, ident = _enrol(server, _sign(_claims()))
    assert status == 200 and ident == WEB
    log = server.log()
    assert "requester=127.0.0.1 via=enroll (service account shop/web pod=web-7d9f" in log
    before = _rows(server.ca_dir)
    for name, token, code, words in BAD:
        status, error, _ = _enrol(server, token)
        assert status == code and words in error, (name, status, error)
    # a valid token cannot be used for another identity
    status, error, _ = _enrol(server, _sign(_claims()), "spiffe://corp.example/ns/shop/sa/db")
    assert status == 403 and "only be for spiffe://corp.example/ns/shop/sa/web" in error
    assert _rows(server.ca_dir) == before  # nothing issued for any of them
    # join tokens keep working beside service-account tokens
    secret = CaDir.open(server.ca_dir).token_secret()
    assert _enrol(server, make_token(secret, WEB, 600))[0] == 200
    assert "Traceback" not in server.log()


def test_service_account_tokens_are_refused_when_not_enabled(tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="1h")
    server.start()
    try:
        status, error, _ = _enrol(server, _sign(_claims()))
    finally:
        server.stop()
    assert status == 401 and "--k8s-issuer" in error and _rows(ca_dir) == 0


@pytest.fixture
def discovery(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback publishing an issuer's discovery document and JWKS."""
    port = _free_port()
    issuer = f"http://127.0.0.1:{port}"
    root = tmp_path / "www"
    (root / ".well-known").mkdir(parents=True)
    (root / "openid" / "v1").mkdir(parents=True)
    (root / ".well-known" / "openid-configuration").write_text(
        json.dumps({"issuer": issuer, "jwks_uri": f"{issuer}/openid/v1/jwks"})
    )
    jwks = root / "openid" / "v1" / "jwks"
    jwks.write_text(_jwks((RSA_KEY, "k1")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    yield issuer, jwks
    proc.terminate()
    proc.wait(10)


def test_service_account_enrolment_with_issuer_discovery(
    tmp_path: Path, discovery: tuple[str, Path]
) -> None:
    issuer, _ = discovery
    ca_dir, _ = _init_ca(tmp_path)
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="1h", extra=("--k8s-issuer", issuer))
    server.start()
    try:
        status, _, ident = _enrol(server, _sign(_claims(iss=issuer)))
        assert status == 200 and ident == WEB
        # the fixed issuer of the tokens is checked in this mode too
        status, error, _ = _enrol(server, _sign(_claims()))
        assert status == 401 and f"not this cluster's '{issuer}'" in error
        status, error, _ = _enrol(server, _sign(_claims(iss=issuer), OTHER_KEY, kid="k9"))
        assert status == 401 and "key id 'k9'" in error
    finally:
        server.stop()
    assert _rows(ca_dir) == 1
    assert "service-account keys fetched from" in server.log()


def test_discovery_refetches_on_an_unknown_kid_and_keeps_keys_on_failure(
    discovery: tuple[str, Path],
) -> None:
    issuer, jwks = discovery
    source = JwksSource(issuer=issuer, min_refresh=0)

    async def scenario() -> None:
        assert [k.key_id for k in await source.keys()] == ["k1"]
        jwks.write_text(_jwks((RSA_KEY, "k1"), (EC_KEY, "e2")))  # the cluster adds a key
        assert [k.key_id for k in await source.keys()] == ["k1"]  # cached
        assert [k.key_id for k in await source.keys(refresh=True)] == ["k1", "e2"]
        jwks.write_text("broken")  # a bad answer: the keys fetched before stay
        assert len(await source.keys(refresh=True)) == 2

    asyncio.run(scenario())
    # nothing fetched yet and the issuer unreachable: a clear error
    dead = JwksSource(issuer=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(KeysUnavailable, match="cannot fetch the service-account keys"):
        asyncio.run(dead.keys())


def test_private_members_of_a_published_key_are_ignored() -> None:
    jwk = _jwk(EC_KEY, "e1")
    numbers = EC_KEY.private_numbers()
    jwk["d"] = _b64(numbers.private_value.to_bytes(32, "big"))
    (key,) = parse_jwks(json.dumps({"keys": [jwk]}), "test")
    assert isinstance(key.key, ec.EllipticCurvePublicKey)
    token = _sign(_claims(), EC_KEY, "e1", "ES256")
    assert verify_sa_token(token, [key], issuer=ISSUER, trust_domain=TD).identity == WEB


def test_a_sidecar_enrols_with_its_service_account_token_and_renews(sa_served: CaServer) -> None:
    """The sidecar's CA source, given the projected token as its join token, enrols as the
    service account's identity and then renews over mTLS (no token needed any more)."""
    fp = fingerprint(CaDir.open(sa_served.ca_dir).root(1))
    updates: list[Material] = []

    async def scenario() -> tuple[Material, Material]:
        source = CaSource(sa_served.url, _sign(_claims()), fp, WEB, on_update=updates.append)
        first = await source.enroll()
        renewed = await source.renew()
        return first, renewed

    first, renewed = asyncio.run(scenario())
    assert first.identity == WEB == renewed.identity
    assert renewed.serial_hex != first.serial_hex
    assert f"via=renew (renewal of serial={first.serial_hex}" in sa_served.log()
