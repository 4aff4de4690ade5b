"""The server's setup and teardown: an experiment with a ``[watermark]`` table is served,
refusal logging stays bounded under a flood, the gRPC server is stopped deterministically,
the process exits without module finalization's full-heap collections, and the protocol's
committed descriptor matches ``fedmosaic.proto``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedmosaic.core.errors import RoundFailedError
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.service import RefusalLog
from tests.net.conftest import REPO, experiment_toml

PROTO_DIR = REPO / "src" / "fedmosaic" / "net" / "proto"


def test_server_with_a_watermark_table_starts(tmp_path: Path, federation: Path,
                                              fedlog: pytest.LogCaptureFixture) -> None:
    from fedmosaic.config import load_experiment
    from fedmosaic.net.server import ENDPOINT_FILE, serve
    from fedmosaic.net.settings import DeploySettings
    from fedmosaic.watermark.keys import WatermarkKey

    key = WatermarkKey.generate().save(tmp_path / "wm.key")
    path = experiment_toml(tmp_path / "wm.toml", federation, rounds=1,
                           server={"wait_for_clients": 0.5, "round_retries": 0},
                           extra=f'[watermark]\nkey_file = "{key}"\nfingerprint = true\n')
    exp = load_experiment(path)
    settings = DeploySettings.from_section(exp["server"])
    # No client ever connects: the server starts (strategy with the WAFFLE stage and the
    # fingerprints, accepted by the gRPC transport), listens, then gives up on the round.
    with pytest.raises(RoundFailedError, match="clients connected"):
        serve(exp, tmp_path / "out", settings)
    endpoint = json.loads((tmp_path / "out" / ENDPOINT_FILE).read_text())
    assert endpoint["port"] > 0
    assert "listening on 127.0.0.1" in fedlog.text
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fedmosaic-rpc")]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _logger() -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("tests.net.refusals")
    logger.handlers = [Collect()]
    logger.propagate = False
    return logger, lines


def _accounted(lines: list[str]) -> int:
    """Refusals the lines account for: one per line, N per "refused N more" summary."""
    total = 0
    for line in lines:
        words = line.split()
        total += int(words[1]) if words[2] == "more" else 1
    return total


def test_refusal_log_is_bounded_per_caller_and_accounts_for_every_refusal() -> None:
    clock, (logger, lines) = _Clock(), _logger()
    refusals = RefusalLog(burst=3, window=10.0, clock=clock, logger=logger)
    for i in range(1000):
        refusals.refused("mallory", "Join", "undecodable", "malformed" if i % 2 else "replay")
        clock.now += 0.001
    refusals.refused("alice", "Heartbeat", "not joined", "not_joined")
    assert len(lines) == 4  # three of mallory's, then alice's: no flood
    clock.now = 11.0  # mallory's window is over: the next refusal reports the rest
    refusals.refused("mallory", "Join", "undecodable", "malformed")
    assert lines[4].startswith("refused 997 more calls from mallory in 11s")
    assert "malformed=499, replay=498" in lines[4]
    assert lines[5] == "refused Join from mallory: undecodable"
    for _ in range(10):
        refusals.refused("mallory", "Join", "undecodable", "malformed")
    refusals.flush()
    assert lines[-1].startswith("refused 8 more calls from mallory")
    assert _accounted(lines) == 1000 + 1 + 1 + 10
    refusals.flush()  # nothing left to report
    assert _accounted(lines) == 1012
    # A caller that goes quiet is reported once its window is over, at anyone's refusal.
    for _ in range(5):
        refusals.refused("mallory", "Join", "undecodable", "malformed")
    clock.now += 10.0
    refusals.refused("alice", "Heartbeat", "not joined", "not_joined")
    assert lines[-2].startswith("refused 2 more calls from mallory in 10s")
    assert lines[-1] == "refused Heartbeat from alice: not joined"


def test_refusal_log_keeps_a_bounded_number_of_callers() -> None:
    clock, (logger, lines) = _Clock(), _logger()
    refusals = RefusalLog(burst=1, window=60.0, max_callers=4, clock=clock, logger=logger)
    for i in range(100):  # many callers, each refused twice
        refusals.refused(f"c{i}", "Join", "no", "malformed")
        refusals.refused(f"c{i}", "Join", "no", "malformed")
    assert len(refusals._callers) == 4
    refusals.flush()
    assert _accounted(lines) == 200
    with pytest.raises(ValueError):
        RefusalLog(burst=0)


def test_quick_exit_freezes_the_heap_before_module_finalization() -> None:
    # The check is registered first, so it runs last, after every other atexit handler.
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
            "from fedmosaic.net.commands import _quick_exit\n"
            "_quick_exit()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) > 1000


def test_message_classes_keep_the_generated_names() -> None:
    names = set(pb.DESCRIPTOR.message_types_by_name)
    assert names == {n for n in pb.__all__ if n != "DESCRIPTOR"}
    for name in names:
        assert getattr(pb, name).DESCRIPTOR.full_name == f"fedmosaic.v1.{name}"
    task = pb.Task(kind=pb.Task.FIT, task_id=b"t", config=pb.FitSettings(round=2, lr=0.1))
    task.secagg.bits = 16
    again = pb.Task.FromString(task.SerializeToString())
    assert again == task and again.HasField("secagg") and again.config.HasField("lr")
    assert pb.UploadMessage(chunk=pb.TensorChunk(offset=3)).WhichOneof("part") == "chunk"


def test_committed_descriptor_matches_the_proto_file(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc",
                                 reason="grpcio-tools (dev extra) compiles the .proto")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "fresh.binpb"
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}",
                      str(PROTO_DIR / "fedmosaic.proto")])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    committed = descriptor_pb2.FileDescriptorSet.FromString(
        (PROTO_DIR / "fedmosaic.binpb").read_bytes())
    assert committed == fresh, "fedmosaic.binpb is stale: run `make proto`"


def test_every_refusal_label_the_server_raises_has_its_own_metric_series() -> None:
    """Labels not in REJECT_REASONS would all be counted as "other"."""
    import ast

    from fedmosaic.net.monitoring import REJECT_REASONS

    labels: dict[str, str] = {}
    for source in (REPO / "src" / "fedmosaic" / "net").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            name = getattr(getattr(node, "func", None), "id", None)
            position = {"Refused": 2, "WireError": 1}.get(str(name))
            if isinstance(node, ast.Call) and position is not None \
                    and len(node.args) > position:
                label = node.args[position]
                if isinstance(label, ast.Constant):
                    labels[label.value] = source.name
    assert {"malformed", "secagg_state", "secagg_message", "replay"} <= set(labels)
    assert {k: v for k, v in labels.items() if k not in REJECT_REASONS} == {}


@pytest.mark.parametrize("raw", [b"\x0a\x7f", b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"],
                         ids=["truncated", "invalid_utf8", "bad_tag"])
def test_decode_turns_any_undecodable_bytes_into_a_malformed_wire_error(raw: bytes) -> None:
    from fedmosaic.net.service import decode
    from fedmosaic.net.wire import WireError

    with pytest.raises(WireError, match="undecodable Join request") as info:
        decode(pb.JoinRequest, raw, "Join request")
    assert info.value.label == "malformed"
    assert decode(pb.JoinRequest, pb.JoinRequest(spec_hash="s").SerializeToString(),
                  "Join request").spec_hash == "s"
