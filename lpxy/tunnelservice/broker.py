# -*- test-case-name: tests.test_broker -*-
"""
The tunnel service's rules: tunnels, tokens, pairing, lifetime and limits.

The broker is plain logic. It never touches the network: the management API
calls its tunnel operations, and the data plane calls L{Broker.connect} when
a WebSocket handshake arrives and L{Broker.disconnect} when it ends. Live
connections are L{IPeer}s, which the broker asks to close and tells about
their partner. Time comes from an injected L{IReactorTime}.

Which handshake an end's tokens admit is L{lpxy.tunnelservice.tokens}'s
rule; the broker also replaces a connection already live on that end, and
rotation gives an end a fresh token (unspent, no client token) and closes
that end's live connection. No token appears in a log line, a repr or an
exception message.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from lpxy._ws import Clock, DelayedCall
from lpxy.tunnelservice.cluster import default_node_name, evictions
from lpxy.tunnelservice.store import (
    CLOSED,
    DESTINATION,
    OPEN,
    SOURCE,
    EndRecord,
    ITunnelStore,
    MemoryTunnelStore,
    TunnelRecord,
)
from lpxy.tunnelservice.tokens import admit, digest, new_token
from lpxy.wire import CLOSE_GOING_AWAY, CLOSE_NORMAL

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ALL",
    "Attachment",
    "Broker",
    "IPeer",
    "InvalidRequest",
    "LimitExceeded",
    "Limits",
    "OpenedTunnel",
    "ResourceNotFound",
    "RotatedTokens",
    "TooManyTags",
]

ALL = "all"
MODES = (SOURCE, DESTINATION)


class IPeer(Protocol):
    """
    A live data-plane connection of one tunnel end, as the broker sees it.
    Its partner is always a peer of the same kind: the broker pairs what
    the data plane gives it.
    """

    def close(self, code: int, reason: str) -> None:
        """Close the connection with this WebSocket close code and reason."""

    def partner_joined(self, partner: Self) -> None:
        """The other end of the tunnel is now connected through C{partner}."""

    def partner_left(self, partner: Self) -> None:
        """C{partner}, the other end's connection, is gone."""


class ResourceNotFound(Exception):
    """The named tunnel or resource does not exist."""


class LimitExceeded(Exception):
    """A configured limit would be exceeded."""


class TooManyTags(LimitExceeded):
    """A tunnel would have more than L{Limits.max_tags} tags."""


class InvalidRequest(Exception):
    """A request breaks a rule the API's shapes cannot express."""


@attrs.frozen
class Limits:
    """The service's limits; the defaults are AWS's."""

    max_services: int = 3
    max_open_tunnels: int = 10000
    closed_retention_seconds: float = 3 * 60 * 60
    """How long a closed tunnel can still be described and listed."""
    max_closed_tunnels: int = 10000
    """Closed tunnels kept at most; beyond, the longest closed are forgotten."""
    max_tags: int = 50
    """Tags per tunnel."""


@attrs.frozen
class OpenedTunnel:
    """What opening a tunnel returns: its names and both access tokens."""

    tunnel_id: str
    tunnel_arn: str
    source_token: str = attrs.field(repr=False)
    destination_token: str = attrs.field(repr=False)


@attrs.frozen
class RotatedTokens:
    """What rotating returns: the new token of each rotated end."""

    tunnel_arn: str
    source_token: str | None = attrs.field(repr=False)
    destination_token: str | None = attrs.field(repr=False)


@attrs.define(eq=False)
class Attachment:
    """
    One accepted data-plane connection: which tunnel end it serves.

    @ivar channel_id: the opaque id sent in the C{channel-id} header.
    """

    tunnel_id: str
    mode: str
    services: tuple[str, ...]
    channel_id: str
    peer: IPeer = attrs.field(repr=False)
    _broker: Broker = attrs.field(repr=False)
    token_hash: bytes = attrs.field(repr=False, default=b"")
    """The digest of the access token that admitted it."""

    @property
    def partner(self) -> IPeer | None:
        """The live connection of the other end, if any."""
        return self._broker._peer(self.tunnel_id, _other(self.mode))


