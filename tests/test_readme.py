"""
Tests for README.rst's module maps (its Development section): one line per
module of C{lpxy/}, C{tests/support/} and C{bench/}, matching the tree.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("lpxy/", "lpxy/proxy/", "lpxy/tunnelservice/", "tests/support/", "bench/")
_HEADING = re.compile(r"\(``([a-z_/]+/)``\)::$")
_ENTRY = re.compile(r"    ([a-z_]+\.py) ")


def module_maps(text: str) -> dict[str, list[str]]:
    """
    The module names of each map: a literal block after a line ending in
    C{(``folder/``)::}, one C{    name.py  what it owns} line a module
    (indented continuation lines name none).
    """
    maps: dict[str, list[str]] = {}
    folder = None
    for line in text.splitlines():
        heading = _HEADING.search(line)
        if heading is not None:
            folder = heading.group(1)
            maps[folder] = []
        elif folder is not None:
            if line and not line.startswith(" "):
                folder = None
            else:
                entry = _ENTRY.match(line)
                if entry is not None:
                    maps[folder].append(entry.group(1))
    return maps


def modules(folder: str) -> list[str]:
    """The modules of C{folder}, but its C{__init__.py}."""
    return sorted(p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py")


class ModuleMapTests(SynchronousTestCase):
    def test_maps_match_the_tree(self) -> None:
        """
        Each folder's map names each of its modules once, and nothing
        else.
        """
        maps = module_maps((ROOT / "README.rst").read_text(encoding="utf-8"))
        self.assertEqual(sorted(maps), sorted(MAPPED))
        for folder in MAPPED:
            named = maps[folder]
            self.assertEqual(
                sorted(named), modules(folder), f"README.rst's map of {folder}"
            )
            self.assertEqual(len(named), len(set(named)), f"{folder} named twice")

    def test_reader(self) -> None:
        """The reader takes entries, not continuation lines or prose."""
        text = (
            "Intro (``a/``)::\n\n"
            "    one.py   does one\n"
            "             thing.py across lines\n"
            "    two.py   does two\n\n"
            "Prose naming ``three.py``.\n"
        )
        self.assertEqual(module_maps(text), {"a/": ["one.py", "two.py"]})
