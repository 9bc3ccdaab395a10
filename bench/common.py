"""
Shared pieces of the benchmarks: child processes of an installed lpxy,
memory sampling, ports, the tunnel service's API.

Benchmarks are programs, not tests: they report on standard output and are
run by hand (``python -m bench.<name>``). Figures are compared against a
baseline measured in the same run, since machines here are noisy.

They measure lpxy as a user runs it: a non-editable install of the tree
(L{tests.support.installed}, the copy process tests use), its C{twistd}
plugins and C{localproxy} console script, started from a directory outside
the source tree. Everything runs in one reactor and nothing here blocks it:
processes are spawned and awaited through the reactor, readiness is polled
with connection attempts, and the API is called with C{twisted.web}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.ssl import Certificate
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from tests.support.installed import (
    installed_copy,
    installed_env,
    localproxy_argv,
    outside_dir,
    twistd_argv,
)
from tests.support.logged import LoggedChild, spawn_logged
from tests.support.sockets import listening, unused_port

MiB = 1024 * 1024

free_port = unused_port
"""A TCP port free on 127.0.0.1 right now (the tests' own helper)."""


def rss_bytes(pid: int) -> int:
    """The resident set size of process C{pid}."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class PeakSampler:
    """Samples the RSS of some processes every few milliseconds, keeping the peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.01) -> None:
        self.pids = pids
        self.baseline = {name: rss_bytes(pid) for name, pid in pids.items()}
        self.peak = dict(self.baseline)
        self._loop = LoopingCall(self.sample)
        self._interval = interval

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def start(self) -> None:
        self._loop.start(self._interval)

    def stop(self) -> dict[str, int]:
        """Stop sampling; return each process's peak growth over its baseline."""
        if self._loop.running:
            self._loop.stop()
        self.sample()
        return {name: self.peak[name] - self.baseline[name] for name in self.pids}


async def install() -> Path:
    """
    Install the tree once (in a thread: pip takes seconds) and return the
    copy the benchmark's processes run from.
    """
    return await deferToThread(installed_copy)


def twistd(*args: str) -> list[str]:
    """The installed C{twistd}, in the foreground, without a pid file."""
    return twistd_argv("-n", "--pidfile=", *args)


def localproxy(*args: str) -> list[str]:
    """The installed C{localproxy} console script."""
    return localproxy_argv(*args)


class Child(LoggedChild):
    """
    A process of the benchmark. Its output goes to a file (C{log}), not
    through this process, so reading it costs the benchmark nothing;
    C{ended} fires with its exit status.
    """

    def failed(self, what: str) -> SystemExit:
        """The error to end the benchmark with, naming the child's log."""
        return SystemExit(f"{self.name} {what}; its output is in {self.log}")


_LOGS = Path(tempfile.mkdtemp(prefix="lpxy-bench-logs-"))


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
    """
    Start C{argv} with the installed copy on its path, in a directory
    outside the source tree, its output in a file named after C{name}
    (emptied first).
    """
    child = Child(name, _LOGS / f"{name}.log")
    return spawn_logged(child, argv, append=False, env=installed_env(env), cwd=outside_dir())


async def wait_for_port(port: int, child: Child, timeout: float = 30) -> None:
    """Wait until something accepts connections on 127.0.0.1:C{port}."""
    if not await listening(port, lambda: child.ended.called, timeout):
        if child.ended.called:
            raise child.failed(f"exited with {child.ended.result}")
        raise child.failed(f"never listened on {port}")


async def until_listening(port: int, child: Child, started: float) -> float:
    """Milliseconds from C{started} (C{time.monotonic}) until C{port} accepts, probed every 2 ms."""
    if not await listening(port, lambda: child.ended.called, interval=0.002):
        raise child.failed("never listened")
    return (time.monotonic() - started) * 1e3


async def stop(child: Child, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not ended within C{timeout} seconds."""
    if child.ended.called:
        return
    # A copy of child.ended to time out: the timeout cancels what it waits on.
    ended: defer.Deferred[int] = defer.Deferred()
    child.ended.addBoth(_pass_on, ended)
    try:
        child.transport.signalProcess("TERM")  # type: ignore[union-attr]
    except ProcessExitedAlready:
        return
    try:
        await ended.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        try:
            child.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            return
        await child.ended


def _pass_on(result: Any, to: defer.Deferred[Any]) -> Any:
    to.callback(result)
    return result


async def api(base_url: str, operation: str, body: dict[str, object],
              trust: Certificate | None = None) -> dict[str, Any]:
    """
    Call C{operation} of the tunnel service's API at C{base_url} (an
    C{https} one verified against C{trust}); return the decoded answer.
    """
    if trust is None:
        agent = Agent(reactor)
    else:
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
    headers = Headers({
        "Content-Type": ["application/x-amz-json-1.1"],
        "X-Amz-Target": [f"IoTSecuredTunneling.{operation}"],
    })
    response = await agent.request(
        b"POST", (base_url + "/").encode(), headers,
        FileBodyProducer(BytesIO(json.dumps(body).encode())),
    )
    answer = await readBody(response)
    if response.code != 200:
        raise SystemExit(f"{operation} answered {response.code}: {answer!r}")
    result: dict[str, Any] = json.loads(answer)
    return result


def report(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + "\n")
    sys.stdout.flush()
