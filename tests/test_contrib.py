"""
What C{contrib/} gives an operator, checked with the tools that read it
where they are installed: the systemd units (C{systemd-analyze verify} and
C{security}), the Dockerfile (parsed: docker cannot build offline), the
logrotate snippet (a real C{logrotate} run on a log file of this process).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from lpxy._process import reopen_on_sighup
from tests.support.installed import ROOT, console_script

CONTRIB = ROOT / "contrib"
INSTALL_BIN = "/opt/lpxy/bin/"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every C{Key=value} of a unit's [Service] section, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found: dict[str, list[str]] = {}
    section = None
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def _console_scripts() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].splitlines()
    return {line.split("=")[0].strip() for line in lines if line.strip()}


class SystemdUnitTests(SynchronousTestCase):
    """A unit per product in C{contrib/systemd/}: unprivileged, kept up, hardened."""

    UNITS: ClassVar[dict[str, str]] = {
        "lpxy-localproxy@.service": "localproxy",
        "lpxy-tunnelservice.service": "lpxy-tunnelservice",
    }

    def test_settings(self) -> None:
        """
        No root, a state directory of its own, restarted when it failed,
        the hardening options, the program an installed console script.
        """
        self.assertEqual(
            sorted(p.name for p in (CONTRIB / "systemd").iterdir()), sorted(self.UNITS)
        )
        for name, script in self.UNITS.items():
            unit = unit_settings((CONTRIB / "systemd" / name).read_text())
            self.assertEqual(unit["DynamicUser"], ["yes"], name)
            self.assertNotIn("User", unit, name)
            self.assertEqual(len(unit["StateDirectory"]), 1, name)
            self.assertEqual(unit["Restart"], ["on-failure"], name)
            self.assertEqual(unit["NoNewPrivileges"], ["yes"], name)
            self.assertEqual(unit["ProtectSystem"], ["strict"], name)
            self.assertEqual(unit["ProtectHome"], ["yes"], name)
            self.assertEqual(unit["PrivateTmp"], ["yes"], name)
            self.assertEqual(unit["CapabilityBoundingSet"], [""], name)
            self.assertIn("@system-service", unit["SystemCallFilter"], name)
            (command,) = unit["ExecStart"]
            self.assertEqual(shlex.split(command)[0], INSTALL_BIN + script, name)
            self.assertIn(script, _console_scripts())
            # the token never on a command line or in the unit
            self.assertNotIn(" -t ", command)
            self.assertNotIn("AWSIOT_TUNNEL_ACCESS_TOKEN", unit.get("Environment", []))

    def test_proxyStaysDownWhenRefused(self) -> None:
        """The proxy's unit leaves a refused token (exit 2) down."""
        unit = unit_settings((CONTRIB / "systemd" / "lpxy-localproxy@.service").read_text())
        self.assertEqual(unit["RestartPreventExitStatus"], ["2"])
        self.assertEqual(unit["EnvironmentFile"], ["/etc/lpxy/%i.env"])

    def _analyze(self) -> str:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest("systemd-analyze is not installed: the units are not verified")
        return analyze

    def _instances(self) -> dict[str, str]:
        """Each unit as a file an instance can be verified from, its program installed."""
        here = Path(self.mktemp())
        here.mkdir()
        paths = {}
        for name, script in self.UNITS.items():
            text = (CONTRIB / "systemd" / name).read_text()
            text = text.replace(INSTALL_BIN + script, console_script(script))
            path = here / name.replace("@.", "@ssh.")
            path.write_text(text)
            paths[name] = str(path)
        return paths

    def analyze(self, argv: list[str]) -> tuple[int, str]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        return result.returncode, (result.stdout + result.stderr).strip()

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing wrong (it names an unknown
        key or value, as the misspelt copy shows).
        """
        analyze = self._analyze()
        for name, path in self._instances().items():
            self.assertEqual(self.analyze([analyze, "verify", path]), (0, ""), name)
            broken = Path(path).with_name("broken-" + Path(path).name)
            broken.write_text(Path(path).read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
            output = self.analyze([analyze, "verify", str(broken)])[1]
            self.assertIn("Unknown key 'NoNewPrivilege'", output)

    def test_exposure(self) -> None:
        """
        C{systemd-analyze security} rates each unit's exposure at most 2.0
        of 10 ("OK"); a unit stripped of its hardening fails the same bar.
        """
        analyze = self._analyze()
        for name, path in self._instances().items():
            argv = [analyze, "security", "--offline=yes", "--threshold=20", path]
            status, output = self.analyze(argv)
            self.assertEqual(status, 0, f"{name}:\n{output}")
            bare = Path(path).read_text().split("# Hardening")[0] + "\n[Install]\n"
            Path(path).write_text(bare)
            self.assertNotEqual(self.analyze(argv)[0], 0, name)


class DockerfileTests(SynchronousTestCase):
    """
    C{contrib/docker/Dockerfile}, read as docker reads its instructions
    (no image can be pulled here to build it).
    """

    def instructions(self) -> list[tuple[str, str]]:
        text = re.sub(r"\\\n", " ", (CONTRIB / "docker" / "Dockerfile").read_text())
        found = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                word, _, rest = line.partition(" ")
                found.append((word.upper(), rest.strip()))
        return found

    def stages(self) -> list[list[tuple[str, str]]]:
        stages: list[list[tuple[str, str]]] = []
        for instruction in self.instructions():
            if instruction[0] == "FROM":
                stages.append([])
            if stages:
                stages[-1].append(instruction)
        return stages

    def test_slimBase(self) -> None:
        """Every stage starts from a slim official Python image."""
        args = dict(
            rest.split("=", 1) for word, rest in self.instructions() if word == "ARG"
        )
        for stage in self.stages():
            image = stage[0][1].split()[0].replace("${PYTHON_VERSION}", args["PYTHON_VERSION"])
            self.assertRegex(image, r"^python:3\.(1[0-3])-slim$")

    def test_installsThePackage(self) -> None:
        """The build stage pip-installs the source tree; the final stage takes that install."""
        build, final = self.stages()
        self.assertIn(("COPY", ". ."), build)
        runs = " ".join(rest for word, rest in build if word == "RUN")
        self.assertIn("/opt/lpxy/bin/pip install", runs)
        self.assertRegex(runs, r"pip install [^&]* \.( |$)")
        self.assertIn(("COPY", "--from=build /opt/lpxy /opt/lpxy"), final)
        env = " ".join(rest for word, rest in final if word == "ENV")
        self.assertIn("PATH=/opt/lpxy/bin:", env)

    def test_nonRootUser(self) -> None:
        """The final stage ends as a numeric user other than root, made in that stage."""
        final = self.stages()[-1]
        users = [rest for word, rest in final if word == "USER"]
        self.assertEqual(len(users), 1)
        uid, _, gid = users[0].partition(":")
        self.assertTrue(uid.isdigit() and int(uid) != 0, users)
        self.assertTrue(gid.isdigit() and int(gid) != 0, users)
        made = " ".join(rest for word, rest in final if word == "RUN")
        self.assertIn(f"useradd --system --uid {uid}", made)
        # nothing runs after USER that would need root
        after = final[[word for word, _ in final].index("USER"):]
        self.assertNotIn("RUN", [word for word, _ in after])

    def test_commandsAreConsoleScripts(self) -> None:
        """The default command and the documented ones are console scripts of the package."""
        final = self.stages()[-1]
        (cmd,) = [rest for word, rest in final if word == "CMD"]
        scripts = _console_scripts()
        self.assertIn(re.findall(r'"([^"]+)"', cmd)[0], scripts)
        comments = (CONTRIB / "docker" / "Dockerfile").read_text()
        documented = re.findall(r"\slpxy (localproxy|lpxy-[\w-]+)\s", comments)
        self.assertEqual(len(documented), 2, documented)
        for name in documented:
            self.assertIn(name, scripts)
        self.assertIn("docker build -f contrib/docker/Dockerfile", comments)


class LogrotateTests(SynchronousTestCase):
    """
    C{contrib/logrotate/lpxy}, run by C{logrotate} (forced) over a log file
    this process writes with twistd's L{LogFile}, its pid file naming this
    process: the file is moved aside, SIGHUP makes the log reopen under its
    name, and twistd's own old rotations are expired.
    """

    def setUp(self) -> None:
        self.logrotate = shutil.which("logrotate") or (
            "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None
        )
        if self.logrotate is None:
            raise self.skipTest("logrotate is not installed: the snippet is not run")
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        base = Path(self.mktemp()).resolve()
        self.logs = base / "log"
        self.run_dir = base / "run"
        self.logs.mkdir(parents=True)
        self.run_dir.mkdir()
        text = (CONTRIB / "logrotate" / "lpxy").read_text()
        self.assertIn("/var/log/lpxy", text)
        self.assertIn("/run/lpxy/*.pid", text)
        self.config = base / "lpxy.logrotate"
        self.config.write_text(
            text.replace("/var/log/lpxy", str(self.logs)).replace("/run/lpxy", str(self.run_dir))
        )
        self.config.chmod(0o644)
        self.state = base / "state"

    def logrotate_run(self, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.logrotate, *flags, "-s", str(self.state), str(self.config)],
            capture_output=True, text=True, timeout=60,
        )

    def test_debugRun(self) -> None:
        """C{logrotate -d} reads the snippet without an error."""
        (self.logs / "tunnelservice.log").write_text("a line\n")
        result = self.logrotate_run("-d")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("error", result.stdout + result.stderr)
        self.assertIn("tunnelservice.log", result.stdout + result.stderr)

    def test_rotation(self) -> None:
        path = self.logs / "tunnelservice.log"
        log_file = LogFile.fromFullPath(str(path))
        self.addCleanup(log_file.close)
        scheduled: list[Any] = []
        reopen_on_sighup(log_file, call=scheduled.append)
        (self.run_dir / "tunnelservice.pid").write_text(f"{os.getpid()}\n")
        stale = self.logs / "tunnelservice.log.2"
        stale.write_text("twistd's own rotation, 20 days ago\n")
        old = time.time() - 20 * 86400
        os.utime(stale, (old, old))
        recent = self.logs / "tunnelservice.log.1"
        recent.write_text("twistd's own rotation, today\n")
        log_file.write("before the rotation\n")

        result = self.logrotate_run("-f")

        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(len(scheduled), 1, "no SIGHUP arrived")
        scheduled[0]()
        log_file.write("after the rotation\n")
        (moved,) = self.logs.glob("tunnelservice.log-*")
        self.assertEqual(moved.read_text(), "before the rotation\n")
        self.assertEqual(path.read_text(), "after the rotation\n")
        self.assertFalse(stale.exists())
        self.assertTrue(recent.exists())
