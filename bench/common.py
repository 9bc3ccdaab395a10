"""
Shared pieces of the benchmarks: child processes, memory sampling, ports.

Benchmarks are programs, not tests: they report on standard output and are
run by hand (``python -m bench.<name>``). Figures are compared against a
baseline measured in the same run, since machines here are noisy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

from twisted.internet.task import LoopingCall

MiB = 1024 * 1024


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def twistd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", *args]


def localproxy(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lpxy.proxy.cli import main; main()", *args]


def spawn(argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = open(os.devnull, "wb")
    return subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
    )


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[-3:]} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listened on {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def api(base_url: str, operation: str, body: dict[str, object], context=None) -> dict:
    request = urllib.request.Request(
        base_url + "/", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/x-amz-json-1.1",
                 "X-Amz-Target": f"IoTSecuredTunneling.{operation}"},
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return json.loads(response.read())


def report(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + "\n")
    sys.stdout.flush()
