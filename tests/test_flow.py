"""The connection flow in memory: events in, actions out, no sockets."""

from __future__ import annotations

import pytest

from proxy.errors import PolicyDenied
from proxy.flow import (
    Accepted,
    AcceptPlaintext,
    Action,
    ClosedBeforeHello,
    Dial,
    DialFailed,
    Dialled,
    Direction,
    DrainTimeout,
    Eof,
    Fallback,
    Finish,
    Flow,
    FlowConfig,
    HandshakeDone,
    HandshakeFailed,
    HandshakeTimedOut,
    IdleTimeout,
    Lost,
    Mode,
    Open,
    Reason,
    Reject,
    SendEof,
    Side,
    Sniffed,
    StartTls,
    State,
    TlsError,
    UpstreamFailed,
    Warn,
)
from proxy.identity import SpiffeId, parse_spiffe_id

pytestmark = pytest.mark.unit

WEB = parse_spiffe_id("spiffe://td.example/web")
EVIL = parse_spiffe_id("spiffe://td.example/evil")
APP = ("127.0.0.1", 8080)
REMOTE = ("db.internal", 8443)


def allow_web(sid: SpiffeId | None) -> None:
    if sid is None:
        raise PolicyDenied("bad_cert", "peer certificate has no SPIFFE ID (URI SAN)")
    if sid != WEB:
        raise PolicyDenied("peer_not_allowed", f"{sid} is not allowed")


def inbound(mode: Mode = Mode.STRICT) -> Flow:
    return Flow(FlowConfig(Direction.INBOUND, "in", mode, 10.0), allow_web)


def outbound(mode: Mode = Mode.STRICT) -> Flow:
    return Flow(FlowConfig(Direction.OUTBOUND, "out", mode, 10.0), allow_web)


def run(flow: Flow, *events: object) -> list[Action]:
    actions: list[Action] = []
    for event in events:
        actions += flow.handle(event)  # type: ignore[arg-type]
    return actions


def open_inbound(flow: Flow) -> list[Action]:
    return run(
        flow,
        Accepted("10.0.0.7:5123", APP),
        Sniffed(True),
        HandshakeDone(WEB),
        Dialled(),
    )


def open_outbound(flow: Flow) -> list[Action]:
    return run(flow, Accepted("127.0.0.1:40000", REMOTE), Dialled(), HandshakeDone(WEB))


def test_inbound_mtls_happy_path() -> None:
    flow = inbound()
    assert open_inbound(flow) == [StartTls(), Dial(*APP, tls=False), Open(flow.security, WEB)]
    assert flow.state is State.OPEN and flow.peer_id == WEB


def test_outbound_mtls_happy_path() -> None:
    flow = outbound()
    assert open_outbound(flow) == [Dial(*REMOTE, tls=True), StartTls(), Open(flow.security, WEB)]


@pytest.mark.parametrize(
    ("first", "second", "sends"),
    [
        (Side.APP, Side.NET, [SendEof(Side.NET), SendEof(Side.APP)]),
        (Side.NET, Side.APP, [SendEof(Side.APP), SendEof(Side.NET)]),
    ],
)
def test_half_close_both_orders(first: Side, second: Side, sends: list[Action]) -> None:
    for flow in (inbound(), outbound()):
        (open_inbound if flow.inbound else open_outbound)(flow)
        one = flow.handle(Eof(first))
        assert one == sends[:1]
        assert flow.state is State.OPEN  # the other way still flows
        two = flow.handle(Eof(second))
        assert two == [sends[1], Finish("ok", abort=False)]
        assert flow.done


def test_outbound_app_eof_during_dial_is_carried_after_open() -> None:
    flow = outbound()
    actions = run(flow, Accepted("127.0.0.1:40000", REMOTE), Dialled(), Eof(Side.APP))
    assert actions == [Dial(*REMOTE, tls=True), StartTls()]  # nothing sent yet
    assert flow.handle(HandshakeDone(WEB)) == [Open(flow.security, WEB, eof_to_net=True)]
    assert flow.handle(Eof(Side.NET)) == [SendEof(Side.APP), Finish("ok", abort=False)]


