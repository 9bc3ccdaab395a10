"""
Tests for L{lpxy.proxy.textfiles}: small text files read with a bound.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.textfiles import MAX_SIZE, FileTooLarge, error_reason, read_text


class ReadTextTests(SynchronousTestCase):
    """
    L{read_text} reads at most 1 MiB of UTF-8.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_small(self) -> None:
        """
        A small file is read whole.
        """
        path = self.dir / "a"
        path.write_text("region = eu-west-1\nnamé = x\n", encoding="utf-8")
        self.assertEqual(read_text(path), "region = eu-west-1\nnamé = x\n")

    def test_limit(self) -> None:
        """
        Exactly 1 MiB is read; one byte more is refused.
        """
        self.assertEqual(MAX_SIZE, 1024 * 1024)
        path = self.dir / "a"
        path.write_bytes(b"#" * MAX_SIZE)
        self.assertEqual(len(read_text(path)), MAX_SIZE)
        path.write_bytes(b"#" * (MAX_SIZE + 1))
        e = self.assertRaises(FileTooLarge, read_text, path)
        self.assertEqual(
            str(e), "larger than 1 MiB (or endless); expected a small text file"
        )

    def test_endless(self) -> None:
        """
        A file that never ends (C{/dev/zero}) is refused after 1 MiB.
        """
        if not os.path.exists("/dev/zero"):
            raise self.skipTest("no /dev/zero")
        self.assertRaises(FileTooLarge, read_text, "/dev/zero")

    def test_missingAndNotUtf8(self) -> None:
        """
        A missing file is an L{OSError}, one that is not UTF-8 a
        L{UnicodeDecodeError}.
        """
        e = self.assertRaises(OSError, read_text, self.dir / "none")
        self.assertEqual(error_reason(e), "No such file or directory")
        path = self.dir / "latin"
        path.write_bytes(b"caf\xe9\n")
        self.assertRaises(UnicodeDecodeError, read_text, path)

    def test_directory(self) -> None:
        """
        A directory is an L{OSError}.
        """
        self.assertRaises(OSError, read_text, self.dir)
