"""
Tests for L{lpxy.proxy.addresses}: endpoint, mapping and web proxy parsers.
"""

from __future__ import annotations

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.addresses import (
    DESTINATION_FORM,
    SOURCE_FORM,
    TcpTarget,
    TunnelEndpoint,
    UnixTarget,
    WebProxy,
    no_proxy_matches,
    parse_destination_map,
    parse_endpoint,
    parse_no_proxy,
    parse_source_map,
    parse_web_proxy,
    reason_of,
    region_endpoint,
)
from lpxy.proxy.settings import ProxySettings

ENDPOINT_FORM = (
    "expected HOST[:PORT], [IPV6]:PORT, wss://HOST[:PORT] or ws://HOST[:PORT]"
)


class EndpointTests(SynchronousTestCase):
    """
    L{parse_endpoint} reads C{-e} as the reference does, plus URLs and
    bracketed IPv6.
    """

    def test_forms(self) -> None:
        """
        Each accepted form gives the host, port and TLS choice.
        """
        cases = {
            "data.tunneling.iot.us-east-1.amazonaws.com": TunnelEndpoint(
                "data.tunneling.iot.us-east-1.amazonaws.com", 443, True
            ),
            "Tunnel.Example.COM:8443": TunnelEndpoint("tunnel.example.com", 8443, True),
            "127.0.0.1:9000": TunnelEndpoint("127.0.0.1", 9000, True),
            "[::1]:9000": TunnelEndpoint("::1", 9000, True),
            "[::1]": TunnelEndpoint("::1", 443, True),
            "::1": TunnelEndpoint("::1", 443, True),
            "wss://tunnel.example.com": TunnelEndpoint("tunnel.example.com", 443, True),
            "wss://tunnel.example.com:4443/": TunnelEndpoint("tunnel.example.com", 4443, True),
            "ws://127.0.0.1:8080": TunnelEndpoint("127.0.0.1", 8080, False),
            "WS://localhost": TunnelEndpoint("localhost", 80, False),
            "ws://[::1]:8080": TunnelEndpoint("::1", 8080, False),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_endpoint(text), expected, text)

    def test_bad(self) -> None:
        """
        Everything else is refused with the valid forms.
        """
        characters = "Proxy endpoint contains invalid characters"
        for text in [
            "", "host:", "host:0", "host:65536", "host:x", "ho st", "host/path",
            "-host", "[::1", "[nothex]:1", "1:2:3", "wss://", "wss://h/tunnel",
            "ws://h?x=1", "ws://u@h", "http://h", "a" * 254,
        ]:
            e = self.assertRaises(ValueError, parse_endpoint, text)
            self.assertEqual(str(e), f"{ENDPOINT_FORM}, got {text!r}")
            if not text:
                reason = "Proxy endpoint cannot be empty"
            elif len(text) > 253:
                reason = "Proxy endpoint exceeds maximum allowed length"
            elif " " in text or "/" in text:
                reason = characters
            else:
                reason = f"Invalid endpoint specified: {text}"
            self.assertEqual(reason_of(e), reason, text)

    def test_urlForm(self) -> None:
        """
        L{TunnelEndpoint.url} brackets IPv6 literals and names the mode.
        """
        self.assertEqual(
            parse_endpoint("ws://[::1]:8080").url("source"),
            "ws://[::1]:8080/tunnel?local-proxy-mode=source",
        )

    def test_origin(self) -> None:
        """
        L{TunnelEndpoint.origin} is the URL up to the port, for logs.
        """
        self.assertEqual(parse_endpoint("ws://[::1]:8080").origin(), "ws://[::1]:8080")
        self.assertEqual(parse_endpoint("h.example").origin(), "wss://h.example:443")