def test_inbound_eof_while_dialling_app_then_app_lost() -> None:
    flow = inbound()
    run(flow, Accepted("p:1", APP), Sniffed(True), HandshakeDone(WEB))
    assert flow.handle(Eof(Side.NET)) == []  # held by the leg until relaying
    assert flow.handle(Lost(Side.APP, error=False)) == [Finish("ok", abort=False)]


@pytest.mark.parametrize(("side", "outcome"), [(Side.APP, "app_reset"), (Side.NET, "peer_reset")])
def test_reset_propagates_as_abort(side: Side, outcome: str) -> None:
    flow = inbound()
    open_inbound(flow)
    assert flow.handle(Lost(side, error=True)) == [Finish(outcome, abort=True)]
    assert flow.handle(Eof(Side.APP)) == []  # late callbacks of closing transports


def test_closed_without_eof_is_closed_not_ok() -> None:
    flow = outbound()
    open_outbound(flow)
    assert flow.handle(Lost(Side.NET, error=False)) == [Finish("closed", abort=False)]


def test_strict_inbound_refuses_plaintext() -> None:
    flow = inbound()
    actions = run(flow, Accepted("p:1", APP), Sniffed(False, b"GET / HTTP/1.1\r\n"))
    assert actions[0] == Reject(
        Reason.NOT_TLS, "peer p:1 sent plaintext ('GET / HTTP/1.1\\r\\n'...) to an mTLS-only port"
    )
    assert actions[1] == Finish("rejected:not_tls", abort=False, logged=True)


def test_permissive_inbound_takes_plaintext_silently() -> None:
    flow = inbound(Mode.PERMISSIVE)
    actions = run(flow, Accepted("p:1", APP), Sniffed(False, b"GET /"), Dialled())
    assert actions == [AcceptPlaintext(), Dial(*APP, tls=False), Open(flow.security, None)]
    assert flow.security == "plaintext"


def test_audit_inbound_takes_plaintext_and_warns() -> None:
    flow = inbound(Mode.AUDIT)
    actions = run(flow, Accepted("p:1", APP), Sniffed(False, b"GET /"))
    assert isinstance(actions[0], Warn) and "would be rejected" in actions[0].message
    assert actions[1:] == [AcceptPlaintext(), Dial(*APP, tls=False)]


def test_permissive_outbound_falls_back_when_remote_speaks_no_tls() -> None:
    flow = outbound(Mode.PERMISSIVE)
    run(flow, Accepted("a:1", REMOTE), Dialled())
    actions = flow.handle(HandshakeFailed(Reason.NOT_TLS, "no tls", no_tls=True))
    assert isinstance(actions[0], Fallback) and "falling back to plaintext" in actions[0].message
    assert actions[1] == Dial(*REMOTE, tls=False)
    assert flow.handle(Dialled()) == [Open(flow.security, None)]
    assert flow.security == "plaintext"


def test_permissive_outbound_does_not_fall_back_when_refused() -> None:
    flow = outbound(Mode.PERMISSIVE)
    run(flow, Accepted("a:1", REMOTE), Dialled())
    actions = flow.handle(HandshakeFailed(Reason.UNKNOWN_CA, "refused our certificate"))
    assert actions[0] == Reject(Reason.UNKNOWN_CA, "refused our certificate")


def test_strict_outbound_never_falls_back() -> None:
    flow = outbound()
    run(flow, Accepted("a:1", REMOTE), Dialled())
    actions = flow.handle(HandshakeFailed(Reason.NOT_TLS, "no tls", no_tls=True))
    assert actions[0] == Reject(Reason.NOT_TLS, "no tls")


def test_permissive_outbound_known_plaintext_dials_plaintext_at_once() -> None:
    flow = outbound(Mode.PERMISSIVE)
    assert run(flow, Accepted("a:1", REMOTE, plaintext_known=True), Dialled()) == [
        Dial(*REMOTE, tls=False),
        Open(flow.security, None),
    ]