def _other(mode: str) -> str:
    return DESTINATION if mode == SOURCE else SOURCE


class Broker:
    """
    Tunnels and their connections.

    @param clock: the time source; each tunnel's expiry is a delayed call on it.
    @param store: where tunnel records live; tunnels it kept from an earlier
        run are taken over (see L{_resume}).
    @param limits: the service's limits.
    @param arn_prefix: tunnel ARNs are this prefix followed by the tunnel id.
    @param new_id: makes tunnel ids.
    @param node: this node's name, kept in the record of each end whose
        connection it holds (L{default_node_name} unless given).
    """

    _log = Logger()

    def __init__(
        self,
        clock: Clock,
        store: ITunnelStore | None = None,
        limits: Limits | None = None,
        arn_prefix: str = "arn:aws:iot:us-east-1:123456789012:tunnel/",
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        node: str | None = None,
    ) -> None:
        self._clock = clock
        self.node = node if node is not None else default_node_name()
        self._store: ITunnelStore = store if store is not None else MemoryTunnelStore()
        self.limits = limits if limits is not None else Limits()
        self._arn_prefix = arn_prefix
        self._new_id = new_id
        # Each tunnel's one timer: its expiry while open, its removal once closed.
        self._expiries: dict[str, DelayedCall] = {}
        self._live: dict[tuple[str, str], Attachment] = {}
        # Closed tunnels still kept, the longest closed first.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._resume()
        self._unwatch = self._store.on_changed(lambda tunnel_id, _: self.changed(tunnel_id))

    def _resume(self) -> None:
        """
        Take over the tunnels a store kept from an earlier run: re-arm each
        open tunnel's expiry at its deadline and each closed one's removal
        at the end of its retention, closing or forgetting at once those
        whose time passed while the service was down, and forgetting the
        longest closed beyond L{Limits.max_closed_tunnels}.
        """
        now = self._clock.seconds()
        records = list(self._store.newest_first())
        # Closed ones first, in the order they closed, so that the count
        # bound forgets the longest closed, not those closed just now.
        closed = sorted(
            (record for record in records if record.status != OPEN),
            key=lambda record: (record.last_updated_at, record.sequence),
        )
        for record in closed:
            until = record.last_updated_at + self.limits.closed_retention_seconds
            if until <= now:
                self._forget(record.tunnel_id)
            else:
                self._retain(record.tunnel_id, until - now)
        counts = {OPEN: 0, "expired": 0}
        for record in records:
            if record.status != OPEN:
                continue
            if record.expires_at <= now:
                counts["expired"] += 1
                self._close(
                    record, "tunnel lifetime expired",
                    "lifetime expired while the service was stopped",
                )
                continue
            counts[OPEN] += 1
            self._expiries[record.tunnel_id] = self._clock.callLater(
                record.expires_at - now, self._expire, record.tunnel_id
            )
        kept = sum(1 for record in closed if record.tunnel_id in self._closed)
        if records:
            self._log.info(
                "Resumed {open} open and {closed} closed tunnels from the store; "
                "closed {expired} whose lifetime ended while the service was "
                "stopped and forgot {forgotten} past their retention or the "
                "closed-tunnel limit",
                open=counts[OPEN],
                closed=kept,
                expired=counts["expired"],
                forgotten=len(closed) - kept,
            )

    # Tunnel operations (the management API)

    def _checked_services(self, services: Iterable[str]) -> tuple[str, ...]:
        """
        The services of a tunnel, within the limit and each named once.

        @raise LimitExceeded: too many services.
        @raise InvalidRequest: a service named twice.
        """
        services = tuple(services)
        if len(services) > self.limits.max_services:
            raise LimitExceeded(
                f"A tunnel can have at most {self.limits.max_services} services"
            )
        if len(set(services)) != len(services):
            raise InvalidRequest("Service names must be unique")
        return services

    def _checked_tags(
        self, tags: dict[str, str], added: Iterable[tuple[str, str]]
    ) -> dict[str, str]:
        """
        C{tags} with C{added} added or replaced, within the limit.

        @raise TooManyTags: more than L{Limits.max_tags} tags.
        """
        merged = {**tags, **dict(added)}
        if len(merged) > self.limits.max_tags:
            raise TooManyTags(f"A tunnel can have at most {self.limits.max_tags} tags")
        return merged

    def open_tunnel(
        self,
        services: Iterable[str] = (),
        thing_name: str | None = None,
        description: str | None = None,
        lifetime_minutes: int = 720,
        tags: Iterable[tuple[str, str]] = (),
    ) -> OpenedTunnel:
        """
        Open a tunnel.

        @raise LimitExceeded: too many services, or too many open tunnels.
        @raise InvalidRequest: a service named twice, or a bad lifetime.
        """
        services = self._checked_services(services)
        if not 1 <= lifetime_minutes <= 720:
            raise InvalidRequest("maxLifetimeTimeoutMinutes must be between 1 and 720")
        if self._store.open_count() >= self.limits.max_open_tunnels:
            raise LimitExceeded(
                f"At most {self.limits.max_open_tunnels} tunnels can be open at once"
            )
        now = self._clock.seconds()
        tunnel_id = self._new_id()
        source_token, destination_token = new_token(tunnel_id), new_token(tunnel_id)
        record = TunnelRecord(
            tunnel_id=tunnel_id,
            arn=self._arn_prefix + tunnel_id,
            sequence=self._store.next_sequence(),
            description=description,
            thing_name=thing_name,
            services=services,
            lifetime_minutes=lifetime_minutes,
            created_at=now,
            last_updated_at=now,
            source=EndRecord(token_hash=digest(source_token), last_updated_at=now),
            destination=EndRecord(
                token_hash=digest(destination_token), last_updated_at=now
            ),
            tags=self._checked_tags({}, tags),
        )
        self._store.add(record)
        self._expiries[tunnel_id] = self._clock.callLater(
            record.expires_at - now, self._expire, tunnel_id
        )
        self._log.info(
            "Tunnel {tunnel_id} opened (services {services}, thing {thing_name}, "
            "lifetime {lifetime_minutes} minutes)",
            tunnel_id=tunnel_id,
            services=list(services),
            thing_name=thing_name,
            lifetime_minutes=lifetime_minutes,
        )
        return OpenedTunnel(tunnel_id, record.arn, source_token, destination_token)

    def describe(self, tunnel_id: str) -> TunnelRecord:
        """
        The record of a tunnel.

        @raise ResourceNotFound: no such tunnel.
        """
        record = self._store.get(tunnel_id)
        if record is None:
            raise ResourceNotFound(f"Tunnel {tunnel_id} not found")
        return record

    def close_tunnel(self, tunnel_id: str, delete: bool = False) -> None:
        """
        Close a tunnel: both peers are closed with 1000 and later
        handshakes are refused. With C{delete}, forget it as well.

        @raise ResourceNotFound: no such tunnel.
        """
        record = self.describe(tunnel_id)
        if record.status == OPEN:
            self._close(record, "tunnel closed", "CloseTunnel")
        if delete:
            self._forget(tunnel_id)

    def _expire(self, tunnel_id: str) -> None:
        del self._expiries[tunnel_id]
        record = self._store.get(tunnel_id)
        if record is not None and record.status == OPEN:
            self._close(record, "tunnel lifetime expired", "lifetime expired")
        else:  # another node has closed it already
            self.changed(tunnel_id)

    def _cancel_timer(self, tunnel_id: str) -> None:
        timer = self._expiries.pop(tunnel_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _forget(self, tunnel_id: str, why: str = "deleted") -> None:
        self._cancel_timer(tunnel_id)
        self._closed.pop(tunnel_id, None)
        self._store.remove(tunnel_id)
        self._log.info("Tunnel {tunnel_id} {why}", tunnel_id=tunnel_id, why=why)

    def _retain(self, tunnel_id: str, seconds: float) -> None:
        """
        Keep a closed tunnel visible for C{seconds}, as AWS keeps them, and
        forget the longest closed if more than the limit are kept now.
        """
        self._expiries[tunnel_id] = self._clock.callLater(
            seconds, self._forget, tunnel_id
        )
        self._closed[tunnel_id] = None
        limit = self.limits.max_closed_tunnels
        while len(self._closed) > limit:
            oldest = next(iter(self._closed))
            self._forget(
                oldest, f"forgotten (more than {limit} closed tunnels are kept)"
            )

    def _close(self, record: TunnelRecord, reason: str, why: str) -> None:
        self._cancel_timer(record.tunnel_id)
        record.status = CLOSED
        record.last_updated_at = self._clock.seconds()
        attachments = [
            a for mode in MODES
            if (a := self._live.get((record.tunnel_id, mode))) is not None
        ]
        for attachment in attachments:
            self._detach(attachment, notify=False)
        self._store.save(record)
        self._retain(record.tunnel_id, self.limits.closed_retention_seconds)
        self._log.info(
            "Tunnel {tunnel_id} closed ({why})", tunnel_id=record.tunnel_id, why=why
        )
        for attachment in attachments:
            attachment.peer.close(CLOSE_NORMAL, reason)

    def list_tunnels(
        self,
        thing_name: str | None = None,
        max_results: int = 100,
        next_token: str | None = None,
    ) -> tuple[list[TunnelRecord], str | None]:
        """
        Tunnels, newest first, one page at a time.

        @return: the page, and the token for the next page (L{None} on the last).
        @raise InvalidRequest: C{next_token} was not made by this service.
        """
        before: int | None = None
        if next_token is not None:
            if not next_token.startswith("after-") or not next_token[6:].isdigit():
                raise InvalidRequest("Invalid nextToken")
            before = int(next_token[6:])
        page: list[TunnelRecord] = []
        for record in self._store.newest_first():
            if before is not None and record.sequence >= before:
                continue
            if thing_name is not None and record.thing_name != thing_name:
                continue
            if len(page) == max_results:
                return page, f"after-{page[-1].sequence}"
            page.append(record)
        return page, None

    def rotate(
        self,
        tunnel_id: str,
        mode: str,
        services: Iterable[str] | None = None,
        thing_name: str | None = None,
    ) -> RotatedTokens:
        """
        Give the end C{mode} (L{SOURCE}, L{DESTINATION} or L{ALL}) a new
        access token and close its live connection. C{services} and
        C{thing_name}, when given, replace the destination configuration.

        @raise ResourceNotFound: no such tunnel, or it is closed.
        @raise LimitExceeded: too many services.
        """
        record = self.describe(tunnel_id)
        if record.status != OPEN:
            raise ResourceNotFound(f"Tunnel {tunnel_id} is closed")
        if services is not None:
            record.services = self._checked_services(services)
            record.thing_name = thing_name
        modes = MODES if mode == ALL else (mode,)
        now = self._clock.seconds()
        tokens: dict[str, str] = {}
        replaced = []
        for m in modes:
            token = tokens[m] = new_token(tunnel_id)
            end = record.end(m)
            end.token_hash = digest(token)
            end.client_token_hash = None
            end.spent = False
            attachment = self._live.get((tunnel_id, m))
            if attachment is not None:
                self._detach(attachment, notify=True)
                replaced.append(attachment)
        record.last_updated_at = now
        self._store.save(record)
        self._log.info(
            "Tunnel {tunnel_id}: access token rotated for {modes}",
            tunnel_id=tunnel_id,
            modes=list(modes),
        )
        for attachment in replaced:
            attachment.peer.close(CLOSE_NORMAL, "access token rotated")
        return RotatedTokens(record.arn, tokens.get(SOURCE), tokens.get(DESTINATION))

    def _by_arn(self, arn: str) -> TunnelRecord:
        record = None
        if arn.startswith(self._arn_prefix):
            record = self._store.get(arn[len(self._arn_prefix):])
        if record is None:
            raise ResourceNotFound(f"Resource {arn} not found")
        return record

    def tag(self, arn: str, tags: Iterable[tuple[str, str]]) -> None:
        """
        Add or replace tags of a tunnel.

        @raise ResourceNotFound: no tunnel has this ARN.
        """
        record = self._by_arn(arn)
        record.tags = self._checked_tags(record.tags, tags)
        self._store.save(record)

    def untag(self, arn: str, keys: Iterable[str]) -> None:
        """
        Remove tags from a tunnel (unknown keys are ignored).

        @raise ResourceNotFound: no tunnel has this ARN.
        """
        record = self._by_arn(arn)
        for key in keys:
            record.tags.pop(key, None)
        self._store.save(record)

    def tags(self, arn: str) -> dict[str, str]:
        """
        The tags of a tunnel.

        @raise ResourceNotFound: no tunnel has this ARN.
        """
        return dict(self._by_arn(arn).tags)

    # Connections (the data plane)

    def refresh(self, access_token: str) -> Deferred[None]:
        """
        Bring the store's view of this token's tunnel up to date (another
        node may have opened, closed or rotated it): call before L{connect}
        and wait. Fires at once where no other node shares the store.
        """
        return self._store.refresh_token(digest(access_token))

    def refresh_tunnel(
        self, tunnel_id: str | None = None, arn: str | None = None
    ) -> Deferred[None]:
        """
        Bring the store's view of one tunnel (named by id, or by ARN) up to
        date: call before an API call naming it, and wait. Fires at once
        where no other node shares the store.
        """
        if tunnel_id is None:
            if arn is None or not arn.startswith(self._arn_prefix):
                return succeed(None)
            tunnel_id = arn[len(self._arn_prefix):]
        return self._store.refresh_tunnel(tunnel_id)

    def connect(
        self, mode: str, access_token: str, client_token: str | None, peer: IPeer
    ) -> Attachment:
        """
        Accept a handshake for end C{mode}, spending the token as the rules
        say, and replacing a connection already live on that end.

        @raise HandshakeRefused: with the status and reason to answer.
        """
        token_hash = digest(access_token)
        record, end = admit(self._store.find_token(token_hash), token_hash, mode, client_token)
        old = self._live.get((record.tunnel_id, mode))
        if old is not None:
            self._detach(old, notify=True)
        attachment = Attachment(
            tunnel_id=record.tunnel_id,
            mode=mode,
            services=record.services,
            channel_id=str(uuid.uuid4()),
            peer=peer,
            broker=self,
            token_hash=end.token_hash,
        )
        self._live[(record.tunnel_id, mode)] = attachment
        end.connected = True
        end.node = self.node
        end.last_updated_at = self._clock.seconds()
        self._store.save(record)
        if old is not None:
            old.peer.close(CLOSE_NORMAL, "replaced by a new connection")
        partner = attachment.partner
        if partner is not None:
            partner.partner_joined(peer)
            peer.partner_joined(partner)
        return attachment

    def disconnect(self, attachment: Attachment) -> None:
        """
        A connection has ended. Nothing happens when it was already
        replaced or its tunnel closed.
        """
        if self._live.get((attachment.tunnel_id, attachment.mode)) is attachment:
            self._detach(attachment, notify=True)

    def _detach(self, attachment: Attachment, notify: bool) -> None:
        del self._live[(attachment.tunnel_id, attachment.mode)]
        record = self._store.get(attachment.tunnel_id)
        # Unless another node has taken the end over since.
        if record is not None and record.end(attachment.mode).node in (None, self.node):
            end = record.end(attachment.mode)
            end.connected = False
            end.node = None
            end.last_updated_at = self._clock.seconds()
            self._store.save(record)
        partner = attachment.partner
        if notify and partner is not None:
            partner.partner_left(attachment.peer)

    def stop(self) -> None:
        """
        The service is shutting down: close every live connection with
        1001 and stop the expiry timers.
        """
        for attachment in list(self._live.values()):
            self._detach(attachment, notify=False)
            attachment.peer.close(CLOSE_GOING_AWAY, "service shutting down")
        for tunnel_id in list(self._expiries):
            self._cancel_timer(tunnel_id)
        self._unwatch()

    # Several nodes (lpxy.tunnelservice.cluster)

    def changed(self, tunnel_id: str) -> None:
        """
        Another node changed tunnel C{tunnel_id}, and the store holds its new
        record: close what of this node's connections the change ends (as
        L{evictions} says), and keep the tunnel's timer in step.
        """
        record = self._store.get(tunnel_id)
        held = {
            mode: attachment.token_hash for mode in MODES
            if (attachment := self._live.get((tunnel_id, mode))) is not None
        }
        evicted = [(e, self._live[(tunnel_id, e.mode)]) for e in evictions(record, held, self.node)]
        still_open = record is not None and record.status == OPEN
        for _, attachment in evicted:
            # The partner hears of it unless it is evicted too.
            self._detach(attachment, notify=still_open and len(evicted) == 1)
        if record is not None and still_open:
            self._reassert(record)
        now = self._clock.seconds()
        if record is None:
            self._cancel_timer(tunnel_id)
            self._closed.pop(tunnel_id, None)
        elif still_open and tunnel_id not in self._expiries:
            self._expiries[tunnel_id] = self._clock.callLater(
                max(0.0, record.expires_at - now), self._expire, tunnel_id
            )
        elif not still_open and tunnel_id not in self._closed:
            self._cancel_timer(tunnel_id)
            self._retain(tunnel_id, max(
                0.0, record.last_updated_at + self.limits.closed_retention_seconds - now
            ))
        for eviction, attachment in evicted:
            self._log.info(
                "Tunnel {tunnel_id}: {mode} connection closed ({reason}, by another node)",
                tunnel_id=tunnel_id, mode=eviction.mode, reason=eviction.reason,
            )
            attachment.peer.close(eviction.code, eviction.reason)

    def _reassert(self, record: TunnelRecord) -> None:
        """
        Mark the ends this node holds connected again where another node
        wrote otherwise (it took this node for dead when its lease lapsed).
        """
        stale = [
            record.end(mode) for mode in MODES
            if (record.tunnel_id, mode) in self._live and not record.end(mode).connected
        ]
        for end in stale:
            end.connected = True
            end.node = self.node
        if stale:
            self._store.save(record)

    @property
    def store(self) -> ITunnelStore:
        """Where this broker keeps its tunnels."""
        return self._store

    def tunnels_by_status(self) -> dict[str, int]:
        """The tunnels kept, by status (C{OPEN}, C{CLOSED})."""
        return {OPEN: self._store.open_count(), CLOSED: len(self._closed)}

    def peers_by_mode(self) -> dict[str, int]:
        """The tunnel ends with a peer connected now, by mode."""
        counts = dict.fromkeys(MODES, 0)
        for _, mode in self._live:
            counts[mode] += 1
        return counts

    def _peer(self, tunnel_id: str, mode: str) -> IPeer | None:
        attachment = self._live.get((tunnel_id, mode))
        return attachment.peer if attachment is not None else None
