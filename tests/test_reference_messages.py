"""
The reference proxy's words for a refused command line, checked phrase by
phrase against the reference sheet (C{messages.md} sections 1a, 1b and 1c,
copied here as literal text) for both commands: the C{localproxy} console
script (L{lpxy.proxy.cli.parse}) and C{twistd localproxy} (twistd's own
option parsing and error printing, L{twisted.application.app.run}).

Each refusal is: the reference's reason as the first line, at most one
line of lpxy's own, then the reference's trailer; exit status 1.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from twisted.application import app
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy import cli
from lpxy.proxy.tap import LPXY_OWN_OPTIONS, Options

TOKEN = "reference-messages-test-token"
CLIENT = "c" * 40
TRAILER = "Try 'localproxy --help' for a list of options."
# A command line the reference accepts, to vary one thing at a time.
GOOD = ["-t", TOKEN, "-r", "us-east-1", "-s", "5555"]

# The sheet's --help table (section 1c), its wrapped lines joined.
REFERENCE_HELP = {
    "-h, --help": "Show help message",
    "-V, --version": "Show current version of Local Proxy and exit",
    "-t, --access-token=": "Client access token",
    "-i, --client-token=": "Optional Client Token",
    "-e, --proxy-endpoint=": "Endpoint of proxy server with port (if not default"
    " 443). Example: data.tunneling.iot.us-east-1.amazonaws.com:443",
    "-r, --region=": "Endpoint region where tunnel exists. Mutually exclusive flag"
    " with --proxy-endpoint",
    "-s, --source-listen-port=": "Sets the mappings between source listening ports"
    " and service identifier. Example: SSH1=5555 or 5555",
    "-d, --destination-app=": "Sets the mappings between the"
    " endpoint(address:port/port) and service identifier. Example:"
    " SSH1=127.0.0.1:22 or 22",
    "-b, --local-bind-address=": "Assigns a specific local address to bind to for"
    " listening in source mode or a local socket address for destination mode.",
    "-c, --capath=": "Adds the directory containing certificate authority files to"
    " be used for performing verification",
    "-k, --no-ssl-host-verify": "[INSECURE - DEV/TEST ONLY] Turn off SSL host"
    " verification. WARNING: This disables critical security checks and should"
    " NEVER be used in production.",
    "--export-default-settings=": "Exports the default settings for the TCP adapter"
    " to the given file as json and exit program",
    "--settings-json=": "Use the input JSON file to apply fine grained settings.",
    "--config=": "Use the supplied configuration file to apply CLI args. Actual CLI"
    " args override the contents of this file",
    "-v, --verbose=": "Logging level to standard out. [0, 255] (0=off, 1=fatal,"
    " 2=error, 3=warning, 4=info, 5=debug, >=6=trace)",
    "-m, --mode=": "The mode local proxy will run: src(source) or dst(destination)",
    "-y, --destination-client-type=": "Specify the value V1 or V2 to run the"
    " localproxy in compatibility mode with older clients. This should only be"
    " used when running localproxy in source mode.",
    "--config-dir=": "Set the configuration directory where service identifier"
    " mappings are stored. If not specified, will read mappings from default"
    " directory ./config (same directory where local proxy binary is running)",
}


class RefusalCase(SynchronousTestCase):
    """
    L{refuse} runs a command line through both commands and checks the
    reference's reason comes first and its trailer last.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()

    def file(self, name: str, text: str) -> str:
        path = self.dir / name
        path.write_text(text)
        return str(path)

    def refuse(
        self, argv: list[str], reason: str, environ: dict[str, str] | None = None
    ) -> None:
        """
        Both commands refuse C{argv} with C{reason}, the reference's text.
        """
        environ = {} if environ is None else environ
        console = self.console_lines(argv, environ)
        self.assertEqual(console[0], reason, console)
        self.assertEqual(console[-1], TRAILER, console)
        self.assertLessEqual(len(console), 3, console)
        twistd = self.twistd_lines(argv, environ)
        self.assertEqual(twistd, [f"twistd -n: {console[0]}", *console[1:]])

    def console_lines(self, argv: list[str], environ: dict[str, str]) -> list[str]:
        """What C{localproxy argv} writes to standard error; it exits 1."""
        stderr = io.StringIO()
        e = self.assertRaises(SystemExit, cli.parse, argv, stderr, environ, self.dir)
        self.assertEqual(e.code, 1)
        text = stderr.getvalue()
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(CLIENT, text)
        self.assertNotIn("Traceback", text)
        return text.splitlines()

    def twistd_lines(self, argv: list[str], environ: dict[str, str]) -> list[str]:
        """
        The lines C{twistd -n localproxy argv} prints after its usage text
        (from the one naming the command on); it exits 1.
        """
        self.patch(sys, "argv", ["twistd", "-n", "--pidfile=", "localproxy", *argv])
        self.patch(os, "environ", dict(environ))
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        e = self.assertRaises(SystemExit, app.run, self.fail, ServerOptions)
        self.assertEqual(e.code, 1)
        lines = stdout.getvalue().splitlines()
        self.assertNotIn(TOKEN, stdout.getvalue())
        starts = [i for i, line in enumerate(lines) if line.startswith("twistd -n: ")]
        self.assertEqual(len(starts), 1, lines)
        return lines[starts[0]:]


