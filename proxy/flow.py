"""One proxied connection as a pure state machine: events in, actions out (no I/O).

The relay's protocols report what happened on the wire as events (`Accepted`, `Sniffed`,
`HandshakeDone`, `Eof`, `Lost`, ...); `Flow.handle` answers with the actions to carry out
(`Dial`, `Open`, `SendEof`, `Reject`, `Finish`, ...). Bytes on an open connection never pass
through here: once `Open` is carried out, the two legs pump into each other directly.

Like h11, the flow says whose fault an ending was: `Reject` is the peer's (counted under a
reason), `UpstreamFailed` is the next hop's, `Finish` carries the outcome for the log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum

from .errors import PolicyDenied
from .identity import SpiffeId


class Direction(StrEnum):
    """Which way a route carries connections."""

    INBOUND = "inbound"  # mTLS from the network, plaintext to the local app
    OUTBOUND = "outbound"  # plaintext from the local app, mTLS to the remote


class Security(StrEnum):
    """Whether the network leg of a connection is mTLS or plaintext (the metric label)."""

    MTLS = "mtls"
    PLAINTEXT = "plaintext"


class Mode(StrEnum):
    """MTLS_INBOUND_MODE / MTLS_OUTBOUND_MODE (outbound knows strict and permissive only)."""

    STRICT = "strict"
    PERMISSIVE = "permissive"
    AUDIT = "audit"


class Reason(StrEnum):
    """Why a connection was refused: the `reason` label of mtls_connections_rejected_total."""

    NOT_TLS = "not_tls"
    NO_CLIENT_CERT = "no_client_cert"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED_CERT = "expired_cert"
    BAD_CERT = "bad_cert"
    REVOKED = "revoked"
    PEER_NOT_ALLOWED = "peer_not_allowed"
    POLICY_CHANGED = "policy_changed"  # a new policy file denies a connection already open
    POLICY_DENIED = "policy_denied"  # outbound: the policy file denies the destination/remote
    IDENTITY_MISMATCH = "identity_mismatch"
    TLS_VERSION = "tls_version"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    BAD_PROXY_HEADER = "bad_proxy_header"
    LOOP_DETECTED = "loop_detected"
    BAD_DESTINATION = "bad_destination"  # a pooled stream named an address not ours
    GOING_AWAY = "going_away"  # a pooled stream opened after we sent GOAWAY
    OTHER = "other"


# Refusals that judge who the peer is, after its certificate chain was verified: counted
# per peer identity too (mtls_peer_rejections_total) when the SPIFFE ID was read. Not
# unknown_ca: a federated domain's root vouching for an identity outside that domain is no
# identity to count under.
IDENTIFIED = frozenset(
    {
        Reason.PEER_NOT_ALLOWED,
        Reason.POLICY_DENIED,
        Reason.POLICY_CHANGED,
        Reason.REVOKED,
        Reason.EXPIRED_CERT,
        Reason.IDENTITY_MISMATCH,
    }
)


class Outcome(StrEnum):
    """How a connection ended: the first part of the `outcome` field of its log line."""

    OK = "ok"  # both sides ended their stream (FIN / close_notify both ways)
    CLOSED = "closed"  # a side went away without ending its stream first
    APP_RESET = "app_reset"
    PEER_RESET = "peer_reset"
    REJECTED = "rejected"
    UPSTREAM_FAILED = "upstream_failed"
    TLS_ERROR = "tls_error"
    IDLE_TIMEOUT = "idle_timeout"
    DRAIN_TIMEOUT = "drain_timeout"
    REVOKED = "revoked"  # the peer's certificate was revoked while the connection was open
    POLICY_CHANGED = "policy_changed"  # a new policy file denies the peer of an open connection
    CLOSED_BEFORE_HELLO = "closed_before_hello"
    INTERNAL_ERROR = "internal_error"  # the sidecar failed handling it (a bug): reset, logged


class Side(StrEnum):
    """The two legs of a connection."""

    NET = "net"  # crosses the network (TLS, or plaintext where allowed)
    APP = "app"  # the local application


class State(Enum):
    """Where a connection is in its life."""

    NEW = "new"
    SNIFFING = "sniffing"  # inbound: waiting for the first bytes (TLS or not?)
    HANDSHAKE = "handshake"
    DIALING = "dialing"  # dialling the app (inbound) or the remote (outbound)
    OPEN = "open"  # relaying
    DONE = "done"


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """A connection arrived: the network leg (inbound) or the app leg (outbound).

    `target` is where it goes: the route's target, or in transparent mode the original
    destination (None: there is none, or it is this sidecar: a loop). `admitted` is False
    when the connection limit is reached. `plaintext_known`: outbound permissive only, the
    target was seen without mTLS recently, so dial it in plaintext straight away.
    `forbidden`: a stream on a pooled connection named a destination we refuse, and why.
    """

    peer: str
    target: tuple[str, int] | None
    admitted: bool = True
    plaintext_known: bool = False
    limit_note: str = ""
    forbidden: tuple[Reason, str] | None = None


@dataclass(frozen=True, slots=True)
class Sniffed:
    """Inbound: the first bytes decided it. `tls` False means plaintext (`preview` its start)."""

    tls: bool
    preview: bytes = b""


@dataclass(frozen=True, slots=True)
class ClosedBeforeHello:
    """Inbound: the peer closed before we could tell TLS from plaintext."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The TLS handshake completed; `peer` is the SPIFFE ID of the peer certificate, if any."""

    peer: SpiffeId | None
    resumed: bool = False
    revoked_serial: str | None = None  # the peer's certificate is on a CRL (its serial)
    expired_at: str | None = None  # the peer's certificate has expired (a resumed session)
    expired_note: str = ""  # why an expired certificate got this far, for the log line


