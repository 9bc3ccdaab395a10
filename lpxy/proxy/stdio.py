# -*- test-case-name: tests.test_stdio -*-
"""
C{--stdio SERVICE_ID}: a source that carries exactly one connection over
its standard input and output instead of listening, as C{ssh -o
ProxyCommand} wants it, then ends.

The connection is an ordinary relay (L{lpxy.proxy.relay}) whose transport
is Twisted's C{StandardIO}, so the flow control is the relay's: standard
input is not read while the WebSocket is full, and the WebSocket is not
read while standard output is backed up.

The wire has no half-close (protocol.md section 4), so an end either way
ends the connection both ways, as a TCP client's end-of-file does: at the
end of standard input (or when standard output is closed) what was read is
already sent, the peer gets the reset, and what the tunnel delivered is
written out before standard output closes; when the peer ends the stream,
standard output gets everything delivered, then end-of-file, and standard
input is no longer read. L{StdioSource.closed} fires once standard output
is flushed and closed, so the process does not exit over unwritten bytes.
Twisted's C{StandardIO} leaves the descriptors open; once the connection
is gone they are pointed at C{/dev/null} (L{standard_io}), so the reader of
standard output sees its end then, not only at the process's exit, and
nothing written later can reach a descriptor the process reuses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._ws import Clock
from lpxy.proxy.channel import ServiceBinding
from lpxy.proxy.relay import LocalRelay

__all__ = ["FLUSH_TIMEOUT", "OpenStdio", "StdioRelay", "StdioSource", "standard_io"]

#: Seconds the process waits at its end for standard output to take what
#: the tunnel delivered.
FLUSH_TIMEOUT = 10.0

#: How logs name the connection.
PEER = "standard input and output"


#: Gives a protocol its transport; returns what lets the descriptors go once
#: the connection is gone.
OpenStdio = Callable[[Protocol], Callable[[], None]]


def standard_io(reactor: Any, stdin: int = 0, stdout: int = 1) -> OpenStdio:
    """
    The process's standard input and output as a protocol's transport;
    once it is gone, both descriptors are pointed at C{/dev/null}.
    """

    def open_stdio(protocol: Protocol) -> Callable[[], None]:
        from twisted.internet.stdio import StandardIO

        make: Any = StandardIO
        if (stdin, stdout) == (0, 1):
            # Windows' StandardIO knows only the process's own.
            make(protocol, reactor=reactor)
        else:
            make(protocol, stdin=stdin, stdout=stdout, reactor=reactor)

        def release() -> None:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for fd in (stdin, stdout):
                    os.dup2(null, fd)
            finally:
                os.close(null)

        return release

    return open_stdio


@implementer(IHalfCloseableProtocol)
class StdioRelay(LocalRelay):
    """
    The relay of the one C{--stdio} connection: its transport's two halves
    close apart, and either one's end ends the connection (module
    docstring).

    @ivar ended: fires once the transport is gone (standard output flushed
        and closed).
    """

    _log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended: Deferred[None] = Deferred()

    def readConnectionLost(self) -> None:
        """End of standard input."""
        self._log.info("End of standard input: ending the stream")
        self._end_both()

    def writeConnectionLost(self) -> None:
        """Standard output was closed by its reader."""
        self._log.info("Standard output was closed: ending the stream")
        self._end_both()
        # Nothing is left to flush, and StandardIO, stopping its reading,
        # would not learn of an end of standard input to report the loss.
        transport: Any = self.transport
        if transport is not None and not transport.disconnected:
            transport.connectionLost(Failure(ConnectionDone("standard output closed")))

    def _end_both(self) -> None:
        if self._closing:
            # Already ending: standard output is being flushed.
            return
        self._closing = True
        self._flow.remove_relay(self)
        self._sink.local_closed(self.channel)
        self._end_local(self.transport)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.ended.called:
            self.ended.callback(None)


class StdioSource:
    """
    The C{--stdio} connection's place in a source proxy: which service it
    carries, and its relay once the tunnel is ready.

    @param service_id: C{--stdio}'s service id.
    @param open_stdio: gives a protocol its transport (by default
        L{standard_io}); called once, and what it returns once the
        connection is gone.
    @param clock: for L{closed}'s time limit.
    """

    _log = Logger()

    def __init__(
        self, service_id: str, open_stdio: OpenStdio, clock: Clock
    ) -> None:
        self.service_id = service_id
        self._open = open_stdio
        self._clock = clock
        self.relay: StdioRelay | None = None

    @property
    def started(self) -> bool:
        """Whether the connection has begun (it is never begun twice)."""
        return self.relay is not None

    @property
    def active(self) -> bool:
        """Whether the stream is open: neither end has ended it yet."""
        return self.relay is not None and self.relay.channel.open

    def binding(self, bindings: Sequence[ServiceBinding]) -> ServiceBinding | None:
        """The service C{--stdio} names among the tunnel's C{bindings}."""
        return next((b for b in bindings if b.key == self.service_id), None)

    def start(self, relay: StdioRelay) -> None:
        """Carry the connection on C{relay}: standard input is read from now."""
        relay.peer_description = PEER
        self.relay = relay
        release = self._open(relay)
        relay.ended.addCallback(lambda _: release())

    def closed(self, timeout: float = FLUSH_TIMEOUT) -> Deferred[None]:
        """
        Fires once standard output is flushed and closed (at once if the
        connection never began), or after C{timeout} seconds.
        """
        relay = self.relay
        if relay is None or relay.ended.called:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def give_up() -> None:
            self._log.warn(
                "Standard output took nothing for {timeout}s: exiting without"
                " writing the rest",
                timeout=timeout,
            )
            done.callback(None)

        call = self._clock.callLater(timeout, give_up)

        def flushed(result: None) -> None:
            if call.active():
                call.cancel()
                done.callback(None)

        relay.ended.addCallback(flushed)
        return done
