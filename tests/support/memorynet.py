"""
The network of a L{MemoryReactorClock} for endpoint unit tests: a resolver
that knows a few names, a C{StringTransport} that takes C{TCP_NODELAY} like
a TCP transport, and an endpoint that connects at once over a given
transport.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHostnameResolver, ITCPTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer  # type: ignore[import-untyped]

__all__ = ["ImmediateEndpoint", "Resolver", "TCPStringTransport"]


@implementer(IHostnameResolver)
class Resolver:
    """
    Resolves a few names to fixed addresses, and IP literals to
    themselves.
    """

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver: Any, hostName: str, portNumber: int = 0,
        addressTypes: Any = None, transportSemantics: str = "TCP",
    ) -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        try:
            ip_address(hostName)
            found = [hostName]
        except ValueError:
            found = self.names.get(hostName, [])
        for text in found:
            kind = IPv6Address if ":" in text else IPv4Address
            receiver.addressResolved(kind("TCP", text, portNumber))
        receiver.resolutionComplete()


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """
    A L{StringTransport} that, like a TCP transport, takes C{TCP_NODELAY}.
    """

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay


class ImmediateEndpoint:
    """
    An endpoint that connects at once to C{transport}.
    """

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self.factory: Any = None
        self.protocol: Any = None

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)
