"""
Scraping a C{--metrics} endpoint as Prometheus does: a real HTTP request
(Twisted's Agent), the answer parsed with C{prometheus_client}'s parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

__all__ = ["Samples", "request", "scrape"]


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """Each sample's value by its name and labels."""

    def get_value(self, name: str, **labels: str) -> float | None:
        """The value of sample C{name} with exactly C{labels}, if scraped."""
        return self.get((name, frozenset(labels.items())))

    def by_label(self, name: str, label: str) -> Mapping[str, float]:
        """The values of sample C{name} by the value of C{label}."""
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.items()
            if sample == name and label in dict(labels)
        }


async def request(
    case: TestCase, port: int, path: bytes, method: bytes = b"GET",
    headers: Mapping[bytes, list[bytes]] | None = None, body: bytes | None = None,
) -> tuple[int, Headers, bytes]:
    """C{method} C{path} on 127.0.0.1:C{port}: the status, headers and body."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    case.addCleanup(pool.closeCachedConnections)
    agent = Agent(reactor, pool=pool)
    response = await agent.request(
        method, b"http://127.0.0.1:%d%s" % (port, path), Headers(dict(headers or {})),
        None if body is None else FileBodyProducer(BytesIO(body)),
    )
    return response.code, response.headers, await readBody(response)


async def scrape(case: TestCase, port: int, path: bytes = b"/metrics") -> Samples:
    """GET C{path} from 127.0.0.1:C{port}; parse the samples (status 200 expected)."""
    code, headers, body = await request(case, port, path)
    case.assertEqual(code, 200, body)
    [content_type] = headers.getRawHeaders(b"content-type") or [b""]
    case.assertTrue(content_type.startswith(b"text/plain"), content_type)
    samples = Samples()
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples
