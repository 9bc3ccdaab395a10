"""
A real tunnel service on a loopback port, for end-to-end tests.

    fixture = await start_tunnelservice(self)
    opened = fixture.open_tunnel(["SSH"])
    TunnelEndpoint(host="127.0.0.1", port=fixture.port, tls=False)

The service listens on 127.0.0.1 port 0 (under TLS with the server
certificate of a L{tests.support.certs.TestPKI} given as C{tls}), in the
test's reactor. A cleanup registered on the test stops it and waits until
every connection to it is closed, so no test leaves a dirty reactor behind.

Also here: L{api_client}, a boto3 client for the service's API that reads
none of the machine's AWS setup, and L{RecordingPeer}, a connection-less
L{IPeer} for calling the broker directly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from lpxy._ws import Clock
from lpxy.tunnelservice.api import DEFAULT_MAX_REQUEST_SIZE
from lpxy.tunnelservice.auth import SignatureVerifier
from lpxy.tunnelservice.broker import Broker, IPeer, Limits, OpenedTunnel
from lpxy.tunnelservice.dataplane import DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_INTERVAL
from lpxy.tunnelservice.service import TunnelService
from lpxy.tunnelservice.store import ITunnelStore
from lpxy.tunnelservice.websocket import TunnelServerProtocol
from lpxy.writethrough import write_through

if TYPE_CHECKING:
    from tests.support.certs import TestPKI

__all__ = [
    "ListeningEndpoint",
    "OpenedTunnel",
    "RecordingPeer",
    "ServiceFixture",
    "api_client",
    "start_tunnelservice",
]


class RecordingPeer:
    """
    An L{IPeer} without a connection, for talking to a L{Broker} directly:
    it appends C{(name, "close", code, reason)}, C{(name, "joined", partner
    name)} and C{(name, "left", partner name)} to C{events}.
    """

    def __init__(self, name: str, events: list[tuple[object, ...]]) -> None:
        self.name = name
        self.events = events

    def close(self, code: int, reason: str) -> None:
        self.events.append((self.name, "close", code, reason))

    def partner_joined(self, partner: IPeer) -> None:
        self.events.append((self.name, "joined", partner.name))  # type: ignore[attr-defined]

    def partner_left(self, partner: IPeer) -> None:
        self.events.append((self.name, "left", partner.name))  # type: ignore[attr-defined]


class ListeningEndpoint:
    """
    A server endpoint that hands its listening port to the test as well:
    C{listening} fires with it (or fails as the listen fails).
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint
        self.listening: defer.Deferred[Any] = defer.Deferred()

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def listened(port: Any) -> Any:
            self.listening.callback(port)
            return port

        def failed(failure: Any) -> Any:
            self.listening.errback(failure)
            return failure

        d: defer.Deferred[Any] = self._endpoint.listen(factory)
        return d.addCallbacks(listened, failed)


@attrs.define
class ServiceFixture:
    """A running tunnel service and shortcuts to its broker."""

    port: int
    api_url: str
    broker: Broker
    service: TunnelService = attrs.field(repr=False)

    def open_tunnel(
        self, services: list[str] | None = None, lifetime_minutes: int = 720
    ) -> OpenedTunnel:
        """Open a tunnel straight through the broker (no API request)."""
        return self.broker.open_tunnel(
            services=services or (), lifetime_minutes=lifetime_minutes
        )

    def close_tunnel(self, tunnel_id: str) -> None:
        """Close a tunnel straight through the broker; its peers get 1000."""
        self.broker.close_tunnel(tunnel_id)

    def server_side(self, tunnel_id: str, mode: str) -> TunnelServerProtocol:
        """The service's side of the live connection of one tunnel end."""
        [peer] = [
            c for c in self.service.connections
            if isinstance(c, TunnelServerProtocol) and c._attachment is not None
            and (c._attachment.tunnel_id, c._attachment.mode) == (tunnel_id, mode)
        ]
        return peer


