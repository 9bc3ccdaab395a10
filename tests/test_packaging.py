"""
The installed package, not the source tree, provides the twistd plugins.
"""

import subprocess

from twisted.trial.unittest import TestCase

from tests.support.installed import installed_copy, installed_env, outside_dir, twistd_argv


class InstalledPluginTests(TestCase):
    def test_pluginFilesInstalled(self) -> None:
        target = installed_copy()
        self.assertTrue((target / "twisted" / "plugins" / "lpxy_plugins.py").exists())
        self.assertFalse((target / "twisted" / "plugins" / "__init__.py").exists())
        self.assertTrue((target / "lpxy" / "_proto" / "Message_pb2.py").exists())

    def test_twistdListsBothPlugins(self) -> None:
        result = subprocess.run(
            twistd_argv("--help"),
            cwd=outside_dir(), env=installed_env(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("localproxy", result.stdout)
        self.assertIn("tunnelservice", result.stdout)

    def test_pluginHelpFromInstalledCopy(self) -> None:
        for plugin, expected in (
            ("tunnelservice", "Usage: twistd [options] tunnelservice"),
            ("localproxy", "Usage: twistd [twistd options] localproxy [options]"),
        ):
            result = subprocess.run(
                twistd_argv(plugin, "--help"),
                cwd=outside_dir(), env=installed_env(), capture_output=True, text=True,
                timeout=60,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(expected, result.stdout)


class DependencyTests(TestCase):
    def test_nativeWebSocketMasking(self) -> None:
        """
        Autobahn masks every frame a proxy sends in native code (its own
        NVX, or wsaccel where an older Autobahn is installed), not in its
        pure-Python fallback.
        """
        from autobahn.websocket.xormasker import create_xor_masker

        masker = create_xor_masker(b"abcd", 1 << 20)
        self.assertNotEqual(type(masker).__module__, "autobahn.websocket.xormasker")
