"""
The committed generated module must be what C{proto/Message.proto} compiles
to with the protoc setup.cfg pins, and that protoc must be no newer than the
protobuf runtime floor setup.cfg states: protobuf refuses generated code
newer than the runtime loading it.
"""

import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GENERATED = ROOT / "lpxy" / "_proto"


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _requirement(lines: str, name: str) -> str:
    """The version part of the requirement on C{name} in C{lines}."""
    for line in lines.splitlines():
        match = re.fullmatch(rf"\s*{re.escape(name)}\s*([<>=!~].*)", line)
        if match:
            return match.group(1).strip()
    raise AssertionError(f"no requirement on {name} in {lines!r}")


def protobuf_floor() -> tuple[int, ...]:
    """The protobuf release setup.cfg's install_requires starts from."""
    spec = _requirement(_setup_cfg()["options"]["install_requires"], "protobuf")
    match = re.fullmatch(r">=\s*(\d+(?:\.\d+)*)", spec)
    assert match, f"setup.cfg's protobuf requirement {spec!r} is not a plain >= floor"
    return tuple(int(part) for part in match.group(1).split("."))


def pinned_grpcio_tools() -> str:
    """The grpcio-tools release setup.cfg's proto extra pins."""
    spec = _requirement(_setup_cfg()["options.extras_require"]["proto"], "grpcio-tools")
    assert spec.startswith("=="), spec
    return spec[2:]


def gencode_version() -> tuple[int, ...]:
    """The protobuf release whose protoc made the committed module."""
    text = (GENERATED / "Message_pb2.py").read_text()
    header = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)$", text, re.M)
    assert header, "lpxy/_proto/Message_pb2.py names no protobuf version"
    check = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
        r"\s*(\d+),\s*(\d+),\s*(\d+),",
        text,
    )
    assert check, "lpxy/_proto/Message_pb2.py has no runtime version check"
    assert header.groups() == check.groups(), (header.groups(), check.groups())
    return tuple(int(part) for part in header.groups())


class GeneratedCodeTests(SynchronousTestCase):
    def test_regeneratedMatchesCommitted(self) -> None:
        """
        The pinned grpcio-tools regenerates exactly the committed files. Its
        protoc needs protobuf 5.x, so the check runs where tox's floor
        environment installed it, and skips elsewhere.
        """
        pinned = pinned_grpcio_tools()
        try:
            installed = version("grpcio-tools")
        except PackageNotFoundError:
            raise self.skipTest(
                f"grpcio-tools is not installed: tox -e floor (grpcio-tools=={pinned}) "
                "checks the generated code"
            ) from None
        if installed != pinned:
            raise self.skipTest(
                f"grpcio-tools {installed} is installed, the generated code is "
                f"grpcio-tools=={pinned}'s: tox -e floor checks it"
            )
        from grpc_tools import protoc

        out = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, out)
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTO}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                str(PROTO / "Message.proto"),
            ]
        )
        self.assertEqual(status, 0)
        for name in ("Message_pb2.py", "Message_pb2.pyi"):
            self.assertEqual(
                (out / name).read_text(),
                (GENERATED / name).read_text(),
                f"lpxy/_proto/{name} is stale: regenerate it from proto/Message.proto "
                f"with grpcio-tools=={pinned} (README, Development)",
            )

    def test_gencodeNotNewerThanFloor(self) -> None:
        """
        The generated code asks for a runtime no newer than setup.cfg's
        floor, so every runtime pip may install beside lpxy accepts it.
        """
        floor = protobuf_floor()
        gencode = gencode_version()
        self.assertLessEqual(
            gencode, floor,
            f"lpxy/_proto was generated for protobuf {gencode}, newer than the "
            f"floor {floor} in setup.cfg",
        )

    def test_toxFloorEnvironment(self) -> None:
        """
        tox's floor environment installs the floor's series and checks that
        it did (LPXY_EXPECT_PROTOBUF).
        """
        tox = configparser.ConfigParser(interpolation=None)
        tox.read(ROOT / "tox.ini")
        series = ".".join(str(part) for part in protobuf_floor()[:2])
        env = tox["testenv:floor"]
        self.assertIn(f"protobuf=={series}.*", env["deps"].split())
        self.assertIn(f"LPXY_EXPECT_PROTOBUF = {series}", env["setenv"])
        self.assertIn("proto", env["extras"].split())
        self.assertIn("floor", tox["tox"]["envlist"].replace(",", " ").split())

    def test_expectedRuntime(self) -> None:
        """
        Where LPXY_EXPECT_PROTOBUF names a series (tox's floor environment),
        that series is the runtime the tests run on.
        """
        expected = os.environ.get("LPXY_EXPECT_PROTOBUF")
        if not expected:
            raise self.skipTest("LPXY_EXPECT_PROTOBUF is not set (tox -e floor sets it)")
        import google.protobuf

        self.assertTrue(
            google.protobuf.__version__.startswith(expected + "."),
            f"protobuf {google.protobuf.__version__} is installed, not {expected}.x",
        )

    def test_loadsWithoutWarnings(self) -> None:
        """
        The installed runtime loads the generated module without a version
        error or warning (a fresh interpreter, warnings as errors).
        """
        result = subprocess.run(
            [sys.executable, "-W", "error", "-c",
             "from lpxy._proto.Message_pb2 import Message; "
             "assert Message(type=Message.DATA, streamId=1).SerializeToString() == "
             "b'\\x08\\x01\\x10\\x01'"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_schema(self) -> None:
        from lpxy._proto.Message_pb2 import Message

        self.assertEqual(
            dict(Message.Type.items()),
            {
                "UNKNOWN": 0,
                "DATA": 1,
                "STREAM_START": 2,
                "STREAM_RESET": 3,
                "SESSION_RESET": 4,
                "SERVICE_IDS": 5,
                "CONNECTION_START": 6,
                "CONNECTION_RESET": 7,
            },
        )
        self.assertEqual(Message.DESCRIPTOR.full_name, "com.amazonaws.iot.securedtunneling.Message")
