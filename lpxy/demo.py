"""
C{lpxy-demo}: a whole tunnel on loopback, from the installed programs.

Starts C{twistd -n tunnelservice}, opens a tunnel through its management API
(plain HTTP, the AWS JSON 1.1 protocol), starts an echo server, a
destination C{localproxy} pointing at it and a source C{localproxy}
listening on a local port, pushes data through the tunnel and checks every
byte comes back. Exits 0 when the round trip is intact.

This is a program, not library code: it reports on standard output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from typing import IO, NoReturn

_DEADLINE = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _echo_server() -> tuple[int, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited early with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on port {port} in {_DEADLINE:.0f}s")


def _wait_until_connected(
    port: int, tunnel_id: str, proxies: Sequence[subprocess.Popen[bytes]]
) -> None:
    """Wait until DescribeTunnel says both ends are connected."""
    deadline = time.monotonic() + _DEADLINE
    while time.monotonic() < deadline:
        for proxy in proxies:
            if proxy.poll() is not None:
                raise SystemExit(f"a localproxy exited early with status {proxy.returncode}")
        tunnel = _api(port, "DescribeTunnel", {"tunnelId": tunnel_id})["tunnel"]
        assert isinstance(tunnel, dict)
        states = [tunnel[end]["status"] for end in ("sourceConnectionState",
                                                    "destinationConnectionState")]
        if states == ["CONNECTED", "CONNECTED"]:
            return
        time.sleep(0.05)
    raise SystemExit(f"the proxies did not both connect in {_DEADLINE:.0f}s")


def _api(port: int, operation: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"IoTSecuredTunneling.{operation}",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def _spawn(argv: Sequence[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


DEFAULT_SIZE = 8 * 1024 * 1024


class _Parser(argparse.ArgumentParser):
    """argparse's parser, a usage error exiting 1 as lpxy's other programs do."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        size = -1
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"BYTES must be a positive whole number of bytes, e.g. 1048576, not {value!r}"
        )
    return size


def parser() -> argparse.ArgumentParser:
    """The command line of C{lpxy-demo}."""
    p = _Parser(
        prog="lpxy-demo",
        description=(
            "Run a whole AWS IoT Secure Tunneling tunnel on loopback from the installed "
            "programs: twistd tunnelservice, a destination and a source localproxy and "
            "an echo server; push BYTES through the tunnel and check every byte comes "
            "back. Exits 0 when the round trip is intact and both proxies exit 0."
        ),
    )
    p.add_argument(
        "size", metavar="BYTES", nargs="?", type=_size, default=DEFAULT_SIZE,
        help=f"how many random bytes to echo through the tunnel (default {DEFAULT_SIZE})",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    size: int = parser().parse_args(sys.argv[1:] if argv is None else argv).size
    python = sys.executable
    workdir = tempfile.mkdtemp(prefix="lpxy-demo-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    service_port, source_port = _free_port(), _free_port()
    echo_port, _ = _echo_server()

    with ExitStack() as stack:
        log = stack.enter_context(open(os.path.join(workdir, "processes.log"), "wb"))
        twistd = [python, "-c", "from twisted.scripts.twistd import run; run()"]
        localproxy = [python, "-c", "from lpxy.proxy.cli import main; main()"]

        service = _spawn(
            [*twistd, "-n", "--pidfile=", "tunnelservice", "--db", ":memory:",
             "--port", f"tcp:{service_port}:interface=127.0.0.1"],
            log, env,
        )
        stack.callback(_stop, service)
        _wait_for_port(service_port, service, "tunnelservice")
        _say(f"tunnelservice listening on 127.0.0.1:{service_port}")

        tunnel = _api(service_port, "OpenTunnel", {
            "description": "lpxy demo",
            "destinationConfig": {"services": ["ECHO"]},
        })
        _say(f"opened tunnel {tunnel['tunnelId']}")

        endpoint = f"ws://127.0.0.1:{service_port}"
        destination = _spawn(
            [*localproxy, "-e", endpoint, "-d", f"ECHO=127.0.0.1:{echo_port}"],
            log, {**env, "AWSIOT_TUNNEL_ACCESS_TOKEN": str(tunnel["destinationAccessToken"])},
        )
        stack.callback(_stop, destination)
        source = _spawn(
            [*localproxy, "-e", endpoint, "-s", f"ECHO={source_port}", "-b", "127.0.0.1"],
            log, {**env, "AWSIOT_TUNNEL_ACCESS_TOKEN": str(tunnel["sourceAccessToken"])},
        )
        stack.callback(_stop, source)
        _wait_until_connected(service_port, str(tunnel["tunnelId"]), (source, destination))
        _wait_for_port(source_port, source, "source localproxy")
        _say(f"source localproxy listening on 127.0.0.1:{source_port}, "
             f"destination localproxy relaying to echo server on 127.0.0.1:{echo_port}")

        payload = os.urandom(size)
        started = time.monotonic()
        received = bytearray()
        with socket.create_connection(("127.0.0.1", source_port), timeout=_DEADLINE) as client:
            sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
            sender.start()
            while len(received) < size:
                chunk = client.recv(262144)
                if not chunk:
                    break
                received += chunk
            sender.join()
        elapsed = time.monotonic() - started

        intact = hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        _say(f"echoed {len(received)} of {size} bytes through the tunnel in {elapsed:.2f}s "
             f"({2 * size / elapsed / 1e6:.1f} MB/s both ways): "
             f"{'intact' if intact else 'CORRUPTED'}")

        _api(service_port, "CloseTunnel", {"tunnelId": tunnel["tunnelId"]})
        statuses = [p.wait(timeout=_DEADLINE) for p in (source, destination)]
        _say(f"closed the tunnel; proxies exited with {statuses[0]} and {statuses[1]}")
        _say(f"process logs: {log.name}")
        return 0 if intact and statuses == [0, 0] else 1


def run() -> None:
    """Console script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
