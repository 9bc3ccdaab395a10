# -*- test-case-name: tests.test_admission -*-
"""
How many connections the service holds, per client address and in all.

Every connection costs a descriptor; a client that opens sockets and sends
nothing could take them all, and then no API call and no handshake finds
one. L{Admission} keeps the count below limits chosen under the process's
descriptor limit (L{default_max_connections}), so that some are always left.
"""

from __future__ import annotations

import resource
from collections.abc import Hashable

__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_ADDRESS",
    "DESCRIPTOR_RESERVE",
    "Admission",
    "default_max_connections",
]

DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 256
DESCRIPTOR_RESERVE = 64
# When the descriptor limit is unlimited (or absurdly high).
_UNLIMITED_TOTAL = 65536


def default_max_connections(soft_limit: int | None = None) -> int:
    """
    Connections allowed in all: the soft descriptor limit (the process's
    unless given) less L{DESCRIPTOR_RESERVE} for the store, logs, listening
    ports and the accepts that are refused; at least 1.
    """
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return _UNLIMITED_TOTAL
    return max(1, min(soft_limit, _UNLIMITED_TOTAL) - DESCRIPTOR_RESERVE)


class Admission:
    """
    Counts open connections by client address and in all, and refuses one
    over either limit.

    @param max_connections: connections allowed at once, from all addresses.
    @param max_per_address: connections allowed at once from one address.
    """

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._address_of: dict[Hashable, str] = {}
        self._per_address: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Connections admitted and not yet released."""
        return len(self._address_of)

    def count(self, address: str) -> int:
        """Connections admitted from C{address} and not yet released."""
        return self._per_address.get(address, 0)

    def admit(self, key: Hashable, address: str) -> str | None:
        """
        Admit the connection C{key} from C{address}, or say why not.

        @return: L{None} if admitted (count it until L{release}), else the
            reason for the refusal.
        """
        if key in self._address_of:
            return None
        if self.total >= self.max_connections:
            return f"{self.max_connections} connections open in all"
        if self.count(address) >= self.max_per_address:
            return f"{self.max_per_address} connections open from {address}"
        self._address_of[key] = address
        self._per_address[address] = self.count(address) + 1
        return None

    def release(self, key: Hashable) -> None:
        """The connection C{key} is gone (nothing if it was never admitted)."""
        address = self._address_of.pop(key, None)
        if address is None:
            return
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]
