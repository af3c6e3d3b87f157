"""Property tests for the CA's untrusted inputs: join and service-account tokens, CSRs, bodies.

Whatever arrives, `verify_token` either returns claims that make sense (a valid identity and a
finite expiry in the future) or raises `TokenRejected`; `check_csr` either returns a CSR for
exactly the expected identity or raises `CsrRejected`. Nothing else ever escapes: an escaping
exception would be a 500 (and a traceback) in the enrolment service.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from proxy.ca.issuer import CsrRejected, check_csr, make_csr, validate_spiffe_id
from proxy.ca.k8s import SaTokenRejected, parse_jwks, verify_sa_token
from proxy.ca.service import is_flat_json_object
from proxy.ca.tokens import MAX_TOKEN_LENGTH, TokenRejected, _b64, _mac, make_token, verify_token

relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECRET = b"k" * 32
NOW = 1_700_000_000.0
WEB = "spiffe://test.example/ns/shop/sa/web"

# --- join tokens ---------------------------------------------------------------------------


def _check_token(token: Any, secret: bytes = SECRET) -> None:
    try:
        claims = verify_token(secret, token, now=NOW)
    except TokenRejected as exc:
        assert str(exc)  # a sentence for the log and the 401 body
        return
    assert validate_spiffe_id(claims.identity) == claims.identity
    assert math.isfinite(claims.expires_at) and claims.expires_at > NOW
    assert isinstance(claims.nonce, str)


def _signed(payload_b64: str, secret: bytes = SECRET) -> str:
    """A token whose MAC is right: only the payload can be wrong."""
    return f"mtlsjt1.{payload_b64}.{_b64(_mac(secret, payload_b64))}"


token_alphabet = st.sampled_from(list("mtlsjt1.=-_ABCxyz0189+/\x00 é\n"))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e400", WEB, "spiffe://x/y", ""]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@relaxed
@given(st.one_of(st.text(), st.text(token_alphabet, max_size=80), st.binary().map(repr)))
def test_arbitrary_text_is_rejected(token: str) -> None:
    _check_token(token)


@relaxed
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text(), max_size=2)))
def test_non_string_tokens_are_rejected(token: object) -> None:
    with pytest.raises(TokenRejected):
        verify_token(SECRET, token, now=NOW)  # type: ignore[arg-type]


@relaxed
@given(st.integers(0, 200), st.integers(0, 255), st.integers(0, 3))
def test_mutated_valid_token(pos: int, value: int, how: int) -> None:
    token = make_token(SECRET, WEB, 600, now=NOW)
    pos %= len(token)
    if how == 0:  # replace one character
        mutated = token[:pos] + chr(value) + token[pos + 1 :]
    elif how == 1:  # truncate
        mutated = token[:pos]
    elif how == 2:  # insert
        mutated = token[:pos] + chr(value) + token[pos:]
    else:  # duplicate a section (extra dots, longer payload)
        mutated = token[:pos] + token[pos:] + token[pos:]
    if mutated == token:
        return
    try:
        claims = verify_token(SECRET, mutated, now=NOW)
    except TokenRejected:
        return
    # The only edits that can still verify are no-ops for base64/strip (e.g. trailing space).
    assert claims.identity == WEB


@relaxed
@given(
    st.dictionaries(st.sampled_from(["id", "exp", "n", "x"]), json_values, max_size=4).flatmap(
        lambda d: st.fixed_dictionaries(
            {
                "id": st.one_of(json_values, st.just(WEB)),
                "exp": st.one_of(json_values, st.floats(allow_nan=True), st.just(NOW + 60)),
                "n": st.one_of(json_values, st.just("abcd")),
            }
        ).map(lambda base: {**base, **d})
    )
)
def test_validly_signed_weird_payloads(payload: dict[str, Any]) -> None:
    """Even a payload with a right MAC (a bug or a stolen secret) cannot crash the verifier."""
    raw = json.dumps(payload, allow_nan=True).encode()
    _check_token(_signed(base64.urlsafe_b64encode(raw).rstrip(b"=").decode()))


@relaxed
@given(st.binary(max_size=300))
def test_validly_signed_arbitrary_bytes(raw: bytes) -> None:
    _check_token(_signed(base64.urlsafe_b64encode(raw).rstrip(b"=").decode()))


@pytest.mark.parametrize(
    "exp", ["NaN", "Infinity", "-Infinity", "1e400", "-1e30", "1e30", '"nan"', "true"]
)
def test_signed_tokens_with_absurd_expiry(exp: str) -> None:
    raw = f'{{"exp":{exp},"id":"{WEB}","n":"abc"}}'.encode()
    _check_token(_signed(base64.urlsafe_b64encode(raw).rstrip(b"=").decode()))


def test_overlong_token_is_rejected_cheaply() -> None:
    with pytest.raises(TokenRejected, match="too long"):
        verify_token(SECRET, "mtlsjt1." + "A" * MAX_TOKEN_LENGTH + ".x", now=NOW)


# --- CSRs ----------------------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())
_GOOD_PEM = make_csr(_KEY, WEB)
_GOOD_DER = x509.load_pem_x509_csr(_GOOD_PEM).public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + "\n".join(lines)
        + "\n-----END CERTIFICATE REQUEST-----\n"
    ).encode()


def _check_csr(data: str | bytes, expected: str = WEB) -> None:
    try:
        csr = check_csr(data, expected)
    except CsrRejected as exc:
        assert str(exc)
        assert exc.status in (400, 403)
        return
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.value for n in san] == [expected]
    assert csr.is_signature_valid


@relaxed
@given(st.one_of(st.binary(max_size=600), st.text(max_size=300)))
def test_arbitrary_bytes_are_rejected(data: bytes | str) -> None:
    _check_csr(data)


@relaxed
@given(st.binary(max_size=600))
def test_arbitrary_der_in_pem_is_rejected(der: bytes) -> None:
    _check_csr(_pem(der))


@relaxed
@given(
    st.lists(
        st.tuples(st.integers(0, len(_GOOD_DER) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, len(_GOOD_DER)),
)
def test_mutated_der_csr(edits: list[tuple[int, int]], cut: int) -> None:
    der = bytearray(_GOOD_DER)
    for pos, value in edits:
        der[pos] = value
    _check_csr(_pem(bytes(der)))
    _check_csr(_pem(bytes(der[:cut])))


@relaxed
@given(st.integers(0, len(_GOOD_PEM) - 1), st.sampled_from([b"", b"\x00", b"-", b"\n", b"A"]))
def test_mutated_pem_text(pos: int, insert: bytes) -> None:
    _check_csr(_GOOD_PEM[:pos] + insert + _GOOD_PEM[pos + 1 :])


def _build_csr(key: Any, names: list[x509.GeneralName] | None, extra: bool = False) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if extra:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


_KEYS: dict[str, Any] = {
    "p256": _KEY,
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "p521": ec.generate_private_key(ec.SECP521R1()),
    "k256": ec.generate_private_key(ec.SECP256K1()),
    "rsa1024": rsa.generate_private_key(65537, 1024),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}

general_names = st.one_of(
    st.sampled_from([WEB, "spiffe://other.example/web", "https://x", "spiffe://test.example"]).map(
        x509.UniformResourceIdentifier
    ),
    st.sampled_from(["web.local", "localhost"]).map(x509.DNSName),
    st.sampled_from(["a@b.c"]).map(x509.RFC822Name),
)


@relaxed
@given(
    st.sampled_from(sorted(_KEYS)),
    st.none() | st.lists(general_names, max_size=3),
    st.booleans(),
    st.sampled_from([WEB, "spiffe://test.example/other"]),
)
def test_well_formed_csrs_of_every_shape(
    key_name: str, names: list[x509.GeneralName] | None, extra: bool, expected: str
) -> None:
    """Real, validly signed CSRs with every key type and SAN mix: only the exact one passes."""
    pem = _build_csr(_KEYS[key_name], names, extra)
    try:
        check_csr(pem, expected)
    except CsrRejected as exc:
        ok_shape = key_name in ("p256", "p384") and names is not None
        if ok_shape and [getattr(n, "value", None) for n in names or []] == [WEB]:
            # Right key and SAN, wrong identity asked for: a 403, not a 400.
            assert expected != WEB and exc.status == 403
        return
    assert key_name in ("p256", "p384")
    assert names is not None and [n.value for n in names] == [expected]


# --- enrolment request bodies ---------------------------------------------------------------

json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
tricky_text = st.text(alphabet=st.sampled_from(list('{}[]"\\ab:,é\n')), max_size=20)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@relaxed
@given(value=st.one_of(json_values, st.dictionaries(tricky_text, tricky_text, max_size=5)))
def test_flat_check_matches_the_shape_of_any_json(value: Any) -> None:
    """The pre-parse check says "flat" exactly for scalars and objects of scalars, whatever
    brackets, quotes and escapes the strings hold; so nothing nested reaches json.loads."""
    flat = _depth(value) == 0 or (isinstance(value, dict) and _depth(value) == 1)
    for ensure_ascii in (True, False):
        body = json.dumps(value, ensure_ascii=ensure_ascii).encode()
        assert is_flat_json_object(body) is flat, body


# --- service-account tokens -----------------------------------------------------------------

_SA_KEY = ec.generate_private_key(ec.SECP256R1())
_SA_JWKS = parse_jwks(
    json.dumps({"keys": [{**json.loads(ECAlgorithm.to_jwk(_SA_KEY.public_key())), "kid": "k"}]}),
    "fuzz",
)
_SA_ISSUER = "https://kubernetes.default.svc"


def _sa_token(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, _SA_KEY, algorithm="ES256", headers=header or {"kid": "k"})


def _check_sa(token: str) -> None:
    try:
        claims = verify_sa_token(token, _SA_JWKS, issuer=_SA_ISSUER, trust_domain="test.example")
    except SaTokenRejected as exc:
        assert str(exc) and exc.status in (401, 403)
        return
    assert validate_spiffe_id(claims.identity) == claims.identity
    assert claims.identity.startswith("spiffe://test.example/ns/")


_GOOD_SA = {
    "aud": "mtls-sidecar",
    "iss": _SA_ISSUER,
    "exp": 4_000_000_000,
    "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "web"}},
}


@relaxed
@given(token=st.text(alphabet=st.sampled_from(list("eyJ.abc-_0A=+/ \x00é")), max_size=200))
def test_arbitrary_sa_tokens_are_rejected(token: str) -> None:
    _check_sa(token)


@relaxed
@given(pos=st.integers(min_value=0), value=st.sampled_from(list("AaZz09-_.=")))
def test_mutated_sa_token(pos: int, value: str) -> None:
    token = _sa_token(_GOOD_SA)
    i = pos % len(token)
    _check_sa(token[:i] + value + token[i + 1 :])


@relaxed
@example(extra={"exp": -62135596801.0}, header={})  # expired before year 1: no date to print
@example(extra={"exp": -9.2e18}, header={})
@example(extra={}, header={"crit": None})  # PyJWT refuses it while reading the header
@given(
    extra=st.dictionaries(
        st.sampled_from(["aud", "iss", "exp", "nbf", "iat", "sub", "kubernetes.io", "jti"]),
        json_values,
        max_size=4,
    ),
    header=st.dictionaries(
        st.sampled_from(["kid", "typ", "crit", "b64", "jku", "x5u"]), json_values, max_size=3
    ),
)
def test_validly_signed_sa_tokens_with_weird_claims(
    extra: dict[str, Any], header: dict[str, Any]
) -> None:
    claims = {**_GOOD_SA, **extra}
    try:
        token = _sa_token(claims, {"kid": "k", **header})
    except (TypeError, ValueError, jwt.InvalidTokenError):
        return  # PyJWT will not even encode it
    _check_sa(token)
