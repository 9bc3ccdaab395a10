"""
The console scripts a pipx install exposes, run as the install wrote them:
C{lpxy-tunnelservice} (C{twistd tunnelservice} under its own name, the same
options) and C{lpxy-demo}'s command line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.installed import (
    console_script,
    installed_copy,
    installed_env,
    outside_dir,
    twistd_argv,
)
from tests.support.processes import spawn
from tests.support.tunnelservice import api_client

_LISTENING = re.compile(r"Tunnel service listening on 127\.0\.0\.1 port (\d+)")
_OPTION = re.compile(r"^\s+(?:-\w, )?(--[\w-]+)", re.M)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=outside_dir(), env=installed_env(), capture_output=True, text=True,
        timeout=60,
    )


class TunnelServiceScriptTests(TestCase):
    """C{lpxy-tunnelservice}, the installed console script."""

    def setUp(self) -> None:
        installed_copy()

    def test_help(self) -> None:
        """
        C{--help} names the script and lists exactly the options of
        C{twistd tunnelservice --help}.
        """
        script = _run([console_script("lpxy-tunnelservice"), "--help"])
        self.assertEqual(script.returncode, 0, script.stderr)
        self.assertTrue(
            script.stdout.startswith("Usage: lpxy-tunnelservice [--port ENDPOINT]..."),
            script.stdout,
        )
        plugin = _run(twistd_argv("tunnelservice", "--help"))
        self.assertEqual(plugin.returncode, 0, plugin.stderr)
        options = _OPTION.findall(script.stdout)
        self.assertIn("--db", options)
        self.assertIn("--credentials", options)
        self.assertEqual(sorted(options), sorted(_OPTION.findall(plugin.stdout)))

    def test_badOption(self) -> None:
        """An unknown option: one line naming it and the pointer to --help, exit 1."""
        result = _run([console_script("lpxy-tunnelservice"), "--no-such-option"])
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            "lpxy-tunnelservice: option --no-such-option not recognized\n"
            "Try 'lpxy-tunnelservice --help' for a list of options.\n",
        )
        self.assertEqual(result.stdout, "")

    def test_badValue(self) -> None:
        """A value the plugin refuses is refused the same way, naming the option."""
        result = _run([console_script("lpxy-tunnelservice"), "--max-services", "0"])
        self.assertEqual(result.returncode, 1)
        self.assertIn("--max-services must be a positive integer, not '0'", result.stderr)

    async def test_serveAndSigterm(self) -> None:
        """
        It serves the management API on the given port and ends with status
        0 on SIGTERM, logging to standard output as C{twistd -n} does.
        """
        process = spawn(self, [
            console_script("lpxy-tunnelservice"),
            "--port", "tcp:0:interface=127.0.0.1", "--db", ":memory:",
        ])
        await process.wait_for("Tunnel service ready")
        listening = _LISTENING.search(process.output)
        assert listening is not None, process.output
        port = int(listening.group(1))

        def open_and_list() -> dict[str, Any]:
            client = api_client(f"http://127.0.0.1:{port}")
            opened = client.open_tunnel(destinationConfig={"services": ["SSH"]})
            return {"opened": opened, "listed": client.list_tunnels()["tunnelSummaries"]}

        result = await deferToThread(open_and_list)
        self.assertEqual(
            [t["tunnelId"] for t in result["listed"]], [result["opened"]["tunnelId"]]
        )
        process.signal("TERM")
        self.assertEqual(await process.ended, 0)
        self.assertIn("Tunnel service ready", bytes(process.stdout).decode())
        self.assertNotIn(result["opened"]["sourceAccessToken"], process.output)


class DemoScriptTests(TestCase):
    """C{lpxy-demo}'s command line (the demo itself: tests/test_demo.py)."""

    def test_help(self) -> None:
        """C{--help} prints the usage and what the demo does, exit 0."""
        result = _run([console_script("lpxy-demo"), "--help"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("usage: lpxy-demo [-h] [BYTES]"))
        self.assertIn("echo server", result.stdout)
        self.assertEqual(result.stderr, "")

    def test_badSize(self) -> None:
        """A size that is not a positive number: the argument named, exit 1, no traceback."""
        for bad in ("lots", "0", "-5"):
            result = _run([console_script("lpxy-demo"), "--", bad] if bad.startswith("-")
                          else [console_script("lpxy-demo"), bad])
            self.assertEqual(result.returncode, 1, (bad, result.stderr))
            self.assertIn("BYTES must be a positive whole number of bytes", result.stderr)
            self.assertNotIn("Traceback", result.stderr)


class ShellCompletionTests(TestCase):
    """
    Twisted's zsh completion (its C{_twisted} function, or a copy naming
    lpxy's scripts) runs the command line with C{--_shell-completion
    zsh:N} and evaluates what comes back when it starts with C{#compdef}.
    """

    def setUp(self) -> None:
        installed_copy()

    def complete(self, argv: list[str], name: str, *options: str) -> None:
        result = _run(argv)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(f"#compdef {name}\n"), result.stdout[:200])
        for option in options:
            self.assertIn(f"--{option}=[", result.stdout)
        zsh = shutil.which("zsh")
        if zsh is not None:
            script = Path(self.mktemp())
            script.write_text(result.stdout)
            check = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True)
            self.assertEqual(check.returncode, 0, check.stderr)

    def test_twistdPlugins(self) -> None:
        """C{twistd localproxy} and C{twistd tunnelservice} complete the plugin's options."""
        self.complete(
            twistd_argv("localproxy", "--_shell-completion", "zsh:3"),
            "-c", "source-listen-port", "destination-app", "config",
        )
        self.complete(
            twistd_argv("tunnelservice", "--_shell-completion", "zsh:3"),
            "-c", "port", "db", "credentials",
        )

    def test_consoleScripts(self) -> None:
        """C{localproxy} and C{lpxy-tunnelservice} complete their own options, under their names."""
        self.complete(
            [console_script("localproxy"), "-r", "us-east-1", "--_shell-completion", "zsh:4"],
            "localproxy", "source-listen-port", "destination-app", "state-dir",
        )
        self.complete(
            [console_script("lpxy-tunnelservice"), "--_shell-completion", "zsh:2"],
            "lpxy-tunnelservice", "port", "db", "credentials",
        )
        # not twistd's own options: they are not the script's
        result = _run([console_script("lpxy-tunnelservice"), "--_shell-completion", "zsh:2"])
        self.assertNotIn("--chroot", result.stdout)
