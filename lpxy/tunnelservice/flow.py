# -*- test-case-name: tests.test_websocket_flow -*-
"""
Flow control between a tunnel's two ends on the data plane: what holds a
peer's reading, and why.

Invariants:
  - Each peer's transport has, for the life of its connection, an
    L{OutputWatch} as its streaming producer. When the transport's write
    buffer passes Twisted's high-water mark the partner's reading stops,
    and resumes once the buffer drains. So at most one read's worth of
    records (and one message Autobahn had half read) plus a transport
    buffer is held per direction, whatever the peers' speeds.
  - The service's own answers count too: a peer that sends pings or
    STREAM_STARTs without a partner and never reads makes pongs and resets
    pile up in its own buffer. Once more than C{output_mark} bytes were
    written to a peer since its buffer passed the high-water mark, the
    service stops reading that peer until the buffer drains. Relayed data
    alone never gets there (its partner was paused first), so honest
    peers never wait on their own output, which would deadlock a peer
    whose application answers what it reads (an echo server).
  - A peer's reading is paused while any reason holds (its partner's
    buffer, its own, its tunnel's bandwidth limit, see
    L{lpxy.tunnelservice.bandwidth}): a set of pausers.
  - Nothing else buffers: the decoder keeps at most one incomplete record.
  - When a pairing ends (partner gone, replaced, closed) each end's reading
    is no longer held by the other's buffer, so neither stays paused for it.
  - What is buffered for a peer goes with its transport when it leaves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from lpxy.tunnelservice.websocket import TunnelServerProtocol

__all__ = ["BANDWIDTH", "DEFAULT_OUTPUT_MARK", "OWN_OUTPUT", "PARTNER_BEHIND", "OutputWatch"]

DEFAULT_OUTPUT_MARK = 512 * 1024
"""
Bytes the service may write to a peer after its transport's buffer passed
Twisted's high-water mark before it stops reading that peer: far above what
a partner's last read and one half-read message add (about 192 KB), so only
the service's own answers to a peer that does not read get there.
"""

# Why a peer's reading is paused (a set of pausers, see the module docstring).
PARTNER_BEHIND = "partner's output"
OWN_OUTPUT = "own output"
BANDWIDTH = "tunnel bandwidth"


@implementer(IPushProducer)
class OutputWatch:
    """
    The producer of one peer's transport: Twisted pauses it when the
    transport's buffer passes the high-water mark and resumes it once the
    buffer is empty. While paused, the partner is not read, and once more
    than C{mark} bytes were written to the peer the peer itself is not read.
    """

    def __init__(self, peer: TunnelServerProtocol, mark: int) -> None:
        self._peer = peer
        self._mark = mark
        self.full = False
        self._written = 0

    def wrote(self, size: int) -> None:
        """C{size} bytes were written to the peer's transport."""
        if self.full:
            self._written += size
            if self._written > self._mark:
                self._peer.pause_reading(OWN_OUTPUT)

    def pauseProducing(self) -> None:
        # Twisted says so again on every write while the buffer is full.
        if self.full:
            return
        self.full = True
        self._written = 0
        partner = self._peer.partner
        if partner is not None:
            partner.pause_reading(PARTNER_BEHIND)

    def resumeProducing(self) -> None:
        self.full = False
        self._peer.resume_reading(OWN_OUTPUT)
        partner = self._peer.partner
        if partner is not None:
            partner.resume_reading(PARTNER_BEHIND)

    def stopProducing(self) -> None:
        # The transport is gone; the broker tells the partner separately.
        pass
