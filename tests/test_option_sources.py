"""
Tests for L{lpxy.proxy.option_sources}: where the local proxy's options
come from before they are validated.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.option_errors import OptionError
from lpxy.proxy.option_sources import read_config_file, sources


class ReadConfigFileTests(SynchronousTestCase):
    """
    L{read_config_file} reads C{long-name = value} lines.
    """

    def test_read(self) -> None:
        """
        L{read_config_file} returns the raw values by long name, without
        blank lines and comments.
        """
        path = Path(self.mktemp())
        path.write_text("region=us-east-1\n  mode =  dst  \n#x=y\n\n; z\n")
        self.assertEqual(
            read_config_file(str(path)), {"region": "us-east-1", "mode": "dst"}
        )


class SourcesTests(SynchronousTestCase):
    """
    L{sources} searches the command line, then the C{--config} file, then
    the environment.
    """

    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir()
        (self.cwd / "c.conf").write_text("region = eu-west-1\nmode = dst\n")

    def test_precedence(self) -> None:
        """
        A value comes from the first source naming it, labelled with where
        it was given.
        """
        found = sources(
            {"mode": "src", "config": "c.conf"},
            {"AWSIOT_TUNNEL_REGION": "us-east-1", "AWSIOT_TUNNEL_ENDPOINT": "e.example"},
            self.cwd,
        )
        mode, region = found.get("mode"), found.get("region")
        assert mode is not None and region is not None
        self.assertEqual((mode.value, mode.label), ("src", "--mode/-m"))
        self.assertEqual(
            (region.value, region.label),
            ("eu-west-1", f"region (--config {self.cwd / 'c.conf'})"),
        )
        self.assertIsNone(found.get("capath"))

    def test_choose(self) -> None:
        """
        C{choose} takes the first source naming either option; a lower
        source naming the other does not count, and one source naming both
        is an error.
        """
        found = sources(
            {"config": "c.conf"}, {"AWSIOT_TUNNEL_ENDPOINT": "e.example"}, self.cwd
        )
        chosen = found.choose("region", "proxy-endpoint", "reason")
        assert chosen is not None
        self.assertEqual((chosen[0], chosen[1].value), ("region", "eu-west-1"))
        both = sources({"region": "r", "proxy-endpoint": "e"}, {}, self.cwd)
        error = self.assertRaises(
            OptionError, both.choose, "region", "proxy-endpoint", "reason"
        )
        self.assertIn("--region/-r and --proxy-endpoint/-e are exclusive", str(error))
