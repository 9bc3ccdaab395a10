# -*- test-case-name: tests.test_statedir -*-
"""
Where the proxy keeps the client token it made up, so that a restarted
process rejoins its tunnel.

The tunneling service accepts an access token again only with the client
token it was first used with. Without C{-i}, the proxy makes one up and
keeps it in a file of the state directory named by a hash of the access
token (never the token itself), readable by its owner only; a restarted
process with the same access token reads it back and is accepted.

The state directory is C{--state-dir}, else C{$STATE_DIRECTORY} (systemd's
C{StateDirectory=}), else C{$XDG_STATE_HOME/lpxy}, else C{/var/lib/lpxy}
for root and C{~/.local/state/lpxy} for other users.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from twisted.logger import Logger

from lpxy.wire import is_valid_client_token

__all__ = [
    "STATE_DIRECTORY_ENV",
    "client_token_file",
    "default_state_directory",
    "kept_client_token",
    "load_or_create_client_token",
]

_log = Logger()

STATE_DIRECTORY_ENV = "STATE_DIRECTORY"
ROOT_STATE_DIRECTORY = Path("/var/lib/lpxy")
# A client token is at most 128 characters; more is not ours.
_MAX_FILE = 1024


def default_state_directory(environ: Mapping[str, str], euid: int) -> Path | None:
    """
    The state directory when C{--state-dir} is not given, from C{environ}
    and the effective user id C{euid}; L{None} when there is none (a
    non-root user without C{HOME}).

    systemd sets C{STATE_DIRECTORY} to a colon-separated list when a unit
    names several; the first is ours.
    """
    systemd = environ.get(STATE_DIRECTORY_ENV, "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = environ.get("XDG_STATE_HOME", "")
    # The XDG specification ignores a relative path.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "lpxy"
    if euid == 0:
        return ROOT_STATE_DIRECTORY
    home = environ.get("HOME", "")
    if home and Path(home).is_absolute():
        return Path(home) / ".local" / "state" / "lpxy"
    return None


def client_token_file(directory: Path, access_token: str) -> Path:
    """The file keeping the client token used with C{access_token}."""
    digest = hashlib.sha256(access_token.encode("utf-8")).hexdigest()
    return directory / f"client-token-{digest}"


def load_or_create_client_token(
    directory: Path, access_token: str, make: Callable[[], str]
) -> str:
    """
    The client token kept for C{access_token} in C{directory}; if there is
    none (or what is there is no client token), C{make()}'s, kept first.

    The file is written whole under another name and then linked into place
    (mode 0600, the directory made 0700 if missing), so a reader never sees
    half a token, and of two processes starting at once with the same
    access token, both use the token that was linked first.

    @raise OSError: the directory or file cannot be made, read or written.
    """
    path = client_token_file(directory, access_token)
    kept = _read_token(path)
    if kept is not None:
        return kept
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = make()
    temporary = _write_temporary(directory, token)
    try:
        try:
            os.link(temporary, path)
            return token
        except FileExistsError:
            pass
        # Another process with the same access token was first, or the
        # file holds no client token (an edit, a file of another program).
        kept = _read_token(path)
        if kept is not None:
            return kept
        _log.warn("Replacing {path}: it holds no client token", path=str(path))
        os.replace(temporary, path)
        return token
    finally:
        if temporary.exists():
            temporary.unlink()


def _read_token(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE)
    except FileNotFoundError:
        return None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return token if is_valid_client_token(token) else None


def _write_temporary(directory: Path, token: str) -> Path:
    temporary = directory / f".client-token-{uuid.uuid4().hex}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return temporary


def kept_client_token(directory: Path, access_token: str, make: Callable[[], str]) -> str:
    """
    The client token to send with C{access_token}: the one kept in
    C{directory}, or, with one warning when the directory is unusable,
    C{make()}'s for this process only.
    """
    made: list[str] = []

    def once() -> str:
        if not made:
            made.append(make())
        return made[0]

    try:
        return load_or_create_client_token(directory, access_token, once)
    except OSError as e:
        _log.warn(
            "Cannot keep the client token in {directory}: {reason}; it lasts"
            " only as long as this process, so a restarted proxy cannot rejoin"
            " the tunnel; give --state-dir a writable directory, or"
            " --client-token/-i",
            directory=str(directory),
            reason=e.strerror or str(e),
        )
        return once()