class RegionTests(SynchronousTestCase):
    """
    L{region_endpoint} uses the overrides first, then the format.
    """

    def test_format(self) -> None:
        """
        An ordinary region fills in C{endpoint_format}.
        """
        self.assertEqual(
            region_endpoint("eu-west-1", ProxySettings()),
            TunnelEndpoint("data.tunneling.iot.eu-west-1.amazonaws.com"),
        )

    def test_china(self) -> None:
        """
        The China regions end in C{.amazonaws.com.cn}.
        """
        for region in ("cn-north-1", "cn-northwest-1"):
            self.assertEqual(
                region_endpoint(region, ProxySettings()),
                TunnelEndpoint(f"data.tunneling.iot.{region}.amazonaws.com.cn"),
            )

    def test_userOverrideAndFormat(self) -> None:
        """
        A user override may carry a port; a user format applies to the
        other regions.
        """
        settings = evolve(
            ProxySettings(),
            endpoint_format="tunnel.%s.example.net",
            region_endpoint_overrides={"lab-1": "lab.example.net:8443"},
        )
        self.assertEqual(
            region_endpoint("lab-1", settings), TunnelEndpoint("lab.example.net", 8443)
        )
        self.assertEqual(
            region_endpoint("us-east-1", settings),
            TunnelEndpoint("tunnel.us-east-1.example.net"),
        )

    def test_badRegion(self) -> None:
        """
        A region is lower-case letters, digits and dashes, at most 64.
        """
        form = "Region must contain only lowercase letters, numbers, and hyphens"
        for region, reason in (
            ("US-EAST-1", form), ("", "Region cannot be empty"), ("us_east_1", form),
            ("a" * 65, "Region exceeds maximum allowed length"), ("us.east", form),
        ):
            e = self.assertRaises(ValueError, region_endpoint, region, ProxySettings())
            self.assertEqual(
                str(e),
                "expected lower-case letters, digits and '-' (at most 64),"
                f" e.g. us-east-1, got {region!r}",
            )
            self.assertEqual(reason_of(e), reason, region)

    def test_badOverride(self) -> None:
        """
        An override that is not a host names the region.
        """
        settings = evolve(ProxySettings(), region_endpoint_overrides={"x-1": "a b"})
        e = self.assertRaises(ValueError, region_endpoint, "x-1", settings)
        self.assertEqual(str(e), f"region x-1 gives a bad endpoint: {ENDPOINT_FORM}, got 'a b'")


class SourceMapTests(SynchronousTestCase):
    """
    L{parse_source_map} reads C{-s}.
    """

    def test_forms(self) -> None:
        """
        One bare port is the unnamed mapping; named ports keep their ids;
        blanks and empty items are skipped.
        """
        self.assertEqual(parse_source_map("5555"), {"": 5555})
        self.assertEqual(parse_source_map(" 5555 ,"), {"": 5555})
        self.assertEqual(
            parse_source_map("SSH1=5555, HTTP1 = 8080,,"), {"SSH1": 5555, "HTTP1": 8080}
        )
        self.assertEqual(parse_source_map("a_b-C=1,Z=65535"), {"a_b-C": 1, "Z": 65535})
        self.assertEqual(parse_source_map("x" * 128 + "=1"), {"x" * 128: 1})

    def test_bad(self) -> None:
        """
        Each mistake is named, followed by the valid form.
        """
        range_ = "Port must be between 1 and 65535"
        several = "Wrong format for the port mappings! Example: SSH1=5555,SSH2=6666."
        cases = {
            "": ("empty mapping", None),
            " , ,": ("empty mapping", None),
            "0": ("port '0' is not 1..65535", range_),
            "65536": ("port '65536' is not 1..65535", range_),
            "99999999999": ("port '99999999999' is not 1..65535", "Port value is too large"),
            "SSH=70000": ("port '70000' is not 1..65535", range_),
            "SSH=localhost:22": (
                "port 'localhost:22' is not 1..65535", "Port must contain only digits"
            ),
            "SSH=": (
                "'SSH=' has no endpoint",
                "Wrong format for the port mappings: SSH= .Example: SSH1=5555",
            ),
            "=22": (
                "service id '' is not 1 to 128 of [a-zA-Z0-9_-]",
                "Wrong format for the port mappings: =22 .Example: SSH1=5555",
            ),
            "S.1=22": (
                "service id 'S.1' is not 1 to 128 of [a-zA-Z0-9_-]",
                "Service ID must contain only alphanumeric characters, hyphens, and"
                " underscores",
            ),
            "x" * 129 + "=1": (
                f"service id {'x' * 129!r} is not 1 to 128 of [a-zA-Z0-9_-]",
                "Service ID exceeds maximum allowed length",
            ),
            "SSH=22,SSH=23": ("service id 'SSH' given twice", None),
            "22,23": ("'22' needs an ID= when there are several", several),
            "SSH=22,23": ("'23' needs an ID= when there are several", several),
        }
        for text, (problem, reason) in cases.items():
            e = self.assertRaises(ValueError, parse_source_map, text)
            self.assertEqual(str(e), f"{problem}: expected {SOURCE_FORM}", text)
            self.assertEqual(reason_of(e), reason, text)


