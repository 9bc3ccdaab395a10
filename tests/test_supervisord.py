"""
The proxies under a real supervisord, configured as README.rst shows: both run
in the foreground as supervised programs, carry traffic, and when the tunnel
is closed they exit 0, which supervisord takes as expected and does not
restart.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support.apps import echo_round_trip, start_app
from tests.support.installed import installed_copy, localproxy_argv, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.sockets import unused_port
from tests.support.tunnelservice import start_tunnelservice

CONFIG = """\
[supervisord]
nodaemon=true
logfile={here}/supervisord.log
pidfile={here}/supervisord.pid
childlogdir={here}

[program:destination]
command={destination}
environment=AWSIOT_TUNNEL_ACCESS_TOKEN="{destination_token}",PYTHONPATH="{installed}"
autorestart=unexpected
exitcodes=0,2
stopsignal=TERM
redirect_stderr=true
stdout_logfile=/dev/fd/1
stdout_logfile_maxbytes=0

[program:source]
command={source}
environment=AWSIOT_TUNNEL_ACCESS_TOKEN="{source_token}",PYTHONPATH="{installed}"
autorestart=unexpected
exitcodes=0,2
stopsignal=TERM
redirect_stderr=true
stdout_logfile=/dev/fd/1
stdout_logfile_maxbytes=0
"""


def command(argv: list[str]) -> str:
    return " ".join(f"'{arg}'" if " " in arg or ";" in arg else arg for arg in argv)


class SupervisordTests(TestCase):
    timeout = 30
    async def test_supervisedTunnel(self) -> None:
        service = await start_tunnelservice(self)
        tunnel = service.open_tunnel(["ECHO"])
        echo_port, _ = await start_app(self)
        source_port = unused_port()
        endpoint = f"ws://127.0.0.1:{service.port}"
        here = Path(self.mktemp()).resolve()
        here.mkdir()
        (here / "supervisord.conf").write_text(CONFIG.format(
            here=here,
            installed=installed_copy(),
            destination=command(twistd_argv(
                "-n", "--pidfile=", "localproxy", "-e", endpoint,
                "-d", f"ECHO=127.0.0.1:{echo_port}",
            )),
            source=command(localproxy_argv(
                "-e", endpoint, "-s", f"ECHO={source_port}", "-b", "127.0.0.1",
            )),
            destination_token=tunnel.destination_token,
            source_token=tunnel.source_token,
        ))
        supervisord = spawn(self, [
            sys.executable, "-m", "supervisor.supervisord", "-c", str(here / "supervisord.conf"),
        ])
        # Stop supervisord gently even when the test fails, so that it stops
        # its programs rather than orphaning them.
        self.addCleanup(self.stopSupervisord, supervisord)

        await supervisord.wait_for(f"Listening on 127.0.0.1:{source_port}")
        await supervisord.wait_for("as destination: channel id")
        await echo_round_trip(self, source_port, 300_000)

        # supervisord judges an exit within startsecs (1 s) a failed start,
        # whatever its status: close the tunnel once both count as running.
        await supervisord.wait_for("success: destination entered RUNNING state")
        await supervisord.wait_for("success: source entered RUNNING state")

        service.close_tunnel(tunnel.tunnel_id)
        await supervisord.wait_for("exited: source (exit status 0; expected)")
        await supervisord.wait_for("exited: destination (exit status 0; expected)")
        self.assertEqual(supervisord.output.count("spawned: 'source'"), 1, supervisord.output)
        self.assertEqual(supervisord.output.count("spawned: 'destination'"), 1)
        self.assertNotIn(tunnel.source_token, supervisord.output)
        self.assertNotIn(tunnel.destination_token, supervisord.output)

        supervisord.signal("TERM")
        self.assertEqual(await supervisord.ended, 0)

    async def stopSupervisord(self, supervisord: ChildProcess) -> None:
        if not supervisord.ended.called:
            supervisord.signal("TERM")
            await supervisord.ended
