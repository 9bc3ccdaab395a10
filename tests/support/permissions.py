"""
File permissions that hold for root too, for tests of unreadable files.

Root reads a file whatever its mode because of two capabilities,
C{CAP_DAC_OVERRIDE} and C{CAP_DAC_READ_SEARCH}. L{permissions_enforced}
takes them out of the calling thread's effective set for the length of a
block (they stay permitted, so they come back afterwards), and the kernel
then checks a root-owned file's mode bits as it would for anyone: a mode 0
file really cannot be read. Capabilities belong to one thread, so the
reactor's other threads keep theirs.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.trial.unittest import SkipTest

__all__ = ["permissions_enforced"]

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2
_BYPASS = (1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_Sets = _Data * 2  # version 3: the low and the high 32 capabilities


def _call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _set_effective(sets: ctypes.Array[_Data]) -> None:
    # pid 0: the calling thread
    _call("capset", ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), sets)


@contextmanager
def permissions_enforced() -> Iterator[None]:
    """
    Within the block, file permissions apply to this thread even when it
    runs as root. Without root there is nothing to take away. As root on a
    system without Linux capabilities the test is skipped.
    """
    if os.geteuid() != 0:
        yield
        return
    if not sys.platform.startswith("linux"):
        raise SkipTest("root reads every file, and only Linux lets a thread give that up")
    saved = _Sets()
    _call("capget", ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), saved)
    lowered = _Sets()
    ctypes.memmove(lowered, saved, ctypes.sizeof(saved))
    lowered[0].effective &= ~_BYPASS
    _set_effective(lowered)
    try:
        yield
    finally:
        _set_effective(saved)