class DestinationMapTests(SynchronousTestCase):
    """
    L{parse_destination_map} reads C{-d}.
    """

    def test_forms(self) -> None:
        """
        A bare port goes to the default host; host:port, [v6]:port and Unix
        socket paths are taken as given.
        """
        cases = {
            "22": {"": TcpTarget("127.0.0.1", 22)},
            "db.local:5432": {"": TcpTarget("db.local", 5432)},
            "[::1]:22": {"": TcpTarget("::1", 22)},
            "/run/app.sock": {"": UnixTarget("/run/app.sock")},
            "./app.sock": {"": UnixTarget("./app.sock")},
            "SSH1=22,HTTP1=host:80,V6=[fe80::1]:8080,U=/tmp/u.sock": {
                "SSH1": TcpTarget("127.0.0.1", 22),
                "HTTP1": TcpTarget("host", 80),
                "V6": TcpTarget("fe80::1", 8080),
                "U": UnixTarget("/tmp/u.sock"),
            },
        }
        for text, expected in cases.items():
            self.assertEqual(parse_destination_map(text, "127.0.0.1"), expected, text)

    def test_defaultHost(self) -> None:
        """
        The default host (C{-b}) applies to bare ports only.
        """
        self.assertEqual(
            parse_destination_map("A=22,B=h:1", "10.1.2.3"),
            {"A": TcpTarget("10.1.2.3", 22), "B": TcpTarget("h", 1)},
        )

    def test_bad(self) -> None:
        """
        Each mistake is named, followed by the valid form.
        """
        range_ = "Port must be between 1 and 65535"
        cases = {
            "": ("empty mapping", None),
            "0": ("port '0' is not 1..65535", range_),
            "99999999999": ("port '99999999999' is not 1..65535", "Port value is too large"),
            "host": ("bad endpoint 'host' (no port)", None),
            "host:0": ("bad endpoint 'host:0' (port '0' is not 1..65535)", range_),
            "localhost:abc": (
                "bad endpoint 'localhost:abc' (port 'abc' is not 1..65535)",
                "Port must contain only digits",
            ),
            "::1:22": ("bad endpoint '::1:22' (no port)", None),
            "[::1]": ("bad endpoint '[::1]' (no port)", None),
            "a b:1": (
                "bad endpoint 'a b:1' (bad host name 'a b')",
                "Bind address contains invalid characters",
            ),
            "local host:22": (
                "bad endpoint 'local host:22' (bad host name 'local host')",
                "Bind address contains invalid characters",
            ),
            "SSH=22,SSH=h:1": ("service id 'SSH' given twice", None),
            "S SH=22": (
                "service id 'S SH' is not 1 to 128 of [a-zA-Z0-9_-]",
                "Service ID must contain only alphanumeric characters, hyphens, and"
                " underscores",
            ),
        }
        for text, (problem, reason) in cases.items():
            e = self.assertRaises(ValueError, parse_destination_map, text, "127.0.0.1")
            self.assertEqual(str(e), f"{problem}: expected {DESTINATION_FORM}", text)
            self.assertEqual(reason_of(e), reason, text)


