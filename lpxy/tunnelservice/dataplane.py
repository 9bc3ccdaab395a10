# -*- test-case-name: tests.test_websocket_service -*-
"""
The data plane's factory: what every tunnel end's WebSocket shares (the
broker, the registry of open connections, the liveness and flow-control
settings) and Autobahn's options for the tunnel service's side of the wire.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory

from lpxy._ws import Clock, ClockTimer, quiet_autobahn_log
from lpxy.frames import WIRE_FRAME_LIMIT
from lpxy.tunnelservice.bandwidth import TunnelRates
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.flow import DEFAULT_OUTPUT_MARK
from lpxy.tunnelservice.websocket import TunnelServerProtocol

if TYPE_CHECKING:
    from lpxy.tunnelservice.service import Connections

__all__ = [
    "CLOSE_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_PING_INTERVAL",
    "TunnelServerFactory",
]

DEFAULT_PING_INTERVAL = 30.0
DEFAULT_IDLE_TIMEOUT = 90.0

CLOSE_HANDSHAKE_TIMEOUT = 5.0
"""
Seconds a peer has to answer a close the service sends (CloseTunnel,
rotation, expiry, shutdown) before its connection is dropped.

The timer starts when the close is queued, behind up to the output mark of
relayed data still on its way to that peer, so a slow link or a busy event
loop can delay the answer past Autobahn's default of 1 s; the peer would
then see 1006 instead of the close's code (a proxy exits 2, not 0). Five
seconds leaves room for that while keeping a service's shutdown, which
waits for every connection to go, bounded by it.
"""


class TunnelServerFactory(WebSocketServerFactory):
    """
    Builds L{TunnelServerProtocol}s for one L{Broker}.

    @param broker: decides which handshakes succeed and pairs the peers.
    @param connections: where the open connections are kept.
    @param reactor: the reactor (tests pass their own).
    @param clock: the time source of the liveness checks and of Autobahn's
        handshake timeouts (the reactor unless given).
    @param ping_interval: seconds of silence after which a peer is pinged.
    @param idle_timeout: seconds of silence after which a peer is dropped.
    @param output_mark: bytes written to a peer after its transport's buffer
        passed the high-water mark before the peer is not read any more.
    @param tunnel_rates: the tunnels' bandwidth buckets, if tunnels have a
        bandwidth limit.
    """

    protocol = TunnelServerProtocol  # type: ignore[assignment]
    log = quiet_autobahn_log()

    def __init__(
        self,
        broker: Broker,
        connections: Connections,
        reactor: Any = None,
        clock: Clock | None = None,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        output_mark: int = DEFAULT_OUTPUT_MARK,
        tunnel_rates: TunnelRates | None = None,
    ) -> None:
        if not 0 < ping_interval < idle_timeout:
            raise ValueError("need 0 < ping_interval < idle_timeout")
        super().__init__(server="lpxy-tunnelservice", reactor=reactor)
        self.broker = broker
        self.clock: Clock = clock if clock is not None else self.reactor
        # txaio would put them on the global reactor, whatever we pass.
        self._batched_timer = ClockTimer(self.clock)
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.output_mark = output_mark
        self.tunnel_rates = tunnel_rates
        self.connections = connections
        #: Refused handshakes, by HTTP status.
        self.refusals: Counter[int] = Counter()
        self.setProtocolOptions(
            maxFramePayloadSize=WIRE_FRAME_LIMIT,
            maxMessagePayloadSize=WIRE_FRAME_LIMIT,
            autoFragmentSize=0,
            utf8validateIncoming=False,
            failByDrop=False,
            # Our own liveness check instead, which counts any bytes as
            # life and spares a peer we are not reading from.
            autoPingInterval=0,
            # twisted.web has read the whole request before the WebSocket
            # takes over, so the opening handshake cannot stall.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            tcpNoDelay=True,
            perMessageCompressionAccept=lambda offers: None,
        )
