"""Child processes of the benchmark: start, wait for listeners, measure RSS, always stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


class BenchError(Exception):
    """A measurement could not be made; the message says which process and why."""


@dataclass
class Managed:
    """One child process (and its process group) owned by a ProcessSet."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the process wrote (stdout and stderr together)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcessSet:
    """Owns every process the benchmark starts; `close()` (or leaving `with`) kills them all."""

    logdir: Path
    procs: list[Managed] = field(default_factory=list)
    _counter: int = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Managed:
        """Start `argv` in its own session, output to a log file in `logdir`."""
        self._counter += 1
        log = self.logdir / f"{self._counter:03d}-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                # Own process group: stopping it also stops any workers it forked.
                start_new_session=True,
            )
        managed = Managed(name=name, popen=popen, log=log)
        self.procs.append(managed)
        return managed

    def run(
        self,
        name: str,
        argv: Sequence[str],
        timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run a client tool to completion; return its output, or raise BenchError."""
        proc = self.start(name, argv, env=env)
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{name} did not finish within {timeout:.0f} s") from exc
        finally:
            self.stop(proc)
        output = proc.log.read_text(errors="replace")
        if rc != 0:
            raise BenchError(f"{name} exited with {rc}: {proc.log_tail()}")
        return output

    def stop(self, proc: Managed, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        if proc in self.procs:
            self.procs.remove(proc)
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=grace)
        # Workers may outlive their parent: kill what is left of the group either way.
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=grace)

    def close(self) -> None:
        """Stop every process still owned, newest first."""
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _signal_group(proc: Managed, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def server_port_range() -> tuple[int, int]:
    """Ports for servers started by the benchmark and the tests: below the kernel's
    ephemeral range when there is room there (10000 up to it), else above it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (10000, low - 1) if low > 20000 else (61000, 65535)


class PortAllocator:
    """Hands out free loopback TCP ports, never the same one twice in a run.

    They come from below the kernel's ephemeral range: a port from bind(0) can be taken as
    the local port of any outgoing connection (wrk opens thousands) between the moment it is
    chosen and the moment the proxy binds it."""

    def __init__(self) -> None:
        self._given: set[int] = set()
        self._low, self._high = server_port_range()
        self._next = self._low + (os.getpid() * 104729) % (self._high - self._low)

    def get(self) -> int:
        for _ in range(self._high - self._low):
            port = self._next
            self._next = self._low if port >= self._high else port + 1
            if port in self._given:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            self._given.add(port)
            return port
        raise BenchError("no free loopback port found")


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this host (from /proc/net/tcp{,6}), no connection made."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(ports: Iterable[int], procs: Sequence[Managed], timeout: float) -> None:
    """Wait until every port listens; fail early with the log if a process died."""
    wanted = set(ports)
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            if not proc.alive():
                raise BenchError(
                    f"{proc.name} exited with {proc.popen.returncode} before listening:\n"
                    f"{proc.log_tail()}"
                )
        missing = wanted - listening_ports()
        if not missing:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in procs)
            raise BenchError(
                f"ports {sorted(missing)} not listening after {timeout:.0f} s\n{tails}"
            )
        time.sleep(0.05)


def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        rest = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(rest[1])
    return parents


def process_tree(roots: Iterable[int]) -> set[int]:
    """The given pids and all their descendants."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [pid for pid in roots if pid in parents]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
    return seen


def rss_kb(roots: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) of the given processes and all their descendants."""
    total = 0
    for pid in process_tree(roots):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU time (all threads) of the given processes and their descendants."""
    ticks = 0
    for pid in process_tree(roots):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        # Fields 14 and 15 of stat (utime, stime), counted from 1 with pid and comm first.
        ticks += int(rest[11]) + int(rest[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard limit (inherited by children); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
