"""
The reference proxy's milestone log lines (C{messages.md} section 2),
phrase by phrase, from a running lpxy: in process, through a real tunnel
service on loopback, with a log recorder; and the C{localproxy} console
script's line format (section 3) from a real process.

L{PHRASES} quotes the sheet; each test finds a log line that starts with
the phrase (placeholders filled with what the test knows), at a level the
default C{-v 4} shows. lpxy may say more after the phrase, and in lines of
its own.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from lpxy.proxy.addresses import TunnelEndpoint
from lpxy.proxy.attempts import connect_failure
from lpxy.proxy.config import ProxyConfig, UnixTarget
from tests.support.apps import AppFactory, connect_client, start_app
from tests.support.certs import make_test_pki
from tests.support.installed import localproxy_argv
from tests.support.logs import LogRecorder
from tests.support.processes import spawn
from tests.support.proxies import make_config, start_pair, start_proxy, tcp
from tests.support.tunnelservice import start_tunnelservice
from tests.support.waiting import gather

# messages.md section 2, as the sheet writes each line; <...> is filled in.
PHRASES = {
    "start": "Starting proxy in <mode> mode",
    "attempt": "Attempting to establish web socket connection with endpoint <url>",
    "session": "Web socket session ID: <id>",
    "established": "Successfully established websocket connection with proxy server: <url>",
    "listening": "Listening for new connection on port <port>",
    "accepted": "Accepted tcp connection on port <localport> from <ip>:<port>",
    "dst attempt": "Attempting to establish tcp socket connection to: <endpoint>",
    "connected": "Connected to <ip>, port: <port>",
    "unix": "Connected to Unix socket: <path>",
    "disconnected": "Disconnected from: <ip>:<port>",
    "close": "Web socket close received. Code: <code>; Reason: <reason>",
    "rejected": "Proxy server rejected web socket upgrade request: (<status line>) \"<body>\"",
    "refused": "Could not connect to proxy server: Connection refused",
    "dns": "Could not resolve DNS hostname of proxy host: <host> - <why>",
    "tls": "Could not perform SSL handshake with proxy server: certificate verify failed",
    "bind": "Could not bind to address: <ip>:<port> -- <msg>",
}

# messages.md section 3.
REFERENCE_LINE = (
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] \(0x[0-9a-f]{16}\) "
    r"\[(trace|debug|info|warning|error|fatal)\] (.*)$"
)


def phrase(name: str, **values: object) -> re.Pattern[str]:
    """
    The sheet's line C{name} as a pattern matching the start of a log
    line: placeholders given in C{values} (C{status_line} for C{<status
    line>}) must be those values, the others anything.
    """
    parts = re.split(r"(<[^>]+>)", PHRASES[name])
    pattern = ""
    for part in parts:
        if part.startswith("<") and part.endswith(">"):
            key = part[1:-1].replace(" ", "_")
            pattern += re.escape(str(values[key])) if key in values else r".+?"
        else:
            pattern += re.escape(part)
    return re.compile("^" + pattern)


class PhraseCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.logs = LogRecorder(self)

    def lines(self, name: str, **values: object) -> list[str]:
        """The recorded lines with phrase C{name}, each shown at C{-v 4}."""
        pattern = phrase(name, **values)
        found = []
        for event in self.logs.events:
            text = formatEvent(event)
            if pattern.match(text):
                self.assertGreaterEqual(event.get("log_level", LogLevel.info), LogLevel.info, text)
                found.append(text)
        return found

    def assertPhrase(self, name: str, **values: object) -> str:
        """Some recorded line has phrase C{name}; the first one."""
        found = self.lines(name, **values)
        self.assertTrue(found, f"no {PHRASES[name]!r} in {self.logs.texts()}")
        return found[0]

    def assertNoTokenLogged(self, *tokens: str) -> None:
        for token in tokens:
            self.assertEqual(self.logs.mentioning(token), [])


class SessionPhraseTests(PhraseCase):
    """
    A tunnel's life through both proxies says what the reference says.
    """

    @inlineCallbacks
    def test_tunnel(self) -> Any:
        """
        Starting, connecting, the session ID, listening, an accepted
        client, the destination's connection to its application, the
        disconnects and the service's close each have their line.
        """
        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        destination, source, ports, tunnel_id = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(app_port)},
        ))
        url = f"ws://127.0.0.1:{fixture.port}"
        self.assertPhrase("start", mode="source")
        self.assertPhrase("start", mode="destination")
        self.assertEqual(len(self.lines("attempt", url=url)), 2)
        self.assertEqual(len(self.lines("established", url=url)), 2)
        ids = {line.split(": ", 1)[1] for line in self.lines("session")}
        self.assertEqual(
            ids, {proxy.connector.protocol.channel_id for proxy in (destination, source)}
        )
        self.assertPhrase("listening", port=ports["SSH"])

        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"ping")
        yield client.received(4)
        local = client.transport.getHost()
        self.assertPhrase("accepted", localport=ports["SSH"], ip="127.0.0.1", port=local.port)
        self.assertPhrase("dst attempt", endpoint=f"127.0.0.1:{app_port}")
        self.assertPhrase("connected", ip="127.0.0.1", port=app_port)

        client.transport.loseConnection()
        yield client.closed
        yield self.logs.when(" bytes received in ", 2)
        self.assertPhrase("disconnected", ip="127.0.0.1", port=local.port)
        self.assertPhrase("disconnected", ip="127.0.0.1", port=app_port)
        # lpxy's own byte counts stay.
        self.assertEqual(len(self.logs.texts("4 bytes sent, 4 bytes received")), 2)

        fixture.close_tunnel(tunnel_id)
        statuses = yield gather(source.whenDone(), destination.whenDone())
        self.assertEqual(statuses, [0, 0])
        self.assertEqual(len(self.lines("close", code=1000)), 2)
        self.assertNoTokenLogged(source._config.access_token, destination._config.access_token)

    @inlineCallbacks
    def test_unix_socket(self) -> Any:
        """
        A destination application on a Unix socket: C{Connected to Unix
        socket: <path>}.
        """
        # Relative: a socket path has a short length limit.
        path = self.mktemp()
        app = AppFactory()
        listening = reactor.listenUNIX(path, app)  # type: ignore[attr-defined]
        self.addCleanup(lambda: gather(listening.stopListening(), app.all_closed()))
        fixture = yield start_tunnelservice(self)
        _, _, ports, _ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": UnixTarget(path)},
        ))
        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"ping")
        yield client.received(4)
        self.assertPhrase("unix", path=path)
        client.transport.loseConnection()
        yield client.closed


class FailurePhraseTests(PhraseCase):
    """
    What stops or delays a connection is said in the reference's words.
    """

    @inlineCallbacks
    def test_rejected(self) -> Any:
        """
        A refused upgrade names the status line and the service's answer.
        """
        fixture = yield start_tunnelservice(self)
        config = make_config(fixture, "not-a-token", "source", source_ports={"SSH": 0})
        service = yield Deferred.fromCoroutine(start_proxy(self, config, wait=False))
        status = yield service.whenDone()
        self.assertEqual(status, 2)
        line = self.assertPhrase("rejected", status_line="HTTP/1.1 401 Unauthorized")
        self.assertRegex(line, r'^[^"]+ "Invalid access token[^"]*";')
        self.assertNoTokenLogged("not-a-token")

    @inlineCallbacks
    def test_refused(self) -> Any:
        """
        Nothing listening at the endpoint: C{Connection refused}.
        """
        fixture = yield start_tunnelservice(self)
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        closed = port.getHost().port
        yield port.stopListening()
        config = evolve(
            make_config(fixture, "some-token", "source", source_ports={"SSH": 0},
                        connect_retry_count=1, retry_delay_ms=1),
            endpoint=TunnelEndpoint("127.0.0.1", closed, tls=False),
        )
        service = yield Deferred.fromCoroutine(start_proxy(self, config, wait=False))
        status = yield service.whenDone()
        self.assertEqual(status, 3)
        self.assertEqual(len(self.lines("refused")), 2)
        self.assertEqual(
            len(self.lines("attempt", url=f"ws://127.0.0.1:{closed}")), 2
        )

    @inlineCallbacks
    def test_bind(self) -> Any:
        """
        A source port already taken: C{Could not bind to address}, naming
        the address and port.
        """
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        fixture = yield start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH"])
        config = make_config(fixture, opened.source_token, "source",
                             source_ports={"SSH": busy_port})
        service = yield Deferred.fromCoroutine(start_proxy(self, config, wait=False))
        status = yield service.whenDone()
        self.assertEqual(status, 1)
        line = self.assertPhrase("bind", ip="127.0.0.1", port=busy_port)
        self.assertIn("in use", line)


class DNSPhraseTests(SynchronousTestCase):
    def test_dns(self) -> None:
        """
        A host name that does not resolve: the reference's DNS line,
        naming the host.
        """
        text = connect_failure(
            Failure(DNSLookupError("data.tunneling.iot.nowhere.invalid")),
            "data.tunneling.iot.nowhere.invalid",
        )
        self.assertRegex(text, phrase("dns", host="data.tunneling.iot.nowhere.invalid"))

    def test_refused(self) -> None:
        text = connect_failure(Failure(ConnectionRefusedError()), "example.com")
        self.assertRegex(text, phrase("refused"))


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class TLSPhraseTests(PhraseCase):
    """
    A failed certificate or name check says so, naming what was checked
    and pointing at C{-c}: not only Autobahn's "closed uncleanly".
    """

    @inlineCallbacks
    def failed_line(
        self, hostnames: tuple[str, ...], capath: bool, address: str = "127.0.0.1"
    ) -> Any:
        directory = Path(self.mktemp())
        directory.mkdir()
        pki = make_test_pki(directory, hostnames)
        fixture = yield start_tunnelservice(self, tls=pki, interface=address)
        opened = fixture.open_tunnel(["SSH"])
        config: ProxyConfig = evolve(
            make_config(fixture, opened.source_token, "source", source_ports={"SSH": 0},
                        connect_retry_count=1, retry_delay_ms=1),
            endpoint=TunnelEndpoint(address, fixture.port, tls=True),
            capath=str(pki.ca_dir) if capath else None,
        )
        service = yield Deferred.fromCoroutine(start_proxy(self, config, wait=False))
        status = yield service.whenDone()
        self.assertEqual(status, 3)
        lines = self.lines("tls")
        self.assertEqual(len(lines), 2, self.logs.texts())
        self.assertNoTokenLogged(opened.source_token)
        return lines[0]

    @inlineCallbacks
    def test_address_not_in_certificate(self) -> Any:
        """
        The CA is trusted but the certificate lacks the address connected
        to (as over IPv6 with a certificate without C{::1}): the line names
        the address and C{-c/--capath}.
        """
        line = yield self.failed_line(("localhost",), capath=True)
        self.assertIn("'127.0.0.1'", line)
        self.assertIn("-c/--capath", line)
        self.assertNotIn("closed uncleanly", line)

    @inlineCallbacks
    def test_ipv6_not_in_certificate(self) -> Any:
        """
        Over IPv6 with a certificate for C{localhost} and C{127.0.0.1} but
        not C{::1}: the line names C{::1}, not Autobahn's "closed
        uncleanly".
        """
        if not _ipv6_loopback():
            raise SkipTest("no IPv6 loopback here")
        line = yield self.failed_line(("localhost", "127.0.0.1"), capath=True, address="::1")
        self.assertIn("'::1'", line)
        self.assertIn("-c/--capath", line)
        self.assertNotIn("closed uncleanly", line)

    @inlineCallbacks
    def test_untrusted(self) -> Any:
        """
        A certificate from a CA the proxy does not trust: the line points
        at C{-c/--capath}.
        """
        line = yield self.failed_line(("localhost", "127.0.0.1"), capath=False)
        self.assertIn("-c/--capath", line)
        self.assertIn("'127.0.0.1'", line)


class ConsoleFormatTests(TestCase):
    """
    The installed C{localproxy} writes the reference's log lines to
    standard error.
    """

    timeout = 120

    async def test_lines(self) -> None:
        """
        Every line of a destination's whole life matches the sheet's regex,
        milestones included; standard output stays empty.
        """
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH"])
        child = spawn(
            self,
            localproxy_argv("-e", f"ws://127.0.0.1:{fixture.port}", "-d", "SSH=1"),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.destination_token},
        )
        await child.wait_for("Successfully established websocket connection")
        fixture.close_tunnel(opened.tunnel_id)
        await child.ended
        self.assertEqual(child.status, 0, child.output)
        self.assertEqual(bytes(child.stdout), b"")
        lines = bytes(child.stderr).decode().splitlines()
        messages = []
        for line in lines:
            match = re.match(REFERENCE_LINE, line)
            self.assertIsNotNone(match, line)
            assert match is not None
            messages.append((match.group(1), match.group(2)))
        url = f"ws://127.0.0.1:{fixture.port}"
        expected = [
            ("info", phrase("start", mode="destination")),
            ("info", phrase("attempt", url=url)),
            ("info", phrase("session")),
            ("info", phrase("established", url=url)),
            ("info", phrase("close", code=1000)),
        ]
        for severity, pattern in expected:
            self.assertTrue(
                any(s == severity and pattern.match(m) for s, m in messages),
                f"no [{severity}] {pattern.pattern} in {lines}",
            )
        self.assertNotIn(opened.destination_token, child.output)
