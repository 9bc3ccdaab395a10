"""
Tests for L{lpxy.proxy.endpoints.HTTPConnectEndpoint}: the CONNECT exchange
with a web proxy, every answer a proxy may give, timeouts and cancellation,
and L{lpxy.proxy.endpoints.authority}.

The proxy is an endpoint that connects at once over a C{StringTransport};
time is a L{MemoryReactorClock}.
"""

from __future__ import annotations

from base64 import b64encode

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.endpoints import (
    CONNECT_TIMEOUT,
    MAX_ANSWER_HEAD,
    HTTPConnectEndpoint,
    WebProxyError,
    authority,
)
from tests.support.apps import Client, ClientFactory
from tests.support.memorynet import ImmediateEndpoint, TCPStringTransport

PASSWORD = "proxy-password-that-must-never-show"


class ConnectExchangeTests(SynchronousTestCase):
    """
    L{HTTPConnectEndpoint} over a fake proxy endpoint: the answers a proxy
    may give.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.proxy_transport = TCPStringTransport()
        self.proxy = ImmediateEndpoint(self.proxy_transport)
        self.endpoint = HTTPConnectEndpoint(
            self.clock,
            self.proxy,
            "tunnel.example.com",
            443,
            proxy_name="web proxy proxy.example.com:3128",
            username="user",
            password=PASSWORD,
        )

    def start(self) -> Deferred:
        d = self.endpoint.connect(ClientFactory(b"hello"))
        self.assertTrue(self.proxy_transport.value().startswith(b"CONNECT "))
        self.proxy_transport.clear()
        return d

    def answer(self, data: bytes) -> None:
        self.proxy.protocol.dataReceived(data)

    def lose(self) -> None:
        self.proxy.protocol.connectionLost(Failure(ConnectionDone()))

    def assertCleanFailure(self, d: Deferred, *fragments: str) -> WebProxyError:
        """
        The proxy connection was aborted; once it is lost C{d} fails with a
        L{WebProxyError} whose message holds C{fragments} and no secret.
        """
        self.assertTrue(self.proxy_transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoResult(d)
        self.lose()
        error = self.failureResultOf(d, WebProxyError).value
        message = str(error)
        self.assertIn("web proxy proxy.example.com:3128", message)
        self.assertIn("CONNECT tunnel.example.com:443", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        for secret in (PASSWORD, b64encode(b"user:" + PASSWORD.encode()).decode()):
            self.assertNotIn(secret, message)
            self.assertNotIn(secret, repr(error))
        return error

    def test_2xx(self) -> None:
        """
        Any 2xx opens the tunnel.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIsInstance(self.successResultOf(d), Client)
        self.assertEqual(self.proxy_transport.value(), b"hello")

    def test_answer_in_pieces(self) -> None:
        """
        The answer may come a byte at a time, with headers, and bytes after
        it belong to the tunnel.
        """
        d = self.start()
        answer = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 squid\r\n\r\nhello"
        for i in range(len(answer)):
            self.answer(answer[i : i + 1])
        protocol = self.successResultOf(d)
        self.assertEqual(self.successResultOf(protocol.answer), b"hello")

    def test_bare_newlines(self) -> None:
        """
        A proxy ending lines with a bare LF is understood.
        """
        d = self.start()
        self.answer(b"HTTP/1.0 200 OK\nServer: old\n\n")
        self.successResultOf(d)

    def test_data_and_close_pass_through(self) -> None:
        """
        Once open, data and the end of the connection reach the protocol.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        protocol = self.successResultOf(d)
        self.answer(b"hel")
        self.assertNoResult(protocol.answer)
        self.answer(b"lo")
        self.assertEqual(self.successResultOf(protocol.answer), b"hello")
        self.lose()
        self.successResultOf(protocol.closed)

    def test_close_before_open_reaches_protocol(self) -> None:
        """
        A tunnel that closes before the protocol got its answer reports
        the loss to the protocol, not to the connect Deferred.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        protocol = self.successResultOf(d)
        self.lose()
        self.failureResultOf(protocol.answer, ConnectionDone)

    def test_407(self) -> None:
        """
        407: credentials missing or refused, said so, nothing secret shown.
        """
        d = self.start()
        self.answer(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="proxy"\r\n\r\n'
        )
        self.assertCleanFailure(d, "407 Proxy Authentication Required", "credentials")

    def test_500(self) -> None:
        """
        A server error names the status.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        self.assertCleanFailure(d, "refused with 500 Internal Server Error")

    def test_status_without_reason(self) -> None:
        """
        A status line with no reason phrase is understood.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 403\r\n\r\n")
        self.assertCleanFailure(d, "refused with 403")

    def test_closed_before_answer(self) -> None:
        """
        The proxy closing before it answers fails the attempt.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 Conn")
        self.lose()
        error = self.failureResultOf(d, WebProxyError).value
        self.assertIn("closed before an answer: Connection was closed cleanly.", str(error))
        self.assertNotIn("..", str(error))
        self.assertIn("CONNECT tunnel.example.com:443", str(error))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_http(self) -> None:
        """
        Something that is not HTTP is refused, and what it said is shown
        only as printable text.
        """
        d = self.start()
        self.answer(b"SSH-2.0-OpenSSH_9.6\x1b[31m\r\n\r\n")
        error = self.assertCleanFailure(d, "not an HTTP answer")
        self.assertNotIn("\x1b", str(error))

    def test_head_too_long(self) -> None:
        """
        An answer head that never ends is cut off.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 200 OK\r\n")
        self.answer(b"X-Filler: " + b"x" * MAX_ANSWER_HEAD + b"\r\n")
        self.assertCleanFailure(d, "longer than")

    def test_data_after_failure_ignored(self) -> None:
        """
        Bytes arriving after a refusal (a body) are dropped.
        """
        d = self.start()
        self.answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n<html>")
        self.answer(b"more body")
        self.assertCleanFailure(d, "502 Bad Gateway")

    def test_timeout(self) -> None:
        """
        No answer in time fails the attempt and aborts the connection.
        """
        d = self.start()
        self.clock.advance(CONNECT_TIMEOUT - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertCleanFailure(d, "no answer within 30 seconds")

    def test_cancel(self) -> None:
        """
        Cancelling while the proxy has not answered aborts the connection
        and stops the timer.
        """
        d = self.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.proxy_transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose()

    def test_proxy_unreachable(self) -> None:
        """
        Failing to reach the proxy is a L{WebProxyError} that says so and
        why.
        """

        class Refusing:
            def connect(self, factory):
                return fail(ConnectionRefusedError("Connection refused"))

        endpoint = HTTPConnectEndpoint(
            self.clock,
            Refusing(),
            "tunnel.example.com",
            443,
            proxy_name="web proxy proxy.example.com:3128",
        )
        error = self.failureResultOf(endpoint.connect(ClientFactory()), WebProxyError)
        self.assertIn("web proxy proxy.example.com:3128", str(error.value))
        self.assertIn("cannot reach it: Connection was refused", str(error.value))

    def test_cancel_while_reaching_proxy(self) -> None:
        """
        Cancelling before the proxy is reached stays a cancellation.
        """

        class Pending:
            def connect(self, factory):
                return Deferred()

        endpoint = HTTPConnectEndpoint(
            self.clock, Pending(), "tunnel.example.com", 443, proxy_name="web proxy p:1"
        )
        d = endpoint.connect(ClientFactory())
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_repr_keeps_secrets(self) -> None:
        """
        The endpoint's repr says where it goes, not with what password.
        """
        text = repr(self.endpoint)
        self.assertIn("tunnel.example.com:443", text)
        self.assertNotIn(PASSWORD, text)

    def test_factory_start_stop(self) -> None:
        """
        The connecting factory's start and stop reach the protocol's
        factory.
        """
        events: list[str] = []

        class Recording(ClientFactory):
            def startFactory(self) -> None:
                events.append("start")

            def stopFactory(self) -> None:
                events.append("stop")

        d = self.endpoint.connect(Recording())
        self.proxy.factory.doStart()
        self.proxy.factory.doStop()
        self.assertEqual(events, ["start", "stop"])
        self.lose()
        self.failureResultOf(d, WebProxyError)


class AuthorityTests(SynchronousTestCase):
    """
    L{authority}: C{host:port} for HTTP.
    """

    def test_authority(self) -> None:
        self.assertEqual(authority("h.example", 3), "h.example:3")
        self.assertEqual(authority("::1", 3), "[::1]:3")