class UsageErrorTests(RefusalCase):
    """
    Section 1a: usage errors, one per row of the sheet.
    """

    def test_noToken(self) -> None:
        """
        No C{-t} and no C{AWSIOT_TUNNEL_ACCESS_TOKEN}; reported ahead of a
        missing C{-r}, as the reference checks.
        """
        reason = "the option '--access-token' is required but missing"
        self.refuse(["-r", "us-east-1", "-s", "5555"], reason)
        self.refuse(["-s", "5555"], reason)

    def test_unknownOption(self) -> None:
        """
        An unknown option is echoed as typed.
        """
        self.refuse([*GOOD, "-z"], "unrecognised option '-z'")
        self.refuse([*GOOD, "--foo"], "unrecognised option '--foo'")
        self.refuse([*GOOD, "--foo=bar"], "unrecognised option '--foo=bar'")

    def test_argumentMissing(self) -> None:
        """
        An option without its argument is named by its long name.
        """
        self.refuse(
            ["-t", TOKEN, "-s", "5555", "-r"],
            "the required argument for option '--region' is missing",
        )
        self.refuse(
            ["-r", "us-east-1", "-s", "5555", "--access-token"],
            "the required argument for option '--access-token' is missing",
        )

    def test_givenTwice(self) -> None:
        """
        The same option twice, however spelled.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "us-east-1", "-m", "src", "-m", "dst"],
            "option '--mode' cannot be specified more than once",
        )
        self.refuse(
            [*GOOD, "--region", "eu-west-1"],
            "option '--region' cannot be specified more than once",
        )

    def test_verboseNotSixteenBits(self) -> None:
        """
        C{-v} that is not a 16-bit number; C{-v -1} wraps and is accepted.
        """
        for value in ("abc", "65536"):
            self.refuse(
                [*GOOD, "-v", value],
                f"the argument ('{value}') for option '--verbose' is invalid",
            )
        config = cli.parse([*GOOD, "-v", "-1"], io.StringIO(), {}, self.dir)
        self.assertEqual(config.verbosity, 65535)

    def test_configUnreadable(self) -> None:
        """
        A C{--config} file that does not exist.
        """
        path = str(self.dir / "x.cfg")
        self.refuse(
            [*GOOD, "--config", path],
            f"can not read options configuration file '{path}'",
        )

    def test_configUnknownKey(self) -> None:
        """
        A C{--config} file naming an unknown option.
        """
        path = self.file("c.cfg", "foo = bar\n")
        self.refuse([*GOOD, "--config", path], "unrecognised option 'foo'")

    def test_configInvalidLine(self) -> None:
        """
        A C{--config} line that is not C{key = value}.
        """
        path = self.file("c.cfg", "region = us-east-1\ngarbage line\n")
        self.refuse(
            ["-t", TOKEN, "-s", "5555", "--config", path],
            "the options configuration file contains an invalid line 'garbage line'",
        )

    def test_regionOrEndpoint(self) -> None:
        """
        Both C{-r} and C{-e}, or neither.
        """
        reason = (
            "Must specify one and only one of --region/-r or --proxy-endpoint/-e options"
        )
        self.refuse([*GOOD, "-e", "h"], reason)
        self.refuse(["-t", TOKEN, "-s", "5555"], reason)

    def test_sourceAndDestination(self) -> None:
        """
        Both C{-s} and C{-d}.
        """
        self.refuse(
            [*GOOD, "-d", "22"],
            "Must specify one and only one of --source-listen-port/-s or --destination-app/-d",
        )

    def test_noMapping(self) -> None:
        """
        None of C{-s}, C{-d} and C{-m}.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "us-east-1"],
            "Must specify one of --source-listen-port/-s or --destination-app/-d or --mode",
        )

    def test_modeWrong(self) -> None:
        """
        A C{-m} that is none of the four names.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "us-east-1", "-m", "sideways"],
            "Mode value is wrong! Allowed values are: src, dst, source, destination",
        )

    def test_sourceWithDestinationMode(self) -> None:
        """
        C{-s} with C{-m dst} or C{-m destination}.
        """
        for mode in ("dst", "destination"):
            self.refuse(
                [*GOOD, "-m", mode],
                "-s and --mode have mismatched mode. Mode is set to destination!",
            )

    def test_destinationWithSourceMode(self) -> None:
        """
        C{-d} with C{-m src} or C{-m source} (the reference still says C{-s}).
        """
        for mode in ("src", "source"):
            self.refuse(
                ["-t", TOKEN, "-r", "us-east-1", "-d", "22", "-m", mode],
                "-s and --mode have mismatched mode. Mode is set to source!",
            )


class ValidationErrorTests(RefusalCase):
    """
    Section 1b: validation errors carry the reference's fatal message.
    """

    def test_portOutOfRange(self) -> None:
        """
        Port 0 or 65536, in every place a port goes.
        """
        reason = "Port must be between 1 and 65535"
        base = ["-t", TOKEN, "-r", "us-east-1"]
        for mapping in (
            ["-s", "0"], ["-s", "65536"], ["-d", "0"], ["-d", "65536"],
            ["-s", "SSH1=0"], ["-d", "SSH1=65536"], ["-d", "localhost:0"],
            ["-d", "SSH1=localhost:65536"],
        ):
            self.refuse([*base, *mapping], reason)

    def test_portTooLarge(self) -> None:
        """
        A port too large to be read as a number at all.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "us-east-1", "-s", "99999999999"], "Port value is too large"
        )

    def test_portNotDigits(self) -> None:
        """
        A destination port with letters.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "us-east-1", "-d", "localhost:abc"],
            "Port must contain only digits",
        )

    def test_mappingItemWithoutIdOrPort(self) -> None:
        """
        C{SSH1=} and C{=5555}: the item is echoed.
        """
        base = ["-t", TOKEN, "-r", "us-east-1", "-s"]
        self.refuse(
            [*base, "SSH1="], "Wrong format for the port mappings: SSH1= .Example: SSH1=5555"
        )
        self.refuse(
            [*base, "=5555"], "Wrong format for the port mappings: =5555 .Example: SSH1=5555"
        )

    def test_mappingsWithoutIds(self) -> None:
        """
        Several items, one or more without an id.
        """
        reason = "Wrong format for the port mappings! Example: SSH1=5555,SSH2=6666."
        for mapping in ("SSH1=5555,SSH2", "5555,6666"):
            self.refuse(["-t", TOKEN, "-r", "us-east-1", "-s", mapping], reason)

    def test_serviceIdCharacters(self) -> None:
        """
        A service id with a character outside C{[a-zA-Z0-9_-]}.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "us-east-1", "-s", "S$H=5555"],
            "Service ID must contain only alphanumeric characters, hyphens, and underscores",
        )

    def test_bindAddressCharacters(self) -> None:
        """
        A destination host or C{-b} with a character an address cannot
        hold.
        """
        reason = "Bind address contains invalid characters"
        self.refuse(["-t", TOKEN, "-r", "us-east-1", "-d", "local host:22"], reason)
        self.refuse([*GOOD, "-b", "a_b"], reason)

    def test_regionFormat(self) -> None:
        """
        A region in capitals.
        """
        self.refuse(
            ["-t", TOKEN, "-r", "US-EAST-1", "-s", "5555"],
            "Region must contain only lowercase letters, numbers, and hyphens",
        )

    def test_endpointCharacters(self) -> None:
        """
        An endpoint with a character a host name cannot hold.
        """
        self.refuse(
            ["-t", TOKEN, "-e", "a_b:443", "-s", "5555"],
            "Proxy endpoint contains invalid characters",
        )

    def test_endpointInvalid(self) -> None:
        """
        An endpoint of the right characters with a port out of range.
        """
        self.refuse(
            ["-t", TOKEN, "-e", "127.0.0.1:99999", "-s", "5555"],
            "Invalid endpoint specified: 127.0.0.1:99999",
        )

    def test_clientTokenLength(self) -> None:
        """
        A client token shorter than 32 characters.
        """
        self.refuse(
            [*GOOD, "-i", "short"], "Client token must be between 32 and 128 characters"
        )

    def test_accessTokenEmpty(self) -> None:
        """
        An empty C{-t}, or an empty C{AWSIOT_TUNNEL_ACCESS_TOKEN}.
        """
        reason = "Access token cannot be empty"
        self.refuse(["-t", "", "-r", "us-east-1", "-s", "5555"], reason)
        self.refuse(
            ["-r", "us-east-1", "-s", "5555"], reason, {"AWSIOT_TUNNEL_ACCESS_TOKEN": ""}
        )

    def test_emptyPath(self) -> None:
        """
        An empty C{--config}, C{--config-dir} or C{--settings-json}.
        """
        for option in ("--config", "--config-dir", "--settings-json"):
            self.refuse([*GOOD, option, ""], "Path cannot be empty")

    def test_configDirInvalid(self) -> None:
        """
        A C{--config-dir} that is missing, empty, or a plain file.
        """
        (self.dir / "empty").mkdir()
        for path in (
            str(self.dir / "nonexist"), str(self.dir / "empty"), self.file("plain", "x"),
        ):
            self.refuse(
                ["-t", TOKEN, "-r", "us-east-1", "-m", "src", "--config-dir", path],
                f"Invalid configuration directory: {path}",
            )

    def test_settingsJsonUnreadable(self) -> None:
        """
        A C{--settings-json} file that does not exist.
        """
        path = str(self.dir / "n.json")
        self.refuse([*GOOD, "--settings-json", path], f"{path}: cannot open file")

    def test_settingsJsonMalformed(self) -> None:
        """
        A C{--settings-json} file that is not JSON: the file, the line, and
        the reference's words for the mistake.
        """
        path = self.file("bad.json", "{bad}\n")
        self.refuse([*GOOD, "--settings-json", path], f"{path}(1): expected key string")