async def _start(
    case: TestCase,
    reactor: Any,
    clock: Clock | None,
    tls: TestPKI | None,
    ping_interval: float,
    idle_timeout: float,
    verifier: SignatureVerifier | None,
    limits: dict[str, float],
    interface: str = "127.0.0.1",
    store: ITunnelStore | None = None,
    metrics: str | None = None,
) -> ServiceFixture:
    if reactor is None:
        from twisted.internet import reactor
    max_request_size = int(limits.pop("max_request_size", DEFAULT_MAX_REQUEST_SIZE))
    if tls is None:
        description = f"tcp:0:interface={interface.replace(':', chr(92) + ':')}"
    else:
        description = tls.server_endpoint_string(interface=interface)
    # Write-through ports, as TunnelService makes from endpoint strings.
    endpoint = ListeningEndpoint(serverFromString(write_through(reactor), description))
    tunnel_rate = limits.pop("tunnel_rate", None)
    service = TunnelService(
        reactor,
        [endpoint],
        max_request_size=max_request_size,
        clock=clock,
        ping_interval=ping_interval,
        idle_timeout=idle_timeout,
        verifier=verifier,
        limits=Limits(**limits),  # type: ignore[arg-type]
        tunnel_rate=tunnel_rate,
        store=store,
        metrics=metrics,
    )
    service.startService()
    case.addCleanup(service.stopService)
    port = (await endpoint.listening).getHost().port
    scheme = "https" if tls is not None else "http"
    return ServiceFixture(
        port=port,
        api_url=f"{scheme}://{f'[{interface}]' if ':' in interface else interface}:{port}",
        broker=service.broker,
        service=service,
    )


def start_tunnelservice(
    case: TestCase,
    reactor: Any = None,
    clock: Clock | None = None,
    tls: TestPKI | None = None,
    *,
    ping_interval: float = DEFAULT_PING_INTERVAL,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    verifier: SignatureVerifier | None = None,
    interface: str = "127.0.0.1",
    store: ITunnelStore | None = None,
    metrics: str | None = None,
    **limits: float,
) -> defer.Deferred[ServiceFixture]:
    """
    Start a tunnel service for C{case}; fire with its L{ServiceFixture}.

    @param reactor: the reactor to listen with (the global one by default).
    @param clock: the time source of the broker and of the peers' liveness
        checks, for expiry and keepalive tests (the reactor by default).
    @param ping_interval: seconds of a peer's silence before the service pings it.
    @param idle_timeout: seconds of a peer's silence before the service drops it.
    @param tls: the test PKI whose server certificate a TLS port presents.
    @param verifier: makes the API check signatures (open without).
    @param interface: the address to listen on (C{"::1"} for IPv6).
    @param store: where the broker keeps tunnels (in memory unless given).
    @param metrics: the server endpoint of its C{/metrics} (none unless given).
    @param limits: C{max_services}, C{max_open_tunnels}, C{max_request_size},
        C{closed_retention_seconds}, C{tunnel_rate}.
    """
    return defer.Deferred.fromCoroutine(
        _start(case, reactor, clock, tls, ping_interval, idle_timeout, verifier, limits,
               interface, store, metrics)
    )


def api_client(url: str, key_id: str = "x", secret: str = "x", **kwargs: Any) -> Any:
    """
    A boto3 C{iotsecuretunneling} client for the tunnel service at C{url},
    signing with C{key_id} and C{secret} (dummies, for a service that does
    not check signatures, unless given).
    C{kwargs} go to C{boto3.client}, e.g. C{verify} for a TLS port.
    Creating one takes a moment: call it in a thread from a reactor test.

    It makes each request once: botocore would retry a throttled or failed
    request (C{LimitExceededException} included) with backoff, which hides
    what the service answered and makes a test wait seconds. A C{config}
    in C{kwargs} is merged over that.

    The client reads none of the machine's AWS setup: no C{~/.aws} files
    (nor those C{AWS_CONFIG_FILE} or C{AWS_SHARED_CREDENTIALS_FILE} name)
    and no C{AWS_PROFILE}, so that a developer's profile cannot change or
    break a test.
    """
    # only API tests need these; the proxies' tests import this module too
    import boto3.session
    import botocore.session
    from botocore.config import Config

    # (name in a config file, environment variables, default, conversion)
    core = botocore.session.Session(session_vars={
        "profile": (None, None, None, None),
        "config_file": (None, None, os.devnull, None),
        "credentials_file": (None, None, os.devnull, None),
    })
    config = Config(retries={"max_attempts": 1, "mode": "standard"})
    if "config" in kwargs:
        config = config.merge(kwargs.pop("config"))
    return boto3.session.Session(botocore_session=core).client(
        "iotsecuretunneling",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=config,
        **kwargs,
    )