def test_policy_refusal_after_handshake() -> None:
    flow = inbound()
    actions = run(flow, Accepted("p:1", APP), Sniffed(True), HandshakeDone(EVIL))
    assert actions[1] == Reject(
        Reason.PEER_NOT_ALLOWED, "peer p:1: spiffe://td.example/evil is not allowed"
    )
    assert flow.peer_id == EVIL  # logged with the identity it had


def test_outbound_identity_refusal_names_the_remote() -> None:
    flow = outbound()
    actions = run(flow, Accepted("a:1", REMOTE), Dialled(), HandshakeDone(None))
    assert actions[-2] == Reject(
        Reason.BAD_CERT, "remote db.internal:8443: peer certificate has no SPIFFE ID (URI SAN)"
    )


def test_a_pooled_stream_to_a_forbidden_destination_is_refused_with_its_reason() -> None:
    flow = inbound()
    why = (Reason.BAD_DESTINATION, "a pooled stream named 192.0.2.1:80, not ours")
    actions = run(flow, Accepted("10.0.0.7:5123", None, forbidden=why))
    assert actions[0] == Reject(*why)
    assert flow.done


def test_loop_detected_both_ways() -> None:
    a = run(inbound(), Accepted("p:1", None))
    assert a[0] == Reject(Reason.LOOP_DETECTED, "peer p:1: no original destination")
    b = run(outbound(), Accepted("a:1", None))
    assert b[0] == Reject(Reason.LOOP_DETECTED, "app a:1: original destination is this sidecar")


def test_connection_limit() -> None:
    actions = run(inbound(), Accepted("p:1", APP, admitted=False, limit_note="5 in this worker"))
    assert actions[0] == Reject(
        Reason.TOO_MANY_CONNECTIONS, "p:1: connection limit reached (5 in this worker)"
    )


def test_handshake_timeout_only_before_open() -> None:
    flow = inbound()
    run(flow, Accepted("p:1", APP))
    actions = flow.handle(HandshakeTimedOut())
    assert actions[0] == Reject(
        Reason.HANDSHAKE_TIMEOUT, "peer p:1 did not complete the TLS handshake within 10s"
    )
    late = inbound()
    open_inbound(late)
    assert late.handle(HandshakeTimedOut()) == []


def test_connect_and_close_is_not_counted() -> None:
    assert run(inbound(), Accepted("p:1", APP), ClosedBeforeHello(0)) == [
        Finish("closed_before_hello", abort=False)
    ]
    assert run(inbound(), Accepted("p:1", APP), ClosedBeforeHello(3))[0] == Reject(
        Reason.NOT_TLS, "peer p:1 sent 3 byte(s) and closed"
    )


def test_dial_failure() -> None:
    actions = run(
        inbound(), Accepted("p:1", APP), Sniffed(True), HandshakeDone(WEB), DialFailed("x", "y")
    )
    assert actions[-2:] == [
        UpstreamFailed("x", "y"),
        Finish("upstream_failed:x", abort=False, logged=True),
    ]


def test_idle_timeout_only_when_open() -> None:
    flow = inbound()
    run(flow, Accepted("p:1", APP))
    assert flow.handle(IdleTimeout()) == []
    open_inbound(flow)
    assert flow.handle(IdleTimeout()) == [Finish("idle_timeout", abort=False)]


def test_drain_timeout_cuts_with_reset() -> None:
    flow = outbound()
    open_outbound(flow)
    assert flow.handle(DrainTimeout()) == [Finish("drain_timeout", abort=True)]


def test_tls_alert_before_any_data_is_a_rejection() -> None:
    flow = outbound()
    open_outbound(flow)
    actions = flow.handle(TlsError(Reason.UNKNOWN_CA, "refused", "tlsv1 alert unknown ca", 0))
    assert actions[0] == Reject(Reason.UNKNOWN_CA, "refused")


def test_tls_error_after_data_cuts_the_connection() -> None:
    flow = inbound()
    open_inbound(flow)
    actions = flow.handle(TlsError(Reason.OTHER, "x", "bad record mac", 100))
    assert isinstance(actions[0], Warn) and "bad record mac" in actions[0].message
    assert actions[1] == Finish("tls_error:other", abort=True)