class AcceptedTests(SynchronousTestCase):
    """
    What the reference accepts, lpxy accepts too.
    """

    def test_verboseSixteenBits(self) -> None:
        """
        Any 16-bit C{-v}; 6 and more mean trace.
        """
        for value, verbosity in (("0", 0), ("6", 6), ("255", 255), ("65535", 65535)):
            config = cli.parse(
                [*GOOD, "-v", value], io.StringIO(), {}, Path(self.mktemp())
            )
            self.assertEqual(config.verbosity, verbosity)


class HelpTests(SynchronousTestCase):
    """
    Section 1c: C{--help} describes each option in the reference's words
    first.
    """


    def entries(self) -> dict[str, str]:
        """
        C{--help}'s option table: each option's spelling and its
        description, wrapped lines joined.
        """
        text = Options().getUsage(width=80)
        entries: dict[str, str] = {}
        current = None
        for line in text.splitlines():
            if line.startswith("  ") and line.strip() and not line.startswith(" " * 20):
                spelled, _, description = line.strip().partition("  ")
                current = spelled
                entries[current] = description.strip()
            elif current is not None and line.strip():
                entries[current] += " " + line.strip()
            else:
                current = None
        return entries

    def test_referenceDescriptionFirst(self) -> None:
        """
        Every option of the reference is there, its description starting
        with the reference's, whatever lpxy adds after it.
        """
        entries = self.entries()
        for spelled, description in REFERENCE_HELP.items():
            self.assertIn(spelled, entries)
            # Wrapping may break a long word at a hyphen; compare without
            # the breaks.
            shown = entries[spelled].replace("- ", "-")
            self.assertTrue(
                shown.startswith(description.replace("- ", "-")),
                f"{spelled}: {shown!r}",
            )

    def test_noOtherOptions(self) -> None:
        """
        lpxy's only options the reference lacks are L{LPXY_OWN_OPTIONS}
        (C{--log-format}, C{--metrics}, C{--state-dir}, C{--stdio}), listed
        after the reference's.
        """
        entries = list(self.entries())
        self.assertEqual(set(entries), {*REFERENCE_HELP, *LPXY_OWN_OPTIONS})
        self.assertEqual(entries[-len(LPXY_OWN_OPTIONS):], list(LPXY_OWN_OPTIONS))
