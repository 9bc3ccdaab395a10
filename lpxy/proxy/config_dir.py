# -*- test-case-name: tests.test_config_dir,tests.test_config -*-
"""
The C{--config-dir} files: C{ID = ENDPOINT} lines naming the mappings a
local proxy serves when its command line names none (protocol.md
section 4).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from twisted.logger import Logger

from lpxy.proxy import option_errors as reference
from lpxy.proxy.addresses import service_id
from lpxy.proxy.option_errors import OptionError
from lpxy.proxy.option_sources import Given, config_lines, not_empty
from lpxy.proxy.textfiles import FileTooLarge, error_reason, read_text

_log = Logger()
_T = TypeVar("_T")


def config_dir_files(directory: Path) -> list[Path]:
    """
    Every regular file below C{directory}, in a stable order; directories
    that cannot be listed are skipped with a warning.
    """

    def unlisted(e: OSError) -> None:
        _log.warn(
            "Skipping unreadable --config-dir directory {path}: {reason}",
            path=e.filename, reason=error_reason(e),
        )

    files: list[Path] = []
    for root, _, names in os.walk(directory, onerror=unlisted):
        files.extend(Path(root, name) for name in names if Path(root, name).is_file())
    return sorted(files)


def read_config_dir(directory: Path, parse: Callable[[str], _T]) -> dict[str, _T]:
    """
    Read every file below C{directory} as C{id = endpoint} lines, each
    endpoint passed through C{parse}; the first file naming an id wins.
    Unreadable files are skipped with a warning.

    @raise OptionError: a file is larger than 1 MiB, or a line is
        malformed.
    """
    mapping: dict[str, _T] = {}
    for path in config_dir_files(directory):
        try:
            text = read_text(path)
        except FileTooLarge as e:
            raise OptionError(None, f"--config-dir file {path} is {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            _log.warn(
                "Skipping unreadable --config-dir file {path}: {reason}",
                path=str(path), reason=error_reason(e),
            )
            continue
        seen: set[str] = set()
        for number, line in config_lines(text):
            where = f"--config-dir file {path} line {number}"
            name, equals, endpoint = line.partition("=")
            name, endpoint = name.strip(), endpoint.strip()
            try:
                if not equals or not endpoint:
                    raise ValueError("expected ID = ENDPOINT, e.g. SSH1 = 22")
                service_id(name)
                if name in seen:
                    raise ValueError(f"service id {name!r} given twice")
                target = parse(endpoint)
            except ValueError as e:
                raise OptionError(None, f"{where}: {e}") from None
            seen.add(name)
            if name in mapping:
                _log.debug(
                    "{path} names {service} again; the first file wins",
                    path=str(path), service=name,
                )
            else:
                mapping[name] = target
    return mapping


def _non_empty_directory(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def config_directory(given: Given | None, cwd: Path) -> Path | None:
    """
    The C{--config-dir} directory: the one C{given}, which must hold
    files, or else C{./config} if it holds any.
    """
    if given is None:
        default = cwd / "config"
        return default if _non_empty_directory(default) else None
    expected = "a non-empty directory of ID = ENDPOINT files"
    not_empty(given, "a directory", expected)
    directory = cwd / given.value
    if not _non_empty_directory(directory):
        raise OptionError(
            reference.config_dir_invalid(given.value),
            f"{given.label}: {given.value!r} is not {expected}",
        )
    return directory
