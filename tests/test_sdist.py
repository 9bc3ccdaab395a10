"""
The source distribution: built from the tree (C{python -m build --sdist}
without isolation, with the test extra's build and setuptools), it carries
every file of the tree, tests/, proto/, tox.ini, bench/ and contrib/
included, so that C{tox} runs from the unpacked sdist; and its metadata
says what an operator looks for.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.installed import ROOT

# What the tree holds that is no part of the source: caches, build output,
# the developer's environments.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".gitignore", ".tox", ".venv", "build", "dist", "*.egg-info", "_trial_temp*",
    "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", ".hypothesis", "dropin.cache",
    "PKG-INFO", "setup.cfg.orig",
)


@cache
def _built() -> tuple[frozenset[str], Path]:
    """The files of the source tree, and the sdist built from a copy of it."""
    work = Path(tempfile.mkdtemp(prefix="lpxy-sdist-"))
    source = work / "src"
    # A private copy: setuptools writes lpxy.egg-info into the tree it builds.
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    tree = frozenset(
        p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()
    )
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
         str(work / "dist"), str(source)],
        check=True, capture_output=True, cwd=work, timeout=300,
    )
    (sdist,) = (work / "dist").glob("lpxy-*.tar.gz")
    return tree, sdist


def _members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tar:
        return {
            m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name and m.isfile()
        }


def _skip_without_build(case: SynchronousTestCase) -> None:
    if find_spec("build") is None:
        raise case.skipTest("the build package is not installed (pip install '.[test]')")


class SdistContentsTests(SynchronousTestCase):
    def setUp(self) -> None:
        _skip_without_build(self)

    def test_everyFileOfTheTree(self) -> None:
        """Every file of the source tree is in the sdist, under its own path."""
        tree, sdist = _built()
        members = set(_members(sdist))
        for needed in ("LICENSE", "tox.ini", "ruff.toml", "proto/Message.proto",
                       "tests/__init__.py", "tests/support/installed.py", "bench/common.py",
                       "contrib/systemd/lpxy-tunnelservice.service",
                       "contrib/docker/Dockerfile", "contrib/logrotate/lpxy",
                       "lpxy/_proto/Message_pb2.pyi", "twisted/plugins/lpxy_plugins.py"):
            self.assertIn(needed, tree)
        self.assertEqual(sorted(tree - members), [])

    def test_nothingElse(self) -> None:
        """No caches or build output, only setuptools' own metadata beside the tree."""
        tree, sdist = _built()
        extra = set(_members(sdist)) - tree
        self.assertEqual(sorted(n for n in extra if not n.startswith("lpxy.egg-info/")),
                         ["PKG-INFO"])
        self.assertFalse([n for n in _members(sdist) if "__pycache__" in n or n.endswith(".pyc")])

    def test_metadata(self) -> None:
        """License, supported Pythons and systems, status, and the console scripts."""
        _, sdist = _built()
        with tarfile.open(sdist) as tar:
            (info,) = [m for m in tar.getmembers() if m.name.count("/") == 1
                       and m.name.endswith("/PKG-INFO")]
            handle = tar.extractfile(info)
            assert handle is not None
            metadata = email.parser.Parser().parsestr(handle.read().decode())
            (entry_points,) = [m for m in tar.getmembers()
                               if m.name.endswith("lpxy.egg-info/entry_points.txt")]
            handle = tar.extractfile(entry_points)
            assert handle is not None
            scripts = handle.read().decode()
            # (older setuptools write no Requires-Dist into an sdist's PKG-INFO)
            (requires,) = [m for m in tar.getmembers()
                           if m.name.endswith("lpxy.egg-info/requires.txt")]
            handle = tar.extractfile(requires)
            assert handle is not None
            extras = handle.read().decode()
        self.assertIn(metadata.get("License-Expression", metadata.get("License")), ["Apache-2.0"])
        self.assertEqual(metadata.get_all("License-File"), ["LICENSE"])
        classifiers = metadata.get_all("Classifier")
        for version in ("3.10", "3.11", "3.12", "3.13"):
            self.assertIn(f"Programming Language :: Python :: {version}", classifiers)
        self.assertIn("Operating System :: POSIX :: Linux", classifiers)
        self.assertIn("Operating System :: MacOS", classifiers)
        self.assertTrue([c for c in classifiers if c.startswith("Development Status ::")])
        self.assertTrue(metadata.get_all("Project-URL"))
        self.assertEqual(metadata["Requires-Python"], ">=3.10")
        aws = extras.split("[aws]\n", 1)[1].split("\n\n", 1)[0].split()
        self.assertEqual(sorted(name.split(">")[0] for name in aws), ["awscli", "boto3"])
        for script in ("localproxy", "lpxy-tunnelservice", "lpxy-demo"):
            self.assertIn(f"{script} = ", scripts)

    def test_licenseIsApache(self) -> None:
        """LICENSE is the Apache License 2.0's text, whole."""
        text = (ROOT / "LICENSE").read_text()
        self.assertIn("Apache License\n                           Version 2.0, January 2004", text)
        self.assertIn("END OF TERMS AND CONDITIONS", text)
        self.assertIn("9. Accepting Warranty or Additional Liability.", text)


class UnpackedSdistTests(TestCase):
    def setUp(self) -> None:
        _skip_without_build(self)

    def test_testsRunFromUnpacked(self) -> None:
        """
        Unpacked, the sdist holds what tox needs (tox.ini's environments,
        the package's sources) and its tests run there: the generated-code
        and README module-map checks, which read the unpacked tree.
        """
        _, sdist = _built()
        where = Path(tempfile.mkdtemp(prefix="lpxy-unpacked-"))
        self.addCleanup(shutil.rmtree, where, True)
        with tarfile.open(sdist) as tar:
            tar.extractall(where, filter="data")
        (tree,) = where.iterdir()
        tox = (tree / "tox.ini").read_text()
        for env in ("[testenv:tests]", "[testenv:floor]", "[testenv:lint]", "[testenv:typing]"):
            self.assertIn(env, tox)
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "tests.test_proto", "tests.test_readme"],
            cwd=tree, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        self.assertRegex(result.stdout, r"PASSED \((skips=\d+, )?successes=\d+\)")
