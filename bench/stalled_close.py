"""
Issue 8's lost end, as reported, against real processes: a client pushes
256 MiB into a source C{localproxy} while the destination's application
does not read for 8 s, then shuts down its writing side (C{SHUT_WR}) and
waits. Twenty times in a row; each time the application must get every byte
intact and then end-of-file. Prints each repetition and how many ends were
seen; exits 1 if any was lost.

The processes are those of L{bench.proxy.TLSTunnel} (C{twistd tunnelservice}
over TLS, a destination and a source C{localproxy}, all of the installed
lpxy); the client and the applications run in this process.

    python -m bench.stalled_close [repetitions] [MiB] [stall seconds]
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from bench.common import MiB, report
from bench.proxy import Echo, TLSTunnel, Writer, listen

CHUNK = os.urandom(65536)
END_GRACE = 10.0
"""Seconds after the last byte within which the end must arrive to count as seen."""
TRANSFER_LIMIT = 600.0
"""Seconds a repetition may take to deliver every byte before the benchmark gives up."""


class StalledApp(protocol.Protocol):
    """
    The destination's application: does not read for C{factory.stall}
    seconds, then reads everything, hashing it. C{all_received} fires with
    the time the last expected byte arrived, C{ended} with the time the
    connection ended (C{reason} says how).
    """

    def connectionMade(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.reason: Failure | None = None
        self.all_received: defer.Deferred[float] = defer.Deferred()
        self.ended: defer.Deferred[float] = defer.Deferred()
        self.transport.pauseProducing()
        self._resume = reactor.callLater(self.factory.stall, self.transport.resumeProducing)
        self.factory.accepted(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.received >= self.factory.expected and not self.all_received.called:
            self.all_received.callback(time.perf_counter())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._resume.active():
            self._resume.cancel()
        self.reason = reason
        self.ended.callback(time.perf_counter())


class StalledAppFactory(protocol.Factory):
    protocol = StalledApp

    def __init__(self, stall: float, expected: int) -> None:
        self.stall = stall
        self.expected = expected
        self._next: defer.Deferred[StalledApp] | None = None

    def next_connection(self) -> defer.Deferred[StalledApp]:
        self._next = defer.Deferred()
        return self._next

    def accepted(self, app: StalledApp) -> None:
        waiting, self._next = self._next, None
        if waiting is not None:
            waiting.callback(app)


@implementer(IHalfCloseableProtocol)
class HalfClosingPusher(Writer):
    """
    Writes C{total} bytes (C{CHUNK} repeated) as fast as the transport
    takes them, then shuts down its writing side and waits for the source
    to close the connection (C{closed}).
    """

    chunk = CHUNK

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.closed: defer.Deferred[None] = defer.Deferred()

    def all_written(self) -> None:
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed.callback(None)


def fired_within(d: defer.Deferred[float], seconds: float) -> defer.Deferred[bool]:
    """Fires with whether C{d} fired within C{seconds}; leaves C{d} alone."""
    result: defer.Deferred[bool] = defer.Deferred()
    timer = reactor.callLater(seconds, result.callback, False)

    def fired(value: object) -> object:
        if timer.active():
            timer.cancel()
            result.callback(True)
        return value

    d.addBoth(fired)
    return result


async def repetition(port: int, apps: StalledAppFactory, total: int,
                     expected: bytes) -> tuple[str, ...]:
    """One stalled close; its report row."""
    accepted = apps.next_connection()
    started = time.perf_counter()
    client = HalfClosingPusher(total)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    app = await accepted
    if not await fired_within(app.all_received, TRANSFER_LIMIT):
        raise SystemExit(f"only {app.received} of {total} bytes in {TRANSFER_LIMIT:.0f} s")
    last_byte = app.all_received.result
    intact = app.received == total and app.digest.digest() == expected
    seen = await fired_within(app.ended, END_GRACE)
    if seen:
        clean = app.reason is not None and app.reason.check(ConnectionDone) is not None
        end = f"seen after {app.ended.result - last_byte:.3f} s" + ("" if clean else " (reset)")
    else:
        end = f"NOT seen within {END_GRACE:.0f} s"
        app.transport.abortConnection()
        await app.ended
    await client.closed
    return (str(app.received), "yes" if intact else "NO",
            f"{last_byte - started:.1f}", end)


async def main(reactor_: object, repetitions: str = "20", mib: str = "256",
               stall: str = "8") -> None:
    count, total = int(repetitions), int(mib) * MiB
    expected = hashlib.sha256()
    for _ in range(total // len(CHUNK)):
        expected.update(CHUNK)
    echo_port = await listen(protocol.Factory.forProtocol(Echo))
    apps = StalledAppFactory(float(stall), total)
    stall_port = await listen(apps)
    tunnel = TLSTunnel()
    try:
        await tunnel.start({"ECHO": echo_port, "STALL": stall_port})
        rows = [("repetition", "bytes at application", "intact", "last byte after s",
                 "end-of-file")]
        seen = 0
        for index in range(count):
            row = await repetition(tunnel.ports["STALL"], apps, total, expected.digest())
            seen += row[-1].startswith("seen") and not row[-1].endswith("(reset)")
            rows.append((str(index + 1), *row))
            sys.stdout.write("  ".join(rows[-1]) + "\n")
            sys.stdout.flush()
        sys.stdout.write("\n")
        report(rows)
        sys.stdout.write(
            f"\nends seen: {seen} of {count} ({mib} MiB each, application stalled {stall} s)\n"
        )
    finally:
        await tunnel.stop()
    if seen != count:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