@dataclass(frozen=True, slots=True)
class Revoked:
    """A new CRL lists the peer certificate of this connection (serial in hex)."""

    serial: str


@dataclass(frozen=True, slots=True)
class PolicyChanged:
    """A new policy file denies this connection's peer (`message` says by which rule)."""

    message: str


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """The TLS handshake failed, classified from the real error (`reason`, `message`).

    `no_tls`: what answered does not speak TLS at all (outbound permissive falls back).
    """

    reason: Reason
    message: str
    no_tls: bool = False


@dataclass(frozen=True, slots=True)
class HandshakeTimedOut:
    """The handshake (or, inbound, the first bytes) did not come in time."""


@dataclass(frozen=True, slots=True)
class Dialled:
    """The next hop (app inbound, remote outbound) accepted our TCP connection."""


@dataclass(frozen=True, slots=True)
class DialFailed:
    """The next hop could not be reached; `reason` is the metric label."""

    reason: str
    text: str


@dataclass(frozen=True, slots=True)
class Eof:
    """`side` ended its stream (TCP FIN; close_notify or FIN on a TLS leg)."""

    side: Side


@dataclass(frozen=True, slots=True)
class Lost:
    """`side`'s transport is gone; `error` when it was reset or failed, not closed."""

    side: Side
    error: bool


@dataclass(frozen=True, slots=True)
class TlsError:
    """A TLS error on the network leg after the handshake (an alert, a bad record)."""

    reason: Reason
    message: str
    detail: str
    bytes_in: int


@dataclass(frozen=True, slots=True)
class ProxyHeaderFailed:
    """A PROXY v2 header could not be read from the caller (outbound, behind a load
    balancer: `bad_proxy_header`) or written for the app (inbound)."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class IdleTimeout:
    """Nothing moved for MTLS_IDLE_TIMEOUT."""


@dataclass(frozen=True, slots=True)
class DrainTimeout:
    """The sidecar is stopping and MTLS_DRAIN_TIMEOUT has passed."""


Event = (
    Accepted
    | Sniffed
    | ClosedBeforeHello
    | HandshakeDone
    | HandshakeFailed
    | HandshakeTimedOut
    | Dialled
    | DialFailed
    | Eof
    | Lost
    | TlsError
    | Revoked
    | PolicyChanged
    | ProxyHeaderFailed
    | IdleTimeout
    | DrainTimeout
)


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTls:
    """Begin the TLS handshake on the network leg (inbound: with the sniffed bytes)."""


@dataclass(frozen=True, slots=True)
class AcceptPlaintext:
    """Inbound permissive/audit: take the network leg as plaintext (hold it until relaying)."""


@dataclass(frozen=True, slots=True)
class Warn:
    """Log a warning about this connection (e.g. audit mode's "would be rejected")."""

    event: str
    message: str


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to the next hop: the app (inbound) or the remote, with TLS or not (outbound)."""

    host: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class Fallback:
    """Outbound permissive: the remote speaks no TLS; remember it and drop the TLS leg."""

    host: str
    port: int
    message: str


@dataclass(frozen=True, slots=True)
class Open:
    """Both legs are up: count the connection and relay in both directions.

    `eof_to_net`: the app already ended its stream while the remote was being dialled.
    """

    security: Security
    peer: SpiffeId | None
    eof_to_net: bool = False


@dataclass(frozen=True, slots=True)
class SendEof:
    """Half-close towards `side` (the other side ended its stream)."""

    side: Side


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the connection: one counter under `reason`, one log line, a clean close."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The next hop could not be reached: one counter, one log line, a clean close."""

    reason: str
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Close both legs (`abort`: with RST, so a cut stream looks cut) and end the connection.

    `logged`: a Reject/UpstreamFailed already wrote this connection's log line.
    """

    outcome: str
    abort: bool
    logged: bool = False


Action = (
    StartTls
    | AcceptPlaintext
    | Warn
    | Dial
    | Fallback
    | Open
    | SendEof
    | Reject
    | UpstreamFailed
    | Finish
)

PeerCheck = Callable[[SpiffeId | None], None]
"""The identity policy for one route: returns, or raises PolicyDenied (pure)."""


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """What a connection's flow needs to know about its route; built once per route."""

    direction: Direction
    route: str
    mode: Mode
    handshake_timeout: float


def _side_word(side: Side) -> str:
    return "app" if side is Side.APP else "peer"


class Flow:
    """The life of one proxied connection, from accept to close, without any I/O.

    `handle(event)` returns the actions to carry out, in order. After a `Finish` every
    further event is ignored (returns no actions), so late callbacks of closing transports
    are harmless.
    """

    __slots__ = (
        "app_eof",
        "check_peer",
        "config",
        "net_eof",
        "peer",
        "peer_id",
        "security",
        "state",
        "target",
    )

    def __init__(self, config: FlowConfig, check_peer: PeerCheck) -> None:
        self.config = config
        self.check_peer = check_peer
        self.state = State.NEW
        self.security = Security.MTLS
        self.peer = "?"
        self.peer_id: SpiffeId | None = None
        self.target: tuple[str, int] | None = None
        self.net_eof = False
        self.app_eof = False

    @property
    def done(self) -> bool:
        """Whether the connection has ended."""
        return self.state is State.DONE

    @property
    def inbound(self) -> bool:
        return self.config.direction is Direction.INBOUND

    def who(self) -> str:
        """The other party in words, for log sentences: "peer 10.0.0.7:5123" / "remote x:443"."""
        if self.inbound:
            return f"peer {self.peer}"
        host, port = self.target or ("?", 0)
        return f"remote {host}:{port}"

    # --- the machine ------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Advance on `event`; the actions to carry out, in order."""
        if self.state is State.DONE:
            return []
        match event:
            case Accepted():
                return self._accepted(event)
            case Sniffed():
                return self._sniffed(event)
            case ClosedBeforeHello(nbytes=nbytes):
                if nbytes:
                    return self._reject(
                        Reason.NOT_TLS, f"peer {self.peer} sent {nbytes} byte(s) and closed"
                    )
                # A TCP connect-and-close (port probe, load balancer check): nothing to count.
                return self._finish(Outcome.CLOSED_BEFORE_HELLO, abort=False)
            case HandshakeDone():
                return self._handshake_done(event)
            case HandshakeFailed():
                return self._handshake_failed(event)
            case HandshakeTimedOut():
                if self.state not in (State.SNIFFING, State.HANDSHAKE):
                    return []
                timeout = self.config.handshake_timeout
                return self._reject(
                    Reason.HANDSHAKE_TIMEOUT,
                    f"{self.who()} did not complete the TLS handshake within {timeout:g}s",
                )
            case Dialled():
                return self._dialled()
            case DialFailed(reason=reason, text=text):
                self.state = State.DONE
                outcome = _joined(Outcome.UPSTREAM_FAILED, reason)
                return [UpstreamFailed(reason, text), Finish(outcome, abort=False, logged=True)]
            case Eof(side=side):
                return self._eof(side)
            case Lost(side=side, error=error):
                if error:
                    return self._finish(f"{_side_word(side)}_reset", abort=True)
                outcome = Outcome.OK if self.net_eof or self.app_eof else Outcome.CLOSED
                return self._finish(outcome, abort=False)
            case TlsError():
                return self._tls_error(event)
            case Revoked(serial=serial):
                who = f"{self.who()} ({self.peer_id or 'no SPIFFE ID'}, serial {serial})"
                if self.state is not State.OPEN:
                    return self._reject(Reason.REVOKED, f"{who}: the certificate was revoked")
                actions: list[Action] = [
                    Warn("revoked", f"closing the connection with {who}: certificate revoked")
                ]
                return actions + self._finish(Outcome.REVOKED, abort=True)
            case PolicyChanged(message=message):
                if self.state is not State.OPEN:
                    return self._reject(Reason.POLICY_CHANGED, f"{self.who()}: {message}")
                closing = f"closing the connection with {self.who()}: {message}"
                warn = Warn("policy_changed", closing)
                return [warn, *self._finish(Outcome.POLICY_CHANGED, abort=True)]
            case ProxyHeaderFailed(reason=reason, message=message):
                if self.state is State.OPEN:
                    return []
                return self._reject(reason, message)
            case IdleTimeout():
                if self.state is not State.OPEN:
                    return []
                return self._finish(Outcome.IDLE_TIMEOUT, abort=False)
            case DrainTimeout():
                return self._finish(Outcome.DRAIN_TIMEOUT, abort=True)
        raise TypeError(f"not a flow event: {event!r}")  # pragma: no cover

    def _accepted(self, event: Accepted) -> list[Action]:
        self.peer = event.peer
        self.target = event.target
        if event.forbidden is not None:
            return self._reject(*event.forbidden)
        if event.target is None:
            if self.inbound:
                message = f"peer {self.peer}: no original destination"
            else:
                message = f"app {self.peer}: original destination is this sidecar"
            return self._reject(Reason.LOOP_DETECTED, message)
        if not event.admitted:
            note = f" ({event.limit_note})" if event.limit_note else ""
            return self._reject(
                Reason.TOO_MANY_CONNECTIONS, f"{self.peer}: connection limit reached{note}"
            )
        if self.inbound:
            self.state = State.SNIFFING
            return []
        host, port = event.target
        tls = not (self.config.mode is Mode.PERMISSIVE and event.plaintext_known)
        if not tls:
            self.security = Security.PLAINTEXT
        self.state = State.DIALING
        return [Dial(host, port, tls)]

    def _sniffed(self, event: Sniffed) -> list[Action]:
        if self.state is not State.SNIFFING:
            return []
        if event.tls:
            self.state = State.HANDSHAKE
            return [StartTls()]
        mode = self.config.mode
        if mode is Mode.STRICT:
            preview = event.preview[:16].decode("ascii", "replace")
            return self._reject(
                Reason.NOT_TLS,
                f"peer {self.peer} sent plaintext ({preview!r}...) to an mTLS-only port",
            )
        self.security = Security.PLAINTEXT
        actions: list[Action] = []
        if mode is Mode.AUDIT:
            actions.append(
                Warn(
                    "audit_plaintext",
                    f"plaintext connection from {self.peer} accepted (audit mode): it would "
                    "be rejected in strict mode",
                )
            )
        actions.append(AcceptPlaintext())
        return actions + self._dial_app()

    def _dial_app(self) -> list[Action]:
        assert self.target is not None
        self.state = State.DIALING
        return [Dial(self.target[0], self.target[1], tls=False)]

    def _handshake_done(self, event: HandshakeDone) -> list[Action]:
        if self.state not in (State.HANDSHAKE, State.DIALING):
            return []
        self.peer_id = event.peer
        refusal = self.judge(event.peer, event.revoked_serial, event.expired_at, event.expired_note)
        if refusal is not None:
            return self._reject(*refusal)
        if self.inbound:
            return self._dial_app()
        return self._open()

    def judge(
        self,
        peer: SpiffeId | None,
        revoked_serial: str | None = None,
        expired_at: str | None = None,
        expired_note: str = "",
    ) -> tuple[Reason, str] | None:
        """Why this peer may not connect (None: it may): its certificate revoked or expired,
        or the identity policy. Also asked inside the handshake (conn.verify_peer), so the
        peer gets the refusal as a TLS alert."""
        if revoked_serial is not None:
            return (
                Reason.REVOKED,
                f"{self.who()} presented certificate serial {revoked_serial} "
                f"({peer or 'no SPIFFE ID'}), which is revoked",
            )
        if expired_at is not None:
            # A resumed session carries the certificate of its first handshake, and a pooled
            # connection's streams the certificate of its handshake: checked again here, since
            # neither verifies the certificate again. `expired_note` says which.
            note = f" ({expired_note})" if expired_note else ""
            return (
                Reason.EXPIRED_CERT,
                f"{self.who()} presented a certificate that expired at {expired_at}{note}",
            )
        try:
            self.check_peer(peer)
        except PolicyDenied as exc:
            return Reason(exc.reason), f"{self.who()}: {exc}"
        return None

    def _handshake_failed(self, event: HandshakeFailed) -> list[Action]:
        if self.state not in (State.HANDSHAKE, State.DIALING, State.SNIFFING):
            return []
        if (
            not self.inbound
            and self.config.mode is Mode.PERMISSIVE
            and self.security is Security.MTLS
            and event.no_tls
            and self.target is not None
        ):
            # Permissive outbound: the destination has no sidecar. Carry this connection in
            # plaintext; the app leg has not been read yet.
            host, port = self.target
            self.security = Security.PLAINTEXT
            self.state = State.DIALING
            message = (
                f"remote {host}:{port} does not speak mTLS: falling back to plaintext "
                "(permissive mode)"
            )
            return [Fallback(host, port, message), Dial(host, port, tls=False)]
        return self._reject(event.reason, event.message)

    def _dialled(self) -> list[Action]:
        if self.state is not State.DIALING:
            return []
        if self.inbound or self.security is Security.PLAINTEXT:
            return self._open()
        self.state = State.HANDSHAKE  # outbound TLS: the client handshake starts now
        return [StartTls()]

    def _open(self) -> list[Action]:
        self.state = State.OPEN
        actions: list[Action] = [Open(self.security, self.peer_id, eof_to_net=self.app_eof)]
        if self.app_eof and self.net_eof:
            actions += self._finish(Outcome.OK, abort=False)
        return actions

    def _eof(self, side: Side) -> list[Action]:
        if side is Side.APP:
            self.app_eof = True
            if self.state is not State.OPEN:
                return []  # outbound: carried across by Open(eof_to_net=True)
            actions: list[Action] = [SendEof(Side.NET)]
        else:
            self.net_eof = True
            actions = [SendEof(Side.APP)] if self.state is State.OPEN else []
        if self.net_eof and self.app_eof:
            actions += self._finish(Outcome.OK, abort=False)
        return actions

    def _tls_error(self, event: TlsError) -> list[Action]:
        if self.state is not State.OPEN or event.bytes_in == 0:
            # With TLS 1.3 a server checks our certificate after our side of the handshake
            # is done: its refusal arrives as an alert before any data. Count it as such;
            # the app, which may have sent its request already, sees the stream cut.
            return self._reject(event.reason, event.message, abort=self.state is State.OPEN)
        actions: list[Action] = [
            Warn("tls_error", f"TLS error on an open connection with {self.who()}: {event.detail}")
        ]
        return actions + self._finish(_joined(Outcome.TLS_ERROR, event.reason), abort=True)

    def _reject(self, reason: Reason, message: str, *, abort: bool = False) -> list[Action]:
        self.state = State.DONE
        return [
            Reject(reason, message),
            Finish(_joined(Outcome.REJECTED, reason), abort=abort, logged=True),
        ]

    def _finish(self, outcome: str, *, abort: bool) -> list[Action]:
        self.state = State.DONE
        return [Finish(str(outcome), abort=abort)]


def _joined(outcome: Outcome, detail: str) -> str:
    return f"{outcome}:{detail}"
