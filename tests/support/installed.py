"""
A non-editable install of lpxy, built once per test run, for process tests.

Running from the source tree would hide packaging mistakes (a module or the
plugin file left out of the wheel), so process tests run C{twistd} and
C{localproxy} from a copy that C{pip install --target} made from the tree,
with a working directory outside it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".tox", ".venv", "build", "dist", "*.egg-info", "_trial_temp*",
    "__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis",
)


@cache
def installed_copy() -> Path:
    """
    Install the source tree (without dependencies, which the test
    environment already has) into a fresh directory and return it. Its
    modules are compiled to bytecode as pip does by default: a child
    started with C{PYTHONDONTWRITEBYTECODE} would otherwise compile every
    lpxy module from source at each start, which no user's install does.
    """
    target = Path(tempfile.mkdtemp(prefix="lpxy-installed-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix="lpxy-build-"))
    # Build from a private copy: parallel trial workers building in the same
    # tree collide in its build/ directory.
    source = build / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--target", str(target), str(source),
        ],
        check=True,
        cwd=build,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    shutil.rmtree(build, ignore_errors=True)
    return target


def installed_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment for a child process that must import lpxy (and find the
    twistd plugins) only from the installed copy.
    """
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "AWSIOT_TUNNEL_ACCESS_TOKEN")
        and not k.startswith("AWSIOT_TUNNEL_")
    }
    env["PYTHONPATH"] = str(installed_copy())
    # Client tokens the children keep go to a directory of this test run,
    # not to ~/.local/state or /var/lib (a test may name its own).
    env["XDG_STATE_HOME"] = _state_home()
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@cache
def _state_home() -> str:
    state = tempfile.mkdtemp(prefix="lpxy-state-")
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    return state


def outside_dir() -> str:
    """A working directory outside the source tree."""
    return tempfile.mkdtemp(prefix="lpxy-cwd-")


def twistd_argv(*args: str) -> list[str]:
    """The command line running C{twistd} with the test interpreter."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def console_script(name: str) -> str:
    """The path of console script C{name} as the install wrote it."""
    path = installed_copy() / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"the install made no console script {name!r}")
    return str(path)


def localproxy_argv(*args: str) -> list[str]:
    """The command line running the installed C{localproxy} console script."""
    return [console_script("localproxy"), *args]
