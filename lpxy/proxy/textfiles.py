# -*- test-case-name: tests.test_textfiles -*-
"""
Reading the small text files the local proxy is given (C{--config},
C{--settings-json}, the C{--config-dir} files): UTF-8, at most
L{MAX_SIZE} bytes, so that a huge or endless file (C{/dev/zero}) is one
clear error rather than a hang or an exhausted memory.
"""

from __future__ import annotations

from pathlib import Path

#: The largest file read: far more than any real settings or options file.
MAX_SIZE = 1024 * 1024
SIZE_LIMIT = "1 MiB"


class FileTooLarge(ValueError):
    """A file larger than L{MAX_SIZE}, or one that never ends."""


def read_text(path: str | Path) -> str:
    """
    The text of the file at C{path}, read as UTF-8.

    @raise OSError: it cannot be opened or read.
    @raise UnicodeDecodeError: it is not UTF-8.
    @raise FileTooLarge: it holds more than L{MAX_SIZE} bytes.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_SIZE + 1)
    if len(data) > MAX_SIZE:
        raise FileTooLarge(
            f"larger than {SIZE_LIMIT} (or endless); expected a small text file"
        )
    return data.decode("utf-8")


def error_reason(e: BaseException) -> str:
    """
    What a file error says, for one-line messages: an L{OSError}'s
    C{strerror} (without the path the message names already), else its
    text.
    """
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)
