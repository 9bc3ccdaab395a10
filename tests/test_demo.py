"""
The README's first command: C{lpxy-demo} runs a whole tunnel on loopback from
the installed programs (tunnel service, both proxies, an echo server) and
reports an intact round trip.
"""

import subprocess

from twisted.trial.unittest import TestCase

from tests.support.installed import console_script, installed_env, outside_dir


class DemoTests(TestCase):
    def test_wholeTunnelOnLoopback(self) -> None:
        result = subprocess.run(
            [console_script("lpxy-demo"), str(4 * 1024 * 1024)],
            cwd=outside_dir(), env=installed_env(), capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("echoed 4194304 of 4194304 bytes through the tunnel", result.stdout)
        self.assertIn(": intact", result.stdout)
        self.assertIn("proxies exited with 0 and 0", result.stdout)
