"""
Real peers for end-to-end tests: an OpenSSH server run as a child process
with a throw-away configuration, the C{ssh} and C{curl} clients, and a
C{twisted.web} file server, all on loopback in the test's reactor.

Every helper registers a cleanup that waits until its processes ended and
its connections closed, and raises L{SkipTest} when a program it needs is
not installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support.processes import ChildProcess, kill_at_cleanup
from tests.support.sockets import unused_port

__all__ = [
    "SSHD",
    "Run",
    "Sshd",
    "finished",
    "program",
    "run",
    "serve_http",
    "ssh_argv",
    "ssh_options",
    "start_sshd",
]

SSHD = "/usr/sbin/sshd"

# Whatever the machine's environment says about proxies, agents or a curl
# configuration must not reach the clients under test.
_DROPPED = ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "CURL_HOME")


# The Debian package of each program, for the reason a test is skipped.
_PACKAGES = {
    SSHD: "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "scp": "openssh-client",
    "curl": "curl",
}


def program(name: str) -> str:
    """
    The path of program C{name} (a bare name looked up on C{PATH}, or an
    absolute path); skip the test when it is not installed.
    """
    path = name if os.path.isabs(name) else shutil.which(name)
    if path is None or not os.access(path, os.X_OK):
        package = _PACKAGES.get(name)
        hint = f" (Debian package {package})" if package else ""
        raise SkipTest(f"{name} is not installed{hint}")
    return path


def child_env() -> dict[str, str]:
    """The environment for a client process: no proxy, agent or curlrc."""
    return {
        k: v for k, v in os.environ.items()
        if k not in _DROPPED and not k.lower().endswith("_proxy")
    }


class Run(ChildProcess):
    """
    A L{ChildProcess} that writes C{stdin} to the child, then closes its
    standard input.
    """

    def __init__(self, stdin: bytes = b"") -> None:
        super().__init__()
        self._stdin = stdin

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()


def run(case: TestCase, argv: list[str], stdin: bytes = b"",
        env: dict[str, str] | None = None) -> Run:
    """
    Start C{argv} (C{argv[0]} an absolute path) in the test's reactor,
    feeding it C{stdin}. A cleanup kills it if the test left it running.
    """
    child = Run(stdin)
    reactor.spawnProcess(  # type: ignore[attr-defined]
        child, argv[0], argv, env=child_env() if env is None else env,
    )

    kill_at_cleanup(case, child)
    return child


async def finished(case: TestCase, child: ChildProcess) -> bytes:
    """Wait for C{child} to end; assert it exited 0; return its output."""
    status = await child.ended
    case.assertEqual(status, 0, f"exit status {status}:\n{bytes(child.stderr)!r}")
    return bytes(child.stdout)


# --- OpenSSH ----------------------------------------------------------------


@attrs.frozen
class Sshd:
    """A running OpenSSH server, the key it accepts, and the user it serves."""

    port: int
    client_key: Path
    user: str
    directory: Path
    process: ChildProcess = attrs.field(repr=False)


def _login_user() -> str:
    """The user ssh logs in as: the one running the tests, with a shell."""
    entry = pwd.getpwuid(os.getuid())
    if os.path.basename(entry.pw_shell) in ("nologin", "false"):
        raise SkipTest(f"user {entry.pw_name} has no login shell for sshd to run")
    return entry.pw_name


def _keygen(case: TestCase, path: Path) -> Deferred[int]:
    keygen = program("ssh-keygen")
    child = run(case, [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "lpxy-test",
                       "-f", str(path)])
    return child.ended


def _privsep_directory() -> None:
    """
    sshd run as root wants its (empty, root-owned) privilege separation
    directory, which Debian makes at boot, not at install; as any other user
    it does without.
    """
    if os.getuid() != 0:
        return
    run_dir = Path("/run")
    if os.access(run_dir, os.W_OK):
        (run_dir / "sshd").mkdir(mode=0o755, exist_ok=True)


def _sshd_config(directory: Path, port: int) -> Path:
    config = directory / "sshd_config"
    lines = [
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {directory / 'host_key'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        f"PidFile {directory / 'sshd.pid'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PrintMotd no",
        "PrintLastLog no",
        "AcceptEnv none",
        "X11Forwarding no",
        "AllowAgentForwarding no",
    ]
    sftp = Path("/usr/lib/openssh/sftp-server")
    if sftp.exists():
        lines.append(f"Subsystem sftp {sftp}")
    config.write_text("\n".join(lines) + "\n", encoding="ascii")
    return config


async def start_sshd(case: TestCase) -> Sshd:
    """
    Start C{sshd -D -e} on a loopback port with fresh host and client keys;
    return once it logged that it is listening. Skip when OpenSSH (server or
    client) is missing.
    """
    sshd = program(SSHD)
    program("ssh")
    user = _login_user()
    directory = Path(case.mktemp()).absolute()
    directory.mkdir(parents=True)
    host_key, client_key = directory / "host_key", directory / "client_key"
    for key in (host_key, client_key):
        status = await _keygen(case, key)
        case.assertEqual(status, 0, f"ssh-keygen for {key} failed")
    shutil.copyfile(client_key.with_suffix(".pub"), directory / "authorized_keys")
    _privsep_directory()
    # The port is picked before sshd binds it; another taker in between is
    # unlikely but possible, so a bind failure gets a second pick.
    for _ in range(3):
        port = unused_port()
        config = _sshd_config(directory, port)
        child = run(case, [sshd, "-D", "-e", "-f", str(config)], env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        })
        case.addCleanup(_terminate, child)
        try:
            await child.wait_for(f"Server listening on 127.0.0.1 port {port}")
        except AssertionError:
            # wait_for fails only once sshd ended
            if "Address already in use" in child.output:
                continue
            raise
        return Sshd(port, client_key, user, directory, child)
    raise AssertionError(f"sshd found no free port:\n{child.output}")


def _terminate(child: ChildProcess) -> Deferred[int] | None:
    """Stop sshd as its service manager would; fire once it ended."""
    if child.ended.called:
        return None
    try:
        child.signal("TERM")
    except ProcessExitedAlready:
        pass
    return child.ended


def ssh_options(sshd: Sshd) -> list[str]:
    """
    The options C{ssh} and C{scp} need for C{sshd}: its key, no
    configuration, agent or known hosts of the machine, no questions.
    """
    return [
        "-F", "/dev/null",
        "-i", str(sshd.client_key),
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "LogLevel=ERROR",
    ]


@attrs.frozen
class ScpFiles:
    """
    The files of an C{scp} copy there and back: the payload in a local
    file, where the copy lands in C{sshd}'s directory, where it comes back.
    """

    payload: bytes = attrs.field(repr=False)
    local: Path
    remote: Path
    back: Path


def scp_files(case: TestCase, sshd: Sshd, size: int) -> ScpFiles:
    """
    C{size} random bytes in a local file of C{case}, and the paths of their
    copy on C{sshd} and back; skips C{case} without OpenSSH's SFTP server,
    which C{scp} copies through.
    """
    if not Path("/usr/lib/openssh/sftp-server").exists():
        raise SkipTest("openssh-sftp-server is not installed")
    payload = os.urandom(size)
    local = Path(case.mktemp()).absolute()
    local.write_bytes(payload)
    return ScpFiles(
        payload, local, sshd.directory / "scp-copy", Path(case.mktemp()).absolute()
    )


def ssh_argv(sshd: Sshd, port: int, command: str) -> list[str]:
    """C{ssh} running C{command} on C{sshd}, through 127.0.0.1:C{port}."""
    return [
        program("ssh"), *ssh_options(sshd), "-p", str(port),
        f"{sshd.user}@127.0.0.1", command,
    ]


# --- HTTP -------------------------------------------------------------------


class _Tracked(ProtocolWrapper):
    """A server connection that tells its factory when it is gone."""

    factory: _TrackingFactory

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)  # type: ignore[arg-type]
        self.factory.gone()


class _TrackingFactory(WrappingFactory):
    """Counts the server's connections so a cleanup can wait for none."""

    protocol = _Tracked

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.served = 0
        self._waiting: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        self.served += 1
        return super().buildProtocol(addr)  # type: ignore[no-any-return]

    def gone(self) -> None:
        if not self.protocols:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.protocols:
            self._waiting.append(d)
        else:
            d.callback(None)
        return d


async def serve_http(case: TestCase, root: Resource) -> tuple[int, _TrackingFactory]:
    """
    Serve C{root} with C{twisted.web} on a loopback port; return the port
    and a factory whose C{served} counts the connections it accepted.
    """
    factory = _TrackingFactory(Site(root))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    async def stop() -> None:
        await port.stopListening()
        await factory.all_closed()

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return port.getHost().port, factory
