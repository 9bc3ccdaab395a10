"""
C{localproxy --stdio} as C{ssh -o ProxyCommand} runs it: OpenSSH's C{ssh}
and C{scp} reach C{sshd} behind a destination proxy through the real tunnel
service, each starting the installed console script for its connection.

The programs come from Debian's C{openssh-server} and C{openssh-client}; a
test whose program is missing is skipped.
"""

from __future__ import annotations

import hashlib
import shlex

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.support.installed import installed_env, localproxy_argv
from tests.support.proxies import make_config, start_proxy, tcp
from tests.support.realpeers import finished, program, run, scp_files, ssh_options, start_sshd
from tests.support.tunnelservice import start_tunnelservice

MB = 1_000_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ProxyCommandTests(TestCase):
    """ssh and scp with ProxyCommand='localproxy ... --stdio SSH'."""

    timeout = 90

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.start())

    async def start(self) -> None:
        self.sshd = await start_sshd(self)
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["HTTP", "SSH"])
        await start_proxy(self, make_config(
            fixture, opened.destination_token, "destination",
            destination_apps={"SSH": tcp(self.sshd.port), "HTTP": tcp(1)},
        ))
        command = shlex.join(localproxy_argv(
            "-e", f"ws://127.0.0.1:{fixture.port}", "--stdio", "SSH",
        ))
        self.options = [
            *ssh_options(self.sshd),
            # The proxy's log joins ssh's standard error, which the child
            # keeps open: the child has ended only once the proxy has too.
            "-o", f"ProxyCommand={command}",
        ]
        env = installed_env({"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.source_token})
        self.env = {
            k: v for k, v in env.items()
            if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID") and not k.lower().endswith("_proxy")
        }

    async def test_ssh(self) -> None:
        """
        A command's output and exit status come back; the proxy logged to
        standard error only, and ended with the stream.
        """
        child = run(self, [
            program("ssh"), *self.options, f"{self.sshd.user}@device", "echo hello; exit 7",
        ], env=self.env)
        status = await child.ended
        self.assertEqual((status, bytes(child.stdout)), (7, b"hello\n"), child.output)
        log = bytes(child.stderr).decode()
        self.assertIn("Stream open: service 'SSH'", log)
        self.assertIn("Main loop terminated.", log)
        self.assertNotIn("Traceback", log)

    async def test_scp(self) -> None:
        """scp copies 4 MB there and back, each way through its own proxy process."""
        scp = program("scp")
        files = scp_files(self, self.sshd, 4 * MB)
        payload, local, remote, back = files.payload, files.local, files.remote, files.back
        at = f"{self.sshd.user}@device"
        base = [scp, "-q", *self.options]
        logs = []
        for argv in ([*base, str(local), f"{at}:{remote}"], [*base, f"{at}:{remote}", str(back)]):
            child = run(self, argv, env=self.env)
            await finished(self, child)
            logs.append(bytes(child.stderr).decode())
        self.assertEqual(sha256(remote.read_bytes()), sha256(payload))
        self.assertEqual(sha256(back.read_bytes()), sha256(payload))
        for log in logs:
            self.assertIn("Stream open: service 'SSH'", log)
            # ssh ends its ProxyCommand with SIGHUP: a clean stop, not a kill.
            self.assertIn("Main loop terminated.", log)
            self.assertNotIn("Traceback", log)
