"""A federation member turned hostile: raw gRPC calls with a valid member certificate, so any
bytes can be sent to any method (identity serializers), against a live ``fedmosaic server``.
The messages follow the wire protocol (``fedmosaic/net/proto``); what the server owes each
of them is in docs/deployment.md ("Faults and limits") and docs/security.md."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from fedmosaic.faults.federation import member_channel
from fedmosaic.net.proto import fedmosaic_pb2 as pb

METHOD = "/fedmosaic.v1.Federation/"
Answer = tuple[grpc.StatusCode, str]


def header(task: pb.Task, numel: int, num_samples: int = 10) -> bytes:
    return pb.UploadMessage(header=pb.UploadHeader(
        task_id=task.task_id, round=task.round, num_samples=num_samples, numel=numel,
        metrics={"train_loss": 0.5})).SerializeToString()


def chunks(values: np.ndarray, chunk_bytes: int) -> list[bytes]:
    """``values`` as upload chunk messages of at most ``chunk_bytes`` payload (offsets count
    elements)."""
    per = max(1, chunk_bytes // 4)
    return [pb.UploadMessage(chunk=pb.TensorChunk(
        offset=i, data=values[i:i + per].astype("<f4").tobytes())).SerializeToString()
        for i in range(0, len(values), per)]


class Member:
    """One member's channel and its raw calls; ``beat`` keeps its session alive."""

    def __init__(self, port: int, credentials: Path, member: str, spec: str) -> None:
        self.member, self.spec = member, spec
        self.channel = member_channel(port, credentials, member)
        self.instance = ""
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    def unary(self, method: str, payload: bytes, timeout: float = 10.0) -> tuple[Answer, bytes]:
        try:
            reply = self.channel.unary_unary(METHOD + method)(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return (exc.code(), exc.details() or ""), b""
        return (grpc.StatusCode.OK, ""), reply

    def upload(self, parts: list[bytes], timeout: float = 20.0) -> Answer:
        try:
            self.channel.stream_unary(METHOD + "UploadUpdate")(iter(parts), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def stalled_upload(self, first: bytes, timeout: float) -> tuple[Answer, float]:
        """Send ``first`` (a header) and then nothing: how the call ended and when."""
        release = threading.Event()

        def messages():  # type: ignore[no-untyped-def]
            yield first
            release.wait(timeout)  # bounded: the stream ends by itself after ``timeout``

        started = time.monotonic()
        try:
            self.channel.stream_unary(METHOD + "UploadUpdate")(messages(), timeout=timeout)
            answer: Answer = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            answer = (exc.code(), exc.details() or "")
        release.set()
        return answer, time.monotonic() - started

    def join(self) -> pb.JoinReply:
        answer, raw = self.unary("Join", pb.JoinRequest(spec_hash=self.spec).SerializeToString())
        if answer[0] != grpc.StatusCode.OK:
            raise RuntimeError(f"{self.member} could not join: {answer}")
        reply = pb.JoinReply.FromString(raw)
        self.instance = reply.server_instance
        return reply

    def heartbeat(self) -> Answer:
        return self.unary("Heartbeat", pb.HeartbeatRequest(
            server_instance=self.instance).SerializeToString(), timeout=5)[0]

    def beat(self, every: float = 0.3) -> None:
        """Heartbeats in a background thread until ``close``."""
        def run() -> None:
            while not self._stop.wait(every):
                self.heartbeat()

        self._beats = threading.Thread(target=run, daemon=True)
        self._beats.start()

    def get_task(self, wait: float = 5.0) -> pb.Task | None:
        answer, raw = self.unary("GetTask", pb.TaskRequest(
            server_instance=self.instance, wait_seconds=wait).SerializeToString(),
            timeout=wait + 10)
        return pb.Task.FromString(raw) if answer[0] == grpc.StatusCode.OK else None

    def next_fit(self, timeout: float) -> pb.Task | None:
        """Poll until a FIT task (None on DONE or after ``timeout`` seconds)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            task = self.get_task(min(5.0, max(0.1, end - time.monotonic())))
            if task is not None and task.kind == pb.Task.FIT:
                return task
            if task is not None and task.kind == pb.Task.DONE:
                return None
            if task is None:
                time.sleep(0.2)
        return None

    def refuse(self, task: pb.Task) -> Answer:
        """Sit the task out (a refusal the client runtime also sends when training fails)."""
        return self.unary("RefuseTask", pb.TaskRefusal(
            task_id=task.task_id, round=task.round, code="training_failed",
            reason="hostile member sits this round out").SerializeToString())[0]

    def sit_out(self, timeout: float) -> int:
        """Refuse every task until DONE or ``timeout``: the member stays connected without
        holding any round up. Returns how many tasks it refused."""
        refused = 0
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            task = self.get_task(min(5.0, max(0.1, end - time.monotonic())))
            if task is None:
                time.sleep(0.2)
            elif task.kind == pb.Task.DONE:
                break
            elif task.kind in (pb.Task.FIT, pb.Task.EVALUATE):
                self.refuse(task)
                refused += 1
        return refused

    def flood_polls(self, n: int, wait: float) -> Counter[tuple[grpc.StatusCode, bool]]:
        """``n`` concurrent ``GetTask`` long polls: (code, refused as over the member's
        budget) -> count."""
        payload = pb.TaskRequest(server_instance=self.instance,
                                 wait_seconds=wait).SerializeToString()
        call = self.channel.unary_unary(METHOD + "GetTask")
        barrier = threading.Barrier(n, timeout=30)

        def one(_: int) -> tuple[grpc.StatusCode, bool]:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
            try:
                call(payload, timeout=wait + 10)
                return grpc.StatusCode.OK, False
            except grpc.RpcError as exc:
                return exc.code(), "from this member" in (exc.details() or "")

        with ThreadPoolExecutor(n) as pool:
            return Counter(pool.map(one, range(n)))

    def close(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join(5)
        self.channel.close()
