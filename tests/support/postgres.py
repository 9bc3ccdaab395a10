"""
A throwaway PostgreSQL server for the tests, started once per test process.

L{database} gives each caller a fresh, empty database on it and its URL;
the first call starts the server (C{initdb} and C{pg_ctl} from
C{/usr/lib/postgresql/*/bin} or the C{PATH}) in a temporary directory, with
its socket there and on a free loopback port, and the server is stopped and
its directory removed when the process exits, however it exits: a watcher
process waits for the end of a pipe from this one, then stops the server.
As root, the server runs as C{nobody} (PostgreSQL refuses to run as
root). Where PostgreSQL or psycopg is not installed, L{database} raises
L{SkipTest} saying what to install.

Over the socket, the superuser C{postgres} needs no password; over TCP,
every user needs one: L{PASSWORD_USER} has the password L{PASSWORD}.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from urllib.parse import quote

import attrs
from twisted.trial.unittest import SkipTest

__all__ = ["PASSWORD", "PASSWORD_USER", "Server", "database", "server"]

PASSWORD_USER = "lpxy_password_user"
PASSWORD = "s3cret-Pa55word"


def _bindir() -> str | None:
    """Where the PostgreSQL server programs are, the newest version first."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()],
        reverse=True,
    )
    if found:
        return os.path.dirname(found[0])
    initdb = shutil.which("initdb")
    return None if initdb is None else os.path.dirname(initdb)


@attrs.frozen
class Server:
    """A running throwaway server."""

    directory: str
    socket_dir: str
    port: int
    bindir: str
    run_as: list[str]
    watcher: subprocess.Popen[bytes] = attrs.field(repr=False)

    def url(self, dbname: str = "postgres") -> str:
        """A URL for C{dbname} as the superuser, over the socket (no password)."""
        return (
            f"postgresql://postgres@/{dbname}"
            f"?host={quote(self.socket_dir, safe='')}&port={self.port}"
        )

    def tcp_url(self, dbname: str, user: str = PASSWORD_USER, password: str = PASSWORD) -> str:
        """A URL for C{dbname} over TCP on loopback, with a password."""
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser, outside a transaction."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as connection:
            connection.execute(statement)

    def stop(self) -> None:
        """Stop the server and remove its directory (the watcher does it)."""
        assert self.watcher.stdin is not None
        self.watcher.stdin.close()
        self.watcher.wait()


# Run as its own process: wait until the test process closes the pipe
# (or ends), then stop the server and remove its directory.
_WATCHER = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
pg_ctl, data, directory, *run_as = sys.argv[1:]
subprocess.run([*run_as, pg_ctl, "stop", "-D", data, "-m", "immediate", "-w"],
               capture_output=True, check=False)
shutil.rmtree(directory, ignore_errors=True)
"""


def _watch(bindir: str, data: str, directory: str, run_as: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHER, os.path.join(bindir, "pg_ctl"), data, directory,
         *run_as],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # A ^C to the test run's process group leaves it to clean up.
        start_new_session=True,
    )


_started: Server | None = None
_failed: str | None = None
_databases = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start() -> Server:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise SkipTest("psycopg is not installed: pip install 'lpxy[postgresql]'") from None
    bindir = _bindir()
    if bindir is None:
        raise SkipTest(
            "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin nor on "
            "the PATH): apt-get install postgresql"
        )
    run_as: list[str] = []
    # Short: the socket's path must fit in 107 bytes.
    directory = tempfile.mkdtemp(
        prefix=f"lpxy-pg-{os.getpid()}-", dir="/tmp" if os.path.isdir("/tmp") else None
    )
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(directory)
            raise SkipTest("PostgreSQL will not run as root, and runuser is missing")
        nobody = pwd.getpwnam("nobody")
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        run_as = [runuser, "-u", "nobody", "--"]
    data = os.path.join(directory, "data")
    log = os.path.join(directory, "log")

    def run(*argv: str) -> None:
        done = subprocess.run([*run_as, *argv], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")

    try:
        run(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale", "C")
        with open(os.path.join(data, "pg_hba.conf"), "w") as hba:
            hba.write("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        for attempt in range(5):
            port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            try:
                run(os.path.join(bindir, "pg_ctl"), "start", "-w", "-t", "60", "-D", data,
                    "-l", log, "-o", options)
                break
            except RuntimeError:
                if attempt == 4:  # the port taken meanwhile, five times: give up
                    raise
        server = Server(
            directory, directory, port, bindir, run_as, _watch(bindir, data, directory, run_as)
        )
        server.sql(f"CREATE ROLE {PASSWORD_USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        return server
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def server() -> Server:
    """The process's server, started on first use (L{SkipTest} where it cannot be)."""
    global _started, _failed
    if _started is None:
        if _failed is not None:
            raise RuntimeError(_failed)
        try:
            _started = _start()
        except SkipTest:
            raise
        except Exception as e:
            _failed = f"could not start a throwaway PostgreSQL server: {e}"
            raise RuntimeError(_failed) from None
        atexit.register(_started.stop)
    return _started


def database() -> str:
    """The URL of a new empty database (over the socket, as the superuser)."""
    global _databases
    running = server()
    _databases += 1
    name = f"lpxy_test_{os.getpid()}_{_databases}"
    running.sql(f"CREATE DATABASE {name}")
    return running.url(name)
