# -*- test-case-name: tests.test_ws -*-
"""
WebSocket plumbing both products share: the keepalive watch over a peer,
the set of reasons a WebSocket is not read, Autobahn's logger kept quiet
and its leftover timers cancelled, Nagle switched off, and the typing
protocol of the clocks they are given.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from txaio.tx import Logger as _TxaioLogger

__all__ = [
    "ANYTHING",
    "PONGS",
    "Clock",
    "ClockTimer",
    "DelayedCall",
    "Keepalive",
    "ReadingPauses",
    "cancel_autobahn_timers",
    "pause_if_unsent",
    "quiet_autobahn_log",
    "raise_buffer_size",
    "set_no_delay",
    "unsent_bytes",
]


class DelayedCall(Protocol):
    """The part of L{twisted.internet.interfaces.IDelayedCall} lpxy uses."""

    def active(self) -> bool:
        """Whether the call is still to come."""

    def cancel(self) -> None:
        """Unschedule the call."""


class Clock(Protocol):
    """
    The part of L{twisted.internet.interfaces.IReactorTime} lpxy uses: a
    reactor, or a L{twisted.internet.task.Clock} in tests (typed for mypy,
    which does not see through zope interfaces).
    """

    def seconds(self) -> float:
        """The current time in POSIX seconds."""

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        """Call C{callable} after C{delay} seconds; return a L{DelayedCall}."""


_NO_DELAY_DEPTH = 4


def set_no_delay(transport: object) -> bool:
    """
    Turn Nagle off (C{TCP_NODELAY}) on C{transport} and on the transports
    it wraps, four layers at most: under TLS or a web-proxy tunnel the TCP
    socket is a layer or two down, and an option set on the TLS layer never
    reaches it. Transports without the option (not TCP) are left alone.

    @return: whether a TCP transport took the option.
    """
    done = False
    for _ in range(_NO_DELAY_DEPTH):
        if transport is None:
            break
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except (AttributeError, OSError, NotImplementedError):
                pass  # a Unix socket, or a stand-in
            else:
                done = True
        transport = getattr(transport, "transport", None)
    return done


def unsent_bytes(transport: object) -> int | None:
    """
    The bytes written to C{transport} that its socket has not taken yet:
    those in the send buffer of Twisted's socket transport under it (under
    TLS or a web-proxy tunnel, a layer or two down).

    Twisted has no public API for this; C{FileDescriptor}'s buffer
    attributes are read.

    @return: the count, or C{None} when no such buffer is found.
    """
    socket = _socket_transport(transport)
    if socket is None:
        return None
    return len(socket.dataBuffer) - socket.offset + socket._tempDataLen


def raise_buffer_size(transport: object, size: int) -> bool:
    """
    Raise Twisted's C{bufferSize} (the write buffer's high-water mark, and
    the size of each read) to C{size} on the socket transport under
    C{transport}: under TLS it is a layer or two down, where the TLS layer's
    writes are counted against it. A lower layer already larger is left so.

    @return: whether a transport with a buffer size was found.
    """
    socket = _socket_transport(transport)
    if socket is None:
        return False
    if socket.bufferSize < size:
        socket.bufferSize = size
    return True


def pause_if_unsent(transport: object) -> bool:
    """
    Have the socket transport under C{transport} pause its streaming
    producer now if it holds any byte unsent, so that the drained edge (the
    producer resumed) comes once its socket has taken them all; Twisted
    pauses only above the high-water mark, and a buffer under it empties
    without a word. A zero-byte write with the mark at zero for that one
    call: nothing reaches the socket (under TLS the record stream is left
    untouched), and the mark, which is also the size of each read, is put
    back at once.

    @return: whether a socket transport with a buffer size was found.
    """
    socket = _socket_transport(transport)
    if socket is None:
        return False
    mark = socket.bufferSize
    socket.bufferSize = 0
    try:
        socket.writeSequence([b""])
    finally:
        socket.bufferSize = mark
    return True


def _socket_transport(transport: object) -> FileDescriptor | None:
    """
    Twisted's socket transport under C{transport} (a layer or two down under
    TLS or a web-proxy tunnel), or L{None}. Found by its class: a TLS layer
    answers for any attribute of the transport below it (C{ProtocolWrapper}
    passes them on), so an attribute set on it would not reach the socket.
    """
    for _ in range(_NO_DELAY_DEPTH):
        if transport is None or isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def quiet_autobahn_log() -> Any:
    """
    A logger for the C{log} attribute of an Autobahn protocol or factory
    (Autobahn's own; lpxy logs through its own L{Logger}s), pinned at info
    whatever txaio's global level: at debug, Autobahn logs the whole upgrade
    request, access-token header included. Call it in the class body; like
    C{txaio.make_logger}, it names the log namespace after the calling class.
    """
    caller = sys._getframe(1)
    namespace = f"{caller.f_globals['__name__']}.{caller.f_code.co_name}"
    # What txaio.make_logger(level="info") builds, with the caller's
    # namespace instead of this function's.
    return _TxaioLogger(level="info", logger=Logger, namespace=namespace)


_PREOPEN = (WebSocketProtocol.STATE_CONNECTING, WebSocketProtocol.STATE_PROXY_CONNECTING)


class QuietHotPath:
    """
    Autobahn's C{dataReceived} and C{sendData} without the debug line each
    formats on every call, logged or not: its arguments (C{hltype},
    C{hlval}) cost tens of microseconds per read and per frame written,
    more than the rest of a small message's path. Mix in before Autobahn's
    protocol class; the rare paths (a chopped or synchronous write, a
    write queue) stay Autobahn's.
    """

    transport: Any
    send_queue: Any
    state: int
    trafficStats: Any
    logOctets: bool

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        self.transport.write(data)
        state = self.state
        if state == WebSocketProtocol.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state in _PREOPEN:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)  # type: ignore[attr-defined]


class ClockTimer:
    """
    Autobahn's batched-timer interface (a factory's C{_batched_timer}) on
    an injected clock, so that its handshake timeouts run on the clock a
    test controls instead of the global reactor.
    """

    def __init__(self, clock: Clock) -> None:
        self.call_later = clock.callLater


_LEFT_BEHIND = ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall")


def cancel_autobahn_timers(protocol: object) -> None:
    """
    Cancel the closing-handshake timers Autobahn leaves running when the TCP
    connection goes first (the peer dropped it instead of answering our
    close). Call it from C{onClose}: the connection is gone, so none of them
    has work left.
    """
    for name in _LEFT_BEHIND:
        timer = getattr(protocol, name, None)
        if timer is not None:
            try:
                timer.cancel()
            except Exception:
                pass  # called or cancelled already
            setattr(protocol, name, None)


PONGS: Literal["pongs"] = "pongs"
"""Only a pong echoing one of our pings is a sign of life (the proxy)."""
ANYTHING: Literal["anything"] = "anything"
"""Whatever arrives is a sign of life (the tunnel service)."""


class Keepalive:
    """
    Watches one WebSocket peer: pings it, and tells when it is dead.

    The peer is I{silent} while it owes us a sign of life; silent for
    C{timeout} seconds, it is dead: C{on_dead(silence)} is called and the
    watch ends. What is a sign of life, and when pings go out, is the
    watcher's choice of C{life}:

      - L{PONGS} (the proxy, protocol.md section 5): a pong echoing one of
        our pings answers that ping and every earlier one (L{pong}); the
        silence is the age of the oldest unanswered ping. A ping goes out
        at L{start} and then every C{interval}, whatever arrives; the
        checks come with the pings.
      - L{ANYTHING} (the tunnel service): anything from the peer
        (L{heard}); the silence is the time since. A ping goes out once the
        peer has been silent for C{interval}, and every C{interval} while it
        stays so. Checks come every C{interval}, or sooner when the timeout
        falls sooner, so the peer is dead after exactly C{timeout}.

    While reading is paused (L{pause}) nothing can be heard, so that
    silence does not count: a check then sends no ping and forgives the
    silence so far, and L{resume} forgets the pings sent before (their
    pongs may still be waiting unread).

    A ping's payload is the clock's time in milliseconds as ASCII digits.
    The owner stops the watch (L{stop}) when its connection closes.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        interval: float,
        timeout: float,
        send_ping: Callable[[bytes], object],
        on_dead: Callable[[float], object],
        life: Literal["pongs", "anything"] = PONGS,
    ) -> None:
        if not 0 < interval < timeout:
            raise ValueError(f"need 0 < interval < timeout, not {interval} and {timeout}")
        if life not in (PONGS, ANYTHING):
            raise ValueError(f"life must be {PONGS!r} or {ANYTHING!r}, not {life!r}")
        self._clock = clock
        self._interval = interval
        self._timeout = timeout
        self._send_ping = send_ping
        self._on_dead = on_dead
        self._life = life
        self._heard = 0.0
        self._pings: dict[bytes, float] = {}
        self._paused = False
        self._call: Any = None

    @property
    def running(self) -> bool:
        """Whether the watch is on (started, not stopped, the peer not dead)."""
        return self._call is not None

    def start(self) -> None:
        """Start watching now (L{PONGS}: the first ping goes at once)."""
        self._heard = self._clock.seconds()
        self._check()

    def stop(self) -> None:
        """Stop watching; no callback comes after this."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def heard(self) -> None:
        """Something arrived from the peer (L{ANYTHING}: a sign of life)."""
        self._heard = self._clock.seconds()

    def pong(self, payload: bytes) -> float | None:
        """
        A pong arrived. When it echoes one of our pings (L{PONGS}), that ping
        and every earlier one are answered: return the round trip in
        seconds. Return L{None} for any other pong.
        """
        sent = self._pings.get(payload)
        if sent is None:
            return None
        self._pings = {p: t for p, t in self._pings.items() if t > sent}
        return self._clock.seconds() - sent

    def pause(self) -> None:
        """Reading from the peer stopped: its silence does not count."""
        self._paused = True

    def resume(self) -> None:
        """Reading from the peer again: the pings sent so far are forgotten."""
        self._paused = False
        self._pings.clear()

    def _silence(self, now: float) -> float:
        if self._life == PONGS:
            return now - min(self._pings.values()) if self._pings else 0.0
        return now - self._heard

    def _check(self) -> None:
        self._call = None
        now = self._clock.seconds()
        if self._paused:
            self._heard = now
            self._pings.clear()
        silence = self._silence(now)
        if silence >= self._timeout:
            self._on_dead(silence)
            return
        if self._life == PONGS:
            if not self._paused:
                self._ping(now)
            delay = self._interval
        else:
            if silence >= self._interval:
                self._ping(now)
            delay = min(self._interval, self._timeout - silence)
        self._call = self._clock.callLater(delay, self._check)

    def _ping(self, now: float) -> None:
        payload = b"%d" % int(now * 1000)
        if self._life == PONGS:
            self._pings[payload] = now
        self._send_ping(payload)


class ReadingPauses:
    """
    The reasons a WebSocket is not read now: reading stops when the first
    reason appears (C{pause} is called) and starts again when the last one
    goes (C{resume}), so that one reason going never resumes reading another
    still holds.
    """

    def __init__(self, pause: Callable[[], object], resume: Callable[[], object]) -> None:
        self._pause = pause
        self._resume = resume
        self._reasons: set[Hashable] = set()

    def __bool__(self) -> bool:
        """Whether any reason holds."""
        return bool(self._reasons)

    def add(self, reason: Hashable) -> None:
        """C{reason} holds: stop reading if it is the first."""
        if reason in self._reasons:
            return
        self._reasons.add(reason)
        if len(self._reasons) == 1:
            self._pause()

    def discard(self, reason: Hashable) -> None:
        """C{reason} no longer holds: read again if it was the last."""
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self._resume()
