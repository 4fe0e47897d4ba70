"""Measures whether GetStatus tells a tenant anything about another tenant's job by its timing.

Not a test (timings are measured, never asserted): BENCHMARKS.md records its output.

    python clients/python/tenant_timing.py target/release/longrun

Starts the given binary on a free loopback port with auth on and two tenants, `a` and `b`,
on a fresh SQLite data directory; submits a large job (60 echo actions of 60 KB input each,
whose results hold the input) and a small one as `a`; then times GetStatus one call at a
time: as `b` for the large job, the small job and an unknown id (all three answer NOT_FOUND),
and as `a` for its own large job.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import grpc

import conftest  # noqa: F401  (generates the stubs and puts them on sys.path)
from longrun.v1 import jobs_pb2 as pb
from longrun.v1 import jobs_pb2_grpc

KEYS = {"a": "tenant-a-timing-key-0123456789", "b": "tenant-b-timing-key-0123456789"}
CALLS = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(stub, job_id: str, tenant: str, calls: int = CALLS) -> str:
    metadata = [("authorization", f"Bearer {KEYS[tenant]}")]
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        try:
            stub.GetStatus(pb.GetStatusRequest(job_id=job_id), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return f"p50 {times[len(times) // 2]:.2f} ms  p90 {times[int(len(times) * 0.9)]:.2f} ms"


def main(binary: str) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="longrun-timing-"))
    config = work / "config.toml"
    entries = "".join(
        f'[[auth.keys]]\ntenant = "{tenant}"\n'
        f'key_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        for tenant, key in KEYS.items()
    )
    config.write_text("[auth]\nenabled = true\n" + entries)
    addr = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [binary, "serve", "--config", str(config), "--listen", addr, "--data-dir", str(work / "data")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        limit = 64 * 1024 * 1024
        channel = grpc.insecure_channel(
            addr,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = jobs_pb2_grpc.JobsStub(channel)
        as_a = [("authorization", f"Bearer {KEYS['a']}")]
        large = [pb.ActionSpec(name="echo", input=b"x" * 60_000) for _ in range(60)]
        big = stub.Submit(pb.SubmitRequest(actions=large, wait={"seconds": 30}), metadata=as_a, timeout=60).job
        small = stub.Submit(pb.SubmitRequest(actions=[pb.ActionSpec(name="echo")], wait={"seconds": 30}), metadata=as_a, timeout=60).job
        for round_ in (1, 2):
            print(f"round {round_}")
            print(f"  as b, a's large job:  {timed(stub, big.id, 'b')}")
            print(f"  as b, a's small job:  {timed(stub, small.id, 'b')}")
            print(f"  as b, an unknown id:  {timed(stub, str(uuid.uuid4()), 'b')}")
            print(f"  as a, its large job:  {timed(stub, big.id, 'a', 50)}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/release/longrun")
