"""
The proxies under a real supervisord, configured as README.rst shows (the
settings of its C{[program:...]} example are read from the README, so the
README and this test cannot drift): both run in the foreground as
supervised programs and carry traffic; a killed proxy is restarted and
rejoins its tunnel; a refused token (exit 2, however fast) is not restarted;
when the tunnel is closed they exit 0, which supervisord takes as expected
and does not restart.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.apps import echo_round_trip, start_app
from tests.support.installed import ROOT, installed_copy, localproxy_argv, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.sockets import unused_port
from tests.support.tunnelservice import start_tunnelservice

SUPERVISORD = """\
[supervisord]
nodaemon=true
logfile={here}/supervisord.log
pidfile={here}/supervisord.pid
childlogdir={here}
"""

# Where the programs' output goes, so the test can read it; not the README's
# business.
OUTPUT = """\
redirect_stderr=true
stdout_logfile=/dev/fd/1
stdout_logfile_maxbytes=0
"""


def readme_program() -> list[str]:
    """
    The lines of README.rst's supervisord example after its
    C{[program:...]} header, up to the blank line ending it.
    """
    lines = (ROOT / "README.rst").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("[program:"))
    block = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line.strip())
    return block


def program(name: str, command: list[str], token_variable: str) -> str:
    """
    A C{[program:NAME]} section: README's settings, with its command and
    its token variable replaced.
    """
    lines = []
    for line in readme_program():
        key = line.partition("=")[0]
        if key == "command":
            line = f"command={quoted(command)}"
        elif key == "environment":
            line = line.replace("ENV_TUNNEL_TOKEN", f"ENV_{token_variable}")
        lines.append(line)
    return f"[program:{name}]\n" + "\n".join(lines) + "\n" + OUTPUT


def quoted(argv: list[str]) -> str:
    return " ".join(f"'{arg}'" if " " in arg or ";" in arg else arg for arg in argv)


class ReadmeExampleTests(SynchronousTestCase):
    """
    The README's example is what the supervised test below runs.
    """

    def test_settings(self) -> None:
        """
        It restarts only unexpected exits, takes 0 and 2 as expected, counts
        a process as started at once, takes the token from the environment.
        """
        settings = dict(line.partition("=")[::2] for line in readme_program())
        self.assertEqual(settings["autorestart"], "unexpected")
        self.assertEqual(settings["exitcodes"], "0,2")
        self.assertEqual(settings["startsecs"], "0")
        self.assertEqual(
            settings["environment"], 'AWSIOT_TUNNEL_ACCESS_TOKEN="%(ENV_TUNNEL_TOKEN)s"'
        )


class SupervisordTests(TestCase):
    timeout = 60

    async def test_supervisedTunnel(self) -> None:
        service = await start_tunnelservice(self)
        tunnel = service.open_tunnel(["ECHO"])
        echo_port, _ = await start_app(self)
        source_port = unused_port()
        endpoint = f"ws://127.0.0.1:{service.port}"
        here = Path(self.mktemp()).resolve()
        here.mkdir()
        (here / "supervisord.conf").write_text("\n".join([
            SUPERVISORD.format(here=here),
            program("destination", twistd_argv(
                "-n", "--pidfile=", "localproxy", "-e", endpoint,
                "-d", f"ECHO=127.0.0.1:{echo_port}",
            ), "DESTINATION_TOKEN"),
            program("source", localproxy_argv(
                "-e", endpoint, "-s", f"ECHO={source_port}", "-b", "127.0.0.1",
            ), "SOURCE_TOKEN"),
            # A refused token: exit 2.
            program("refused", localproxy_argv(
                "-e", endpoint, "-d", f"ECHO=127.0.0.1:{echo_port}",
            ), "REFUSED_TOKEN"),
            # Exit 2 within a few milliseconds, as the reference's refused
            # proxy does: without startsecs=0 supervisord would take it for a
            # failed start and try again (then give up).
            program("fast", [sys.executable, "-c", "raise SystemExit(2)"], "REFUSED_TOKEN"),
        ]))
        supervisord = spawn(self, [
            sys.executable, "-m", "supervisor.supervisord", "-c", str(here / "supervisord.conf"),
        ], {
            "DESTINATION_TOKEN": tunnel.destination_token,
            "SOURCE_TOKEN": tunnel.source_token,
            "REFUSED_TOKEN": "not-a-token-of-this-service",
            "PYTHONPATH": str(installed_copy()),
        })
        # Stop supervisord gently even when the test fails, so that it stops
        # its programs rather than orphaning them.
        self.addCleanup(self.stopSupervisord, supervisord)

        for name in ("refused", "fast"):
            await supervisord.wait_for(f"exited: {name} (exit status 2;")
            self.assertIn(f"exited: {name} (exit status 2; expected)", supervisord.output)
        await supervisord.wait_for(f"Listening for new connection on port {source_port}")
        await supervisord.wait_for("Connected as destination with subprotocol")
        await echo_round_trip(self, source_port, 300_000)

        # kill -9: supervisord restarts the source, which rejoins.
        pid = int(re.findall(r"spawned: 'source' with pid (\d+)", supervisord.output)[0])
        os.kill(pid, signal.SIGKILL)
        await supervisord.wait_for("exited: source (terminated by SIGKILL; not expected)")
        await supervisord.wait_for(
            f"Listening for new connection on port {source_port}", times=2
        )
        await echo_round_trip(self, source_port, 300_000)

        service.close_tunnel(tunnel.tunnel_id)
        await supervisord.wait_for("exited: source (exit status 0; expected)")
        await supervisord.wait_for("exited: destination (exit status 0; expected)")
        self.assertEqual(supervisord.output.count("spawned: 'source'"), 2, supervisord.output)
        self.assertEqual(supervisord.output.count("spawned: 'destination'"), 1)
        self.assertEqual(supervisord.output.count("spawned: 'refused'"), 1)
        self.assertEqual(supervisord.output.count("spawned: 'fast'"), 1)
        self.assertNotIn("gave up", supervisord.output)
        self.assertNotIn(tunnel.source_token, supervisord.output)
        self.assertNotIn(tunnel.destination_token, supervisord.output)

        supervisord.signal("TERM")
        self.assertEqual(await supervisord.ended, 0)

    async def stopSupervisord(self, supervisord: ChildProcess) -> None:
        if not supervisord.ended.called:
            supervisord.signal("TERM")
            await supervisord.ended
