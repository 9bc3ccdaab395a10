"""
The committed generated module must be what C{proto/Message.proto} compiles to.
"""

import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GENERATED = ROOT / "lpxy" / "_proto"


class GeneratedCodeTests(SynchronousTestCase):
    def test_regeneratedMatchesCommitted(self) -> None:
        from grpc_tools import protoc  # test-only dependency

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
                f"lpxy/_proto/{name} is stale: regenerate it from proto/Message.proto",
            )

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