class WebProxyTests(SynchronousTestCase):
    """
    L{parse_web_proxy} reads C{https_proxy} as protocol.md section 8 says.
    """

    def test_forms(self) -> None:
        """
        Scheme, credentials (percent-decoded), host and port.
        """
        cases = {
            "proxy.corp": WebProxy("proxy.corp", 3128, False),
            "http://proxy.corp:8080": WebProxy("proxy.corp", 8080, False),
            "http://proxy.corp:8080/": WebProxy("proxy.corp", 8080, False),
            "HTTPS://proxy.corp": WebProxy("proxy.corp", 3128, True),
            "http://[::1]:3129": WebProxy("::1", 3129, False),
            "http://al%40ice:p%3Ass@proxy.corp:1": WebProxy(
                "proxy.corp", 1, False, "al@ice", "p:ss"
            ),
            "http://bob@proxy.corp": WebProxy("proxy.corp", 3128, False, "bob", None),
            "user:pw@10.0.0.1:3128": WebProxy("10.0.0.1", 3128, False, "user", "pw"),
        }
        for text, expected in cases.items():
            parsed = parse_web_proxy(text)
            self.assertEqual(parsed, expected, text)
            self.assertEqual(parsed.password, expected.password, text)

    def test_passwordNotInRepr(self) -> None:
        """
        The password is left out of the repr.
        """
        self.assertNotIn("sekrit", repr(parse_web_proxy("http://u:sekrit@h")))

    def test_bad(self) -> None:
        """
        Other schemes and malformed hosts are refused without echoing the
        value.
        """
        form = "expected [http|https]://[USER:PASSWORD@]HOST[:PORT]"
        cases = {
            "socks5://u:sekrit@h": f"unsupported scheme 'socks5': {form}",
            "http://u:sekrit@": form,
            "http://u:sekrit@h:0": form,
            "http://u:sekrit@h/path": form,
            "http://u:sekrit@h:x": form,
        }
        for text, message in cases.items():
            e = self.assertRaises(ValueError, parse_web_proxy, text)
            self.assertEqual(str(e), message)


class NoProxyTests(SynchronousTestCase):
    """
    L{no_proxy_matches} decides which endpoints bypass the web proxy.
    """

    def test_parse(self) -> None:
        """
        Entries are trimmed and lower-cased; blanks are dropped.
        """
        self.assertEqual(
            parse_no_proxy(" Example.COM, ,.corp,10.0.0.0/8,"),
            ("example.com", ".corp", "10.0.0.0/8"),
        )

    def test_matches(self) -> None:
        """
        Wildcard, domains with subdomains, ports, addresses and networks.
        """
        entries = parse_no_proxy("example.com,.corp,host.net:8443,10.0.0.0/8,::1,[fd00::1]:9")
        yes = [
            ("example.com", 443), ("a.b.example.com", 443), ("x.corp", 1),
            ("host.net", 8443), ("10.1.2.3", 443), ("::1", 443), ("fd00::1", 9),
            ("EXAMPLE.com", 443),
        ]
        no = [
            ("badexample.com", 443), ("corp.example.org", 443), ("host.net", 443),
            ("11.0.0.1", 443), ("::2", 443), ("fd00::1", 10), ("example.org", 443),
        ]
        for host, port in yes:
            self.assertTrue(no_proxy_matches(host, port, entries), (host, port))
        for host, port in no:
            self.assertFalse(no_proxy_matches(host, port, entries), (host, port))
        self.assertTrue(no_proxy_matches("anything", 1, ("*",)))
        self.assertFalse(no_proxy_matches("anything", 1, ()))
