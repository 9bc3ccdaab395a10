# -*- test-case-name: tests.test_console_scripts -*-
"""
The C{lpxy-tunnelservice} console script: C{twistd -n --pidfile=
tunnelservice} under its own name, for installs that expose only console
scripts (pipx). The options are the plugin's own (L{tap.Options}); the
process is twistd's (logs on standard output, exit statuses, signals).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NoReturn, cast

from twisted.application.service import IServiceMaker
from twisted.python import usage
from twisted.python.runtime import platformType
from twisted.scripts import twistd

from lpxy.tunnelservice.tap import Options
from twisted.plugins.lpxy_plugins import tunnelservice as tunnelservice_plugin

NAME = "lpxy-tunnelservice"
EXIT_USAGE = 1

# The installed plugin itself, so name and description stay the plugin's.
_PLUGIN = cast(IServiceMaker, tunnelservice_plugin)


class ConsoleOptions(Options):
    """L{Options} of C{twistd tunnelservice}, its usage line naming this script."""

    def getSynopsis(self) -> str:
        return f"Usage: {NAME} {self.synopsis}"


class _ServerOptions(twistd.ServerOptions):
    """twistd's options with C{tunnelservice} as the only subcommand."""

    @property
    def subCommands(self) -> Iterator[tuple[str, None, Callable[[], Options], str]]:
        self.loadedPlugins = {_PLUGIN.tapname: _PLUGIN}
        yield (_PLUGIN.tapname, None, ConsoleOptions, _PLUGIN.description)


def twistd_arguments(argv: Sequence[str]) -> list[str]:
    """
    twistd's command line for the script's arguments: in the foreground,
    no pid file (a service manager or container keeps the pid).
    """
    pidfile = [] if platformType == "win32" else ["--pidfile="]
    return ["--nodaemon", *pidfile, _PLUGIN.tapname, *argv]


def main(
    argv: Sequence[str] | None = None,
    *,
    _run_app: Callable[[Any], object] = twistd.runApp,
    _stderr: IO[str] | None = None,
) -> NoReturn:
    """
    The C{lpxy-tunnelservice} console script. A usage error is written to
    standard error with the fix's pointer, exit status 1; C{--help} prints
    the options and exits 0.
    """
    stderr = sys.stderr if _stderr is None else _stderr
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 and argv[-2] == "--_shell-completion":
        # A shell asking for completions (Twisted's zsh completion): the
        # plugin's options answer it, and exit 0.
        ConsoleOptions().parseOptions(list(argv))
    config = _ServerOptions()
    try:
        config.parseOptions(twistd_arguments(argv))
    except usage.UsageError as e:
        stderr.write(f"{NAME}: {e}\nTry '{NAME} --help' for a list of options.\n")
        stderr.flush()
        sys.exit(EXIT_USAGE)
    _run_app(config)
    sys.exit(0)
