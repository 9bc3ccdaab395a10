"""
README.rst's systemd unit, as written there (the test reads it from the
README, so the two cannot drift): checked with C{systemd-analyze verify}
where systemd is installed, and for the settings that make a restarted
proxy rejoin its tunnel.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.installed import ROOT, console_script

README_PATH = "/opt/lpxy/bin/localproxy"


def readme_unit() -> str:
    """The unit file of README.rst's "Under systemd" section."""
    lines = (ROOT / "README.rst").read_text().splitlines()
    heading = lines.index("Under systemd")
    start = next(
        i for i in range(heading, len(lines)) if lines[i].startswith(".. code-block:: ini")
    )
    block = []
    for line in lines[start + 2:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def settings(unit: str) -> dict[str, list[str]]:
    """Every C{Key=value} of C{unit}, by key."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


class UnitTests(SynchronousTestCase):
    """
    The README's unit file.
    """

    def test_settings(self) -> None:
        """
        Restarted on failure but not for a refused token, a state directory
        of its own, not root, the token from an environment file.
        """
        unit = settings(readme_unit())
        self.assertEqual(unit["Restart"], ["on-failure"])
        self.assertEqual(unit["RestartPreventExitStatus"], ["2"])
        self.assertEqual(unit["StateDirectory"], ["lpxy"])
        self.assertTrue(
            unit.get("DynamicUser") == ["yes"]
            or unit.get("User", ["root"]) not in (["root"], ["0"]),
            unit,
        )
        self.assertEqual(len(unit["EnvironmentFile"]), 1)
        self.assertNotIn("AWSIOT_TUNNEL_ACCESS_TOKEN", unit.get("Environment", []))
        self.assertNotIn("-t", unit["ExecStart"][0].split())
        self.assertTrue(unit["ExecStart"][0].startswith(README_PATH + " "))

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing wrong with it, its command
        pointed at the installed C{localproxy}; it would complain about an
        unknown key or value.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest("systemd-analyze is not installed: the unit is not verified")
        here = Path(self.mktemp())
        here.mkdir()
        unit = readme_unit().replace(README_PATH, console_script("localproxy"))
        self.assertEqual(self.verify(analyze, here, unit), "")
        # A check that can fail: a misspelt setting is reported.
        self.assertIn(
            "Restarts", self.verify(analyze, here, unit.replace("Restart=", "Restarts="))
        )

    def verify(self, analyze: str, here: Path, unit: str) -> str:
        path = here / "lpxy-ssh.service"
        path.write_text(unit)
        result = subprocess.run(
            [analyze, "verify", str(path)],
            capture_output=True, text=True, timeout=60,
        )
        output = result.stdout + result.stderr
        if result.returncode:
            output += f"\nexit status {result.returncode}"
        return output.strip()
