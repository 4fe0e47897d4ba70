"""longrun jobs through google.longrunning.Operations, with Google's own Python client.

The contract (DESIGN.md, "google.longrunning"): the same jobs served as
`google.longrunning.Operations`; operation name = `operations/{job id}`; `metadata` = an Any
holding the `longrun.v1.Job` snapshot; `done` once the job is terminal; `response` = the result
of a succeeded job; `error` = the job's error, and a cancelled job has error code 1 (CANCELLED).
The client is `google.api_core.operations_v1.OperationsClient` over an insecure gRPC channel,
exactly as Google's generated libraries use it.
"""

from __future__ import annotations

import functools
import time
import uuid

import grpc
import pytest
from google.api_core import exceptions, operation, operations_v1
from google.protobuf import duration_pb2, empty_pb2, struct_pb2
from google.rpc import code_pb2

CALL_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def ops(channel):
    return operations_v1.OperationsClient(channel)


def op_name(job_id: str) -> str:
    return f"operations/{job_id}"


def get_op(ops, name: str):
    # retry=None and an explicit timeout: one bounded call, no silent retrying.
    return ops.get_operation(name, retry=None, timeout=CALL_TIMEOUT_S)


def submit(pb, jobs, name: str, params: dict, wait_s: int = 0):
    params_struct = struct_pb2.Struct()
    params_struct.update(params)
    req = pb.SubmitRequest(actions=[pb.ActionSpec(name=name, params=params_struct)])
    if wait_s:
        req.wait.CopyFrom(duration_pb2.Duration(seconds=wait_s))
    return jobs.Submit(req, timeout=CALL_TIMEOUT_S + wait_s).job


def wait_running(pb, jobs, job_id: str):
    """Reads the job's WatchJob stream until it shows RUNNING."""
    call = jobs.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=STREAM_TIMEOUT_S)
    try:
        for response in call:
            if response.job.state == pb.JOB_STATE_RUNNING:
                return response.job
        pytest.fail(f"job {job_id} ended without being seen RUNNING")
    finally:
        call.cancel()


def metadata_job(pb, op):
    """The Job snapshot in an Operation's metadata."""
    assert op.HasField("metadata"), f"operation {op.name} has no metadata"
    assert op.metadata.Is(pb.Job.DESCRIPTOR), (
        f"metadata must be an Any of longrun.v1.Job, got {op.metadata.type_url}"
    )
    job = pb.Job()
    op.metadata.Unpack(job)
    return job


def test_get_a_succeeded_job_as_an_operation(pb, jobs, ops):
    job = submit(pb, jobs, "echo", {"message": "hi"}, wait_s=10)
    assert job.state == pb.JOB_STATE_SUCCEEDED

    op = get_op(ops, op_name(job.id))
    assert op.name == op_name(job.id)
    assert op.done
    assert op.WhichOneof("result") == "response", "a succeeded job's operation has a response"
    assert op.response.type_url.startswith("type.googleapis.com/"), op.response.type_url
    snapshot = metadata_job(pb, op)
    assert snapshot.id == job.id
    assert snapshot.state == pb.JOB_STATE_SUCCEEDED
    assert snapshot.version == job.version


def test_get_a_running_job_as_an_operation(pb, jobs, ops):
    job = submit(pb, jobs, "sleep", {"duration_ms": 60_000, "steps": 600})
    try:
        wait_running(pb, jobs, job.id)
        op = get_op(ops, op_name(job.id))
        assert op.name == op_name(job.id)
        assert not op.done
        assert op.WhichOneof("result") is None, "an unfinished operation has no result yet"
        snapshot = metadata_job(pb, op)
        assert snapshot.id == job.id
        assert snapshot.state == pb.JOB_STATE_RUNNING
    finally:
        jobs.Cancel(pb.CancelRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)


def test_a_failed_job_is_an_operation_error(pb, jobs, ops):
    job = submit(
        pb,
        jobs,
        "fail",
        {"code": "FAILED_PRECONDITION", "reason": "AS_ASKED", "message": "boom", "retryable": False},
        wait_s=10,
    )
    assert job.state == pb.JOB_STATE_FAILED

    op = get_op(ops, op_name(job.id))
    assert op.done
    assert op.WhichOneof("result") == "error"
    assert op.error.code == code_pb2.FAILED_PRECONDITION
    assert "boom" in op.error.message
    assert metadata_job(pb, op).state == pb.JOB_STATE_FAILED


def test_list_operations(pb, jobs, ops):
    ids = {submit(pb, jobs, "echo", {"message": f"list {i}"}, wait_s=10).id for i in range(3)}

    found = {}
    for n, op in enumerate(ops.list_operations("operations", "", retry=None, timeout=CALL_TIMEOUT_S)):
        assert n < 10_000, "listing did not end"
        assert op.name.startswith("operations/"), op.name
        found[op.name] = op
    for job_id in ids:
        op = found.get(op_name(job_id))
        assert op is not None, f"{op_name(job_id)} not listed; listed: {sorted(found)}"
        assert op.done
        assert metadata_job(pb, op).id == job_id


def test_cancel_a_running_job_through_operations(pb, jobs, ops):
    job = submit(pb, jobs, "sleep", {"duration_ms": 60_000, "steps": 600})
    try:
        wait_running(pb, jobs, job.id)
        cancel_through_operations(pb, jobs, ops, job)
    finally:
        # Whatever happened above, leave no job sleeping in the shared server.
        jobs.Cancel(pb.CancelRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)


def cancel_through_operations(pb, jobs, ops, job):
    name = op_name(job.id)

    # The future Google's generated clients return for a long-running call (what
    # operation.from_gapic builds), with each poll a single bounded call.
    future = operation.Operation(
        get_op(ops, name),
        functools.partial(ops.get_operation, name, retry=None, timeout=CALL_TIMEOUT_S),
        functools.partial(ops.cancel_operation, name, retry=None, timeout=CALL_TIMEOUT_S),
        result_type=empty_pb2.Empty,  # never unpacked: a cancelled operation ends in error
        metadata_type=pb.Job,
    )
    assert not future.done()
    started = time.monotonic()
    assert future.cancel()

    with pytest.raises(exceptions.Cancelled):
        future.result(timeout=STREAM_TIMEOUT_S)
    assert time.monotonic() - started < 20, "cancel must reach the running job"
    assert future.cancelled()
    assert future.operation.done
    assert future.operation.error.code == code_pb2.CANCELLED == 1
    assert future.metadata.id == job.id
    assert future.metadata.state == pb.JOB_STATE_CANCELLED

    # The same job, seen through longrun.v1.Jobs.
    status = jobs.GetStatus(pb.GetStatusRequest(job_id=job.id), timeout=CALL_TIMEOUT_S).job
    assert status.state == pb.JOB_STATE_CANCELLED


def test_delete_a_finished_operation(pb, jobs, ops):
    job = submit(pb, jobs, "echo", {"message": "bye"}, wait_s=10)
    name = op_name(job.id)
    ops.delete_operation(name, retry=None, timeout=CALL_TIMEOUT_S)
    with pytest.raises(exceptions.NotFound):
        get_op(ops, name)
    with pytest.raises(grpc.RpcError) as info:
        jobs.GetStatus(pb.GetStatusRequest(job_id=job.id), timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_operation_is_not_found(ops):
    with pytest.raises(exceptions.NotFound):
        get_op(ops, op_name(str(uuid.uuid4())))
