"""
End to end with real peers: OpenSSH's C{sshd} behind a destination proxy
and the C{ssh} client in front of a source proxy, and C{curl} fetching from
(and posting to) a C{twisted.web} server, through the real tunnel service.

The programs come from Debian's C{openssh-server}, C{openssh-client} and
C{curl}; a test whose program is missing is skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.static import File

from tests.support.proxies import start_pair, tcp
from tests.support.realpeers import (
    finished,
    program,
    run,
    scp_files,
    serve_http,
    ssh_argv,
    ssh_options,
    start_sshd,
)
from tests.support.tunnelservice import start_tunnelservice
from tests.support.waiting import gather

MB = 1_000_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SshTests(TestCase):
    """C{ssh} to C{sshd} through a V3 tunnel with service C{SSH}."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.sshd = yield Deferred.fromCoroutine(start_sshd(self))
        fixture = yield start_tunnelservice(self)
        pair = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(self.sshd.port)},
        ))
        self.port = pair.ports["SSH"]

    def ssh(self, command: str, stdin: bytes = b"") -> Deferred[bytes]:
        """Run C{command} over ssh; fire with its output once it exited 0."""
        child = run(self, ssh_argv(self.sshd, self.port, command), stdin)
        return Deferred.fromCoroutine(finished(self, child))

    @inlineCallbacks
    def test_upload(self) -> Any:
        """5 MB on ssh's standard input land intact in a remote file."""
        payload = os.urandom(5 * MB)
        target = self.sshd.directory / "uploaded"
        out = yield self.ssh(f"cat > {target} && sha256sum {target}; echo done", payload)
        self.assertEqual(out.split()[0].decode(), sha256(payload))
        self.assertTrue(out.endswith(b"done\n"), out[-200:])
        self.assertEqual(target.read_bytes(), payload)

    @inlineCallbacks
    def test_download(self) -> Any:
        """A remote 5 MB file comes back byte for byte."""
        payload = os.urandom(5 * MB)
        source = self.sshd.directory / "to-download"
        source.write_bytes(payload)
        out = yield self.ssh(f"cat {source}")
        self.assertEqual(len(out), len(payload))
        self.assertEqual(sha256(out), sha256(payload))

    @inlineCallbacks
    def test_both_ways_at_once(self) -> Any:
        """
        The remote C{cat} echoes 5 MB while ssh is still sending: data flows
        both ways through the tunnel at the same time.
        """
        payload = os.urandom(5 * MB)
        out = yield self.ssh("cat", payload)
        self.assertEqual(sha256(out), sha256(payload))

    @inlineCallbacks
    def test_remote_random_data(self) -> Any:
        """
        The remote side makes the data and its hash: the hash printed after
        the data matches what arrived.
        """
        made = self.sshd.directory / "made-remotely"
        out = yield self.ssh(
            f"head -c {MB} /dev/urandom > {made} && cat {made} && sha256sum < {made}"
        )
        data, digest = out[:MB], out[MB:]
        self.assertEqual(digest.split()[0].decode(), sha256(data))

    @inlineCallbacks
    def test_exit_status(self) -> Any:
        """The remote command's exit status comes back through the tunnel."""
        child = run(self, ssh_argv(self.sshd, self.port, "echo bye; exit 7"))
        status = yield child.ended
        self.assertEqual((status, bytes(child.stdout)), (7, b"bye\n"))

    @inlineCallbacks
    def test_two_sessions_at_once(self) -> Any:
        """
        Two ssh connections on the one V3 service at the same time, each
        echoing its own data: neither sees the other's bytes.
        """
        one, two = os.urandom(3 * MB), os.urandom(3 * MB)
        got = yield gather(self.ssh("cat", one), self.ssh("cat", two))
        self.assertEqual([sha256(g) for g in got], [sha256(one), sha256(two)])

    @inlineCallbacks
    def test_scp(self) -> Any:
        """C{scp} (over SFTP) copies a 5 MB file there and back."""
        scp = program("scp")
        files = scp_files(self, self.sshd, 5 * MB)
        payload, local, remote, back = files.payload, files.local, files.remote, files.back
        at = f"{self.sshd.user}@127.0.0.1"
        base = [scp, "-q", "-P", str(self.port), *ssh_options(self.sshd)]
        yield Deferred.fromCoroutine(finished(self, run(
            self, [*base, str(local), f"{at}:{remote}"],
        )))
        self.assertEqual(remote.read_bytes(), payload)
        yield Deferred.fromCoroutine(finished(self, run(
            self, [*base, f"{at}:{remote}", str(back)],
        )))
        self.assertEqual(back.read_bytes(), payload)


class Digest(Resource):
    """Answers a POST with the SHA-256 of its body."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        return sha256(request.content.read()).encode()


class CurlTests(TestCase):
    """C{curl} to a C{twisted.web} server through a tunnel with service C{HTTP}."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.curl = program("curl")
        self.files = Path(self.mktemp()).absolute()
        self.files.mkdir()
        root = File(str(self.files))
        root.putChild(b"digest", Digest())
        web_port, self.web = yield Deferred.fromCoroutine(serve_http(self, root))
        fixture = yield start_tunnelservice(self)
        pair = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["HTTP"], {"HTTP": tcp(web_port)},
        ))
        self.base = f"http://127.0.0.1:{pair.ports['HTTP']}"

    def fetch(self, name: str, *options: str) -> Deferred[bytes]:
        """Run curl on C{/name}; fire with its output once it exited 0."""
        argv = [self.curl, "-q", "-sS", "--fail", "--noproxy", "*", *options,
                f"{self.base}/{name}"]
        return Deferred.fromCoroutine(finished(self, run(self, argv)))

    @inlineCallbacks
    def test_download(self) -> Any:
        """curl writes a 3 MB file served through the tunnel, intact."""
        payload = os.urandom(3 * MB)
        (self.files / "file").write_bytes(payload)
        saved = Path(self.mktemp()).absolute()
        yield self.fetch("file", "-o", str(saved))
        self.assertEqual(saved.read_bytes(), payload)

    @inlineCallbacks
    def test_upload(self) -> Any:
        """A 3 MB POST body reaches the server intact."""
        payload = os.urandom(3 * MB)
        body = Path(self.mktemp()).absolute()
        body.write_bytes(payload)
        out = yield self.fetch("digest", "--data-binary", f"@{body}")
        self.assertEqual(out.decode(), sha256(payload))

    @inlineCallbacks
    def test_several_at_once(self) -> Any:
        """Five curls at once, each for its own file, each get theirs."""
        payloads = [os.urandom(2 * MB) for _ in range(5)]
        for i, payload in enumerate(payloads):
            (self.files / f"f{i}").write_bytes(payload)
        got = yield gather(*(self.fetch(f"f{i}") for i in range(5)))
        self.assertEqual([sha256(g) for g in got], [sha256(p) for p in payloads])
        self.assertEqual(self.web.served, 5)

    @inlineCallbacks
    def test_missing_file(self) -> Any:
        """A 404 from the server comes back through the tunnel to curl."""
        argv = [self.curl, "-q", "-sS", "--fail", "--noproxy", "*",
                "-o", os.devnull, "-w", "%{http_code}", f"{self.base}/nothing"]
        child = run(self, argv)
        status = yield child.ended
        self.assertEqual((status, bytes(child.stdout)), (22, b"404"))
