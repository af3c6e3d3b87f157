"""Listening sockets and process limits: SO_REUSEPORT listeners shared by the workers, the
open-file limit, dropping privileges after binding."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket

from .config import Address
from .errors import StartupError

log = logging.getLogger("mtls.listen")


def bind_listener(addr: Address, count: int) -> list[socket.socket]:
    """`count` listening sockets sharing `addr` through SO_REUSEPORT, one per worker."""
    host = addr.host
    if host == "":
        family, bind_host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "")
    else:
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            bind_host = host
        except ValueError:
            try:
                info = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise StartupError(f"cannot listen on {addr}: {exc.strerror}") from None
            family, bind_host = info[0][0], str(info[0][4][0])

    def make(port: int, reuseport: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host == "":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((bind_host, port))
        except OSError:
            sock.close()
            raise
        return sock

    port = addr.port
    socks: list[socket.socket] = []
    try:
        if port:
            # Without SO_REUSEPORT, this bind fails if anyone listens there already (even a
            # second sidecar with SO_REUSEPORT, which would otherwise silently share the port).
            make(port, reuseport=False).close()
        for _ in range(count):
            sock = make(port, reuseport=True)
            socks.append(sock)
            # Port 0: the kernel picks one for the first socket; every worker shares it.
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        hint = ""
        if exc.errno == errno.EACCES:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        elif exc.errno == errno.EADDRINUSE:
            hint = " (another process is listening there)"
        raise StartupError(f"cannot listen on {addr}: {exc.strerror}{hint}") from None
    for sock in socks:
        sock.listen(4096)
        sock.set_inheritable(True)
    return socks


def relisten(sock: socket.socket) -> socket.socket:
    """`sock` if it is still listening, else a new listening socket on the same address (in
    the same SO_REUSEPORT group): a worker shuts its listeners down when it drains, and
    a worker that drained on its own (a stray SIGTERM) is restarted on fresh ones."""
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return sock
    new = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            new.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        new.bind(sock.getsockname())
        new.listen(4096)
    except OSError as exc:
        new.close()
        raise StartupError(f"cannot listen on {sock.getsockname()} again: {exc.strerror}") from None
    new.set_inheritable(True)
    sock.close()
    return new


def raise_nofile_limit(
    needed: int, setting: str = "MTLS_MAX_CONNECTIONS", per: str = " (2 per proxied connection)"
) -> int:
    """Raise the soft open-file limit to the hard one; warn when it stays below `needed`
    (what `setting` asks for). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("raised the open-file limit from %d to %d", soft, hard)
            soft = hard
    if soft < needed:
        log.warning(
            "open-file limit %d is below the %d that %s needs%s: raise it (ulimit -n) or lower %s",
            soft,
            needed,
            setting,
            per,
            setting,
        )
    return soft


def drop_privileges(uid: int) -> None:
    if os.getuid() == uid:
        return
    if os.getuid() != 0:
        raise StartupError(f"MTLS_DROP_PRIVILEGES: cannot switch to uid {uid} when not root")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    log.info("dropped privileges to uid %d", uid)
