"""Open-connection counts shared by the master and its workers, for one MTLS_MAX_CONNECTIONS
total across all worker processes.

One 8-byte slot per worker in a memory-backed file (memfd) that every process maps; each
worker writes only its own slot, so no lock is needed, and admission reads the sum. Two
workers admitting at the very same instant may exceed the limit by at most workers - 1.
"""

from __future__ import annotations

import mmap
import os

_SLOT = 8


class ConnectionCounts:
    """The per-worker open-connection counts of one sidecar."""

    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        self._map = mmap.mmap(fd, _SLOT * workers)
        self._slots = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, workers: int) -> ConnectionCounts:
        """New zeroed counts (in the master); `fd` is inherited by the workers."""
        fd = os.memfd_create("mtls-connections", 0)
        os.ftruncate(fd, _SLOT * workers)
        os.set_inheritable(fd, True)
        return cls(fd, workers)

    def set(self, slot: int, count: int) -> None:
        """Worker `slot` holds `count` open connections now."""
        self._slots[slot] = count

    def total(self) -> int:
        """Open connections in all workers."""
        return sum(self._slots)
