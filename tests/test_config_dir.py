"""
Tests for L{lpxy.proxy.config_dir}: the C{--config-dir} files.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.addresses import source_port
from lpxy.proxy.config_dir import config_dir_files, read_config_dir
from lpxy.proxy.option_errors import OptionError


class ReadConfigDirTests(SynchronousTestCase):
    """
    L{read_config_dir} reads C{ID = ENDPOINT} lines from every file below
    a directory.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        (self.directory / "sub").mkdir(parents=True)

    def test_first_file_wins(self) -> None:
        """
        Files are read in a stable order, subdirectories included; the
        first file naming an id wins.
        """
        (self.directory / "a").write_text("SSH = 22\n# comment\n")
        (self.directory / "sub" / "b").write_text("SSH = 2222\nRDP = 3389\n")
        self.assertEqual(
            config_dir_files(self.directory),
            [self.directory / "a", self.directory / "sub" / "b"],
        )
        self.assertEqual(
            read_config_dir(self.directory, source_port), {"SSH": 22, "RDP": 3389}
        )

    def test_malformed(self) -> None:
        """
        A malformed line is an error naming the file and the line.
        """
        (self.directory / "a").write_text("SSH = 22\nRDP\n")
        error = self.assertRaises(
            OptionError, read_config_dir, self.directory, source_port
        )
        self.assertEqual(
            error.detail,
            f"--config-dir file {self.directory / 'a'} line 2:"
            " expected ID = ENDPOINT, e.g. SSH1 = 22",
        )
