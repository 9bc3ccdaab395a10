"""
What the kernel and Twisted hold for a socket: the socket under a (TLS,
web-proxy) transport, its C{TCP_NODELAY}, the bytes a transport has not yet
written, a loopback port free a moment ago, and waiting until a child
process listens on one.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

__all__ = ["buffered", "lasting_port", "listening", "no_delay", "tcp_socket", "unused_port"]


def tcp_socket(transport: Any) -> socket.socket:
    """
    The socket under C{transport}, through the TLS and web-proxy layers
    (each of which keeps the transport it runs over as C{.transport}).
    """
    for _ in range(6):
        handle = transport.getHandle()
        if isinstance(handle, socket.socket):
            return handle
        transport = transport.transport
    raise AssertionError(f"no socket under {transport!r}")


def no_delay(transport: Any) -> bool:
    """C{TCP_NODELAY} as the kernel has it on the socket under C{transport}."""
    sock = tcp_socket(transport)
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def buffered(transport: Any) -> int:
    """
    Bytes a Twisted socket transport holds, not yet written to its socket.

    Twisted has no public API for this, so for measurement only it reads
    C{FileDescriptor}'s buffer attributes.
    """
    if transport is None:
        return 0
    inner = getattr(transport, "transport", None)
    if inner is not None and not hasattr(transport, "dataBuffer"):
        return buffered(inner)
    return len(getattr(transport, "dataBuffer", b"")) + int(
        getattr(transport, "_tempDataLen", 0)
    )


def unused_port() -> int:
    """
    A loopback port that nothing listened on a moment ago, for a test that
    must name a fixed port (a C{--config-dir} mapping) or find nothing
    there. The kernel hands out ephemeral ports in turn, so another taker
    in between is unlikely.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lasting_port() -> int:
    """
    A free loopback port below the kernel's ephemeral range, for a listener
    that must come back on the same port after a restart: no outgoing
    connection can be given it while the listener is down, as one could an
    L{unused_port}.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(1024, low - 8192), low))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


async def listening(
    port: int, ended: Callable[[], bool], timeout: float = 30, interval: float = 0.05
) -> bool:
    """
    Wait until something accepts connections on 127.0.0.1:C{port}, probing
    every C{interval} seconds, for a child process started to listen there.

    @param ended: whether that process has ended (then waiting is over).
    @return: whether the port accepted before C{ended} or C{timeout}.
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
    while reactor.seconds() < deadline and not ended():  # type: ignore[attr-defined]
        try:
            probe = await endpoint.connect(Factory.forProtocol(Protocol))
        except Exception:
            await deferLater(reactor, interval, lambda: None)
            continue
        assert probe.transport is not None
        probe.transport.loseConnection()
        return True
    return False
