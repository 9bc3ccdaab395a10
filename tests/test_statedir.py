"""
Tests for L{lpxy.proxy.statedir}: which state directory, and the client
token kept in it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.statedir import (
    client_token_file,
    default_state_directory,
    kept_client_token,
    load_or_create_client_token,
)
from tests.support.permissions import permissions_enforced

ACCESS = "AQGAAXiK-statedir-test-access-token"
FIRST = "0123456789abcdef0123456789abcdef-first"
SECOND = "0123456789abcdef0123456789abcdef-second"


class Tokens:
    """C{make}: hands out the given client tokens in turn."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)

    def make(self) -> str:
        return self.tokens.pop(0)


class DefaultDirectoryTests(SynchronousTestCase):
    """
    L{default_state_directory}: systemd's, else the user's, else root's.
    """

    def test_systemd(self) -> None:
        """
        C{STATE_DIRECTORY} wins; of several (colon-separated), the first.
        """
        environ = {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b", "XDG_STATE_HOME": "/x",
                   "HOME": "/home/u"}
        self.assertEqual(default_state_directory(environ, 1000), Path("/var/lib/a"))
        self.assertEqual(default_state_directory(environ, 0), Path("/var/lib/a"))

    def test_xdg(self) -> None:
        """
        C{$XDG_STATE_HOME/lpxy}, for root too; a relative one is ignored.
        """
        environ = {"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}
        self.assertEqual(default_state_directory(environ, 1000), Path("/x/state/lpxy"))
        self.assertEqual(default_state_directory(environ, 0), Path("/x/state/lpxy"))
        relative = {"XDG_STATE_HOME": "state", "HOME": "/home/u"}
        self.assertEqual(
            default_state_directory(relative, 1000), Path("/home/u/.local/state/lpxy")
        )

    def test_home(self) -> None:
        """
        A user without C{XDG_STATE_HOME}: C{~/.local/state/lpxy}.
        """
        self.assertEqual(
            default_state_directory({"HOME": "/home/u"}, 1000),
            Path("/home/u/.local/state/lpxy"),
        )

    def test_root(self) -> None:
        """
        Root without C{XDG_STATE_HOME}: C{/var/lib/lpxy}, whatever C{HOME}.
        """
        self.assertEqual(default_state_directory({"HOME": "/root"}, 0), Path("/var/lib/lpxy"))
        self.assertEqual(default_state_directory({}, 0), Path("/var/lib/lpxy"))

    def test_none(self) -> None:
        """
        A user without C{HOME} (or with an empty one) has none.
        """
        self.assertIsNone(default_state_directory({}, 1000))
        self.assertIsNone(default_state_directory({"HOME": "", "STATE_DIRECTORY": ""}, 1000))


class KeptTokenTests(SynchronousTestCase):
    """
    L{load_or_create_client_token} and L{kept_client_token}.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "state" / "lpxy"
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]

    def test_firstThenKept(self) -> None:
        """
        The first call makes the token and keeps it (making the directory);
        later calls with the same access token read it back.
        """
        tokens = Tokens(FIRST, SECOND)
        self.assertEqual(load_or_create_client_token(self.directory, ACCESS, tokens.make), FIRST)
        self.assertEqual(load_or_create_client_token(self.directory, ACCESS, tokens.make), FIRST)
        self.assertEqual(tokens.tokens, [SECOND])
        self.assertEqual(self.warnings(), [])

    def test_perAccessToken(self) -> None:
        """
        Another access token gets its own client token.
        """
        tokens = Tokens(FIRST, SECOND)
        load_or_create_client_token(self.directory, ACCESS, tokens.make)
        self.assertEqual(
            load_or_create_client_token(self.directory, ACCESS + "x", tokens.make), SECOND
        )

    def test_fileNamedByHash(self) -> None:
        """
        The file is named by a hash of the access token, holds only the
        client token, is its owner's only, and nothing else is left in the
        directory, which is its owner's only.
        """
        load_or_create_client_token(self.directory, ACCESS, Tokens(FIRST).make)
        path = client_token_file(self.directory, ACCESS)
        self.assertEqual(os.listdir(self.directory), [path.name])
        self.assertNotIn(ACCESS, path.name)
        self.assertEqual(len(path.name), len("client-token-") + 64)
        self.assertEqual(path.read_text(), FIRST + "\n")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.directory.stat().st_mode), 0o700)

    def test_existingDirectoryKeepsItsMode(self) -> None:
        """
        A directory that exists (systemd's C{StateDirectory=}) is used as
        it is.
        """
        self.directory.mkdir(parents=True, mode=0o755)
        self.directory.chmod(0o755)
        load_or_create_client_token(self.directory, ACCESS, Tokens(FIRST).make)
        self.assertEqual(stat.S_IMODE(self.directory.stat().st_mode), 0o755)

    def test_notAToken(self) -> None:
        """
        A file holding no valid client token is replaced, with a warning.
        """
        self.directory.mkdir(parents=True)
        path = client_token_file(self.directory, ACCESS)
        for junk in (b"short\n", b"\xff" * 40, b""):
            path.write_bytes(junk)
            self.assertEqual(
                load_or_create_client_token(self.directory, ACCESS, Tokens(FIRST).make), FIRST
            )
            self.assertEqual(path.read_text(), FIRST + "\n")
        self.assertEqual(len(self.warnings()), 3)
        self.assertEqual(os.listdir(self.directory), [path.name])

    def test_raced(self) -> None:
        """
        When another process keeps its token between our look and our
        write, we use its token, and leave no temporary file.
        """
        path = client_token_file(self.directory, ACCESS)

        def make() -> str:
            # The other process, just before ours is written.
            self.directory.mkdir(parents=True, exist_ok=True)
            path.write_text(SECOND + "\n")
            return FIRST

        self.assertEqual(load_or_create_client_token(self.directory, ACCESS, make), SECOND)
        self.assertEqual(os.listdir(self.directory), [path.name])
        self.assertEqual(path.read_text(), SECOND + "\n")

    def test_unwritable(self) -> None:
        """
        An unusable state directory: one warning naming it, and a token for
        this process only.
        """
        blocker = Path(self.mktemp())
        blocker.write_text("a file, not a directory")
        self.assertEqual(kept_client_token(blocker / "lpxy", ACCESS, Tokens(FIRST).make), FIRST)
        [warning] = self.warnings()
        self.assertIn(f"Cannot keep the client token in {blocker / 'lpxy'}", warning)
        self.assertIn("--state-dir", warning)
        self.assertNotIn(ACCESS, warning)

    def test_readOnly(self) -> None:
        """
        A directory the proxy may not write: the same.
        """
        self.directory.mkdir(parents=True)
        self.directory.chmod(0o500)
        self.addCleanup(self.directory.chmod, 0o700)
        with permissions_enforced():
            token = kept_client_token(self.directory, ACCESS, Tokens(FIRST).make)
        self.assertEqual(token, FIRST)
        self.assertEqual(os.listdir(self.directory), [])
        self.assertEqual(len(self.warnings()), 1)

    def test_kept(self) -> None:
        """
        L{kept_client_token} returns the kept token without a warning.
        """
        load_or_create_client_token(self.directory, ACCESS, Tokens(FIRST).make)
        self.assertEqual(kept_client_token(self.directory, ACCESS, Tokens(SECOND).make), FIRST)
        self.assertEqual(self.warnings(), [])
