"""wire: protobuf <-> domain objects, and the RunSpec JSON that crosses the daemon -> launcher boundary."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from sandboxd import wire
from sandboxd.config import DEFAULT_MAX
from sandboxd.policy import RunRequest
from sandboxd.runners import Runner
from sandboxd.sandbox.spec import File, ImageSpec, Limits, RunSpec, SeccompProgram
from sandboxd.supervisor import Outcome, RunResult
from sandboxd.v1 import sandbox_pb2 as pb


# --- to_request ---------------------------------------------------------------------------------------------------

def test_to_request_maps_every_field():
    msg = pb.ExecuteRequest(
        runner="python", code="print('h\u00e9')\n", args=["a", "", "b c"], stdin=b"\x00in\xff",
        env={"LANG": "C", "APP_X": "1"}, files={"z.txt": b"Z", "data/a.bin": b"\x00\x01"},
        limits=pb.Limits(wall_time_seconds=1.5, cpu_time_seconds=0.5, memory_bytes=64 << 20, pids=7,
                         output_bytes=1000))
    req = wire.to_request(msg)
    assert isinstance(req, RunRequest)
    assert req.runner == "python"
    assert req.code == "print('h\u00e9')\n".encode("utf-8")
    assert isinstance(req.code, bytes)
    assert req.args == ("a", "", "b c")
    assert req.stdin == b"\x00in\xff"
    assert req.env == (("APP_X", "1"), ("LANG", "C"))                     # sorted: deterministic plans
    assert req.files == (("data/a.bin", b"\x00\x01"), ("z.txt", b"Z"))
    assert req.limits == {"wall_time": 1.5, "cpu_time": 0.5, "memory": 64 << 20, "pids": 7, "output": 1000}


def test_to_request_zero_limits_are_left_to_the_runner():
    req = wire.to_request(pb.ExecuteRequest(runner="sh", code="", limits=pb.Limits(memory_bytes=1 << 20)))
    assert req.limits == {"memory": 1 << 20}
    assert wire.to_request(pb.ExecuteRequest(runner="sh")).limits == {}


def test_to_request_of_an_empty_message():
    req = wire.to_request(pb.ExecuteRequest())
    assert req == RunRequest(runner="", code=b"")


# --- result_event -------------------------------------------------------------------------------------------------

EXPECTED_OUTCOMES = {
    Outcome.EXITED: pb.OUTCOME_EXITED, Outcome.SIGNALED: pb.OUTCOME_SIGNALED, Outcome.TIMEOUT: pb.OUTCOME_TIMEOUT,
    Outcome.MEMORY_LIMIT: pb.OUTCOME_MEMORY_LIMIT, Outcome.OUTPUT_LIMIT: pb.OUTCOME_OUTPUT_LIMIT,
    Outcome.CANCELLED: pb.OUTCOME_CANCELLED, Outcome.REJECTED: pb.OUTCOME_REJECTED,
    Outcome.SETUP_FAILED: pb.OUTCOME_SETUP_FAILED,
    Outcome.INTERRUPTED: pb.OUTCOME_INTERRUPTED,  # the sandbox was lost after the code started
}


def test_every_outcome_has_an_expectation():
    assert set(EXPECTED_OUTCOMES) == set(Outcome)


@pytest.mark.parametrize("outcome", list(Outcome), ids=lambda o: o.value)
def test_result_event_maps_every_outcome(outcome):
    ev = wire.result_event(RunResult(run_id="r1", outcome=outcome), None)
    assert ev.WhichOneof("event") == "result"
    assert ev.result.outcome == EXPECTED_OUTCOMES[outcome]
    assert ev.result.outcome != pb.OUTCOME_UNSPECIFIED


def test_result_event_copies_every_field_and_the_limits():
    result = RunResult(run_id="run-9", outcome=Outcome.SIGNALED, exit_code=-9, signal=9, cpu_seconds=1.25,
                       wall_seconds=2.5, peak_memory_bytes=12345678, stdout_bytes=100, stderr_bytes=200,
                       stdout_truncated=True, stderr_truncated=False, message="killed by SIGKILL")
    limits = Limits(wall_time=3.0, cpu_time=2.0, memory=64 << 20, pids=9, output=4096)
    r = wire.result_event(result, limits).result
    assert (r.run_id, r.exit_code, r.signal) == ("run-9", -9, 9)
    assert (r.cpu_time_seconds, r.wall_time_seconds) == (1.25, 2.5)
    assert (r.peak_memory_bytes, r.stdout_bytes, r.stderr_bytes) == (12345678, 100, 200)
    assert (r.stdout_truncated, r.stderr_truncated) == (True, False)
    assert r.message == "killed by SIGKILL"
    assert r.HasField("limits")
    assert r.limits == pb.Limits(wall_time_seconds=3.0, cpu_time_seconds=2.0, memory_bytes=64 << 20, pids=9,
                                 output_bytes=4096)


def test_result_event_without_limits_leaves_them_unset():
    r = wire.result_event(RunResult(run_id="x", outcome=Outcome.REJECTED, message="no"), None).result
    assert not r.HasField("limits")
    assert r.message == "no"


def test_result_event_survives_serialisation():
    ev = wire.result_event(RunResult(run_id="x", outcome=Outcome.TIMEOUT, wall_seconds=10.0), Limits())
    back = pb.ExecuteEvent.FromString(ev.SerializeToString())
    assert back.result.outcome == pb.OUTCOME_TIMEOUT and back.result.limits.wall_time_seconds == 10.0


def test_started_and_output_events():
    assert wire.started_event("r").started.run_id == "r"
    out = wire.output_event("stdout", b"\x00o")
    err = wire.output_event("stderr", b"e")
    assert out.WhichOneof("event") == "stdout" and out.stdout.data == b"\x00o"
    assert err.WhichOneof("event") == "stderr" and err.stderr.data == b"e"


# --- runners_response ---------------------------------------------------------------------------------------------

def _runner(name: str, **kw) -> Runner:
    base = Runner(name=name, image="host", command=("/usr/bin/python3", "-I", "{script}"), script="main.py",
                  extensions=("py", "pyw"), seccomp="default", env=(("PATH", "/usr/bin"),),
                  env_allowlist=("LANG", "LC_*"), default_limits=Limits(),
                  max_limits=dataclasses.replace(DEFAULT_MAX, pids=100), description="Python 3")
    return dataclasses.replace(base, **kw)


def test_runners_response():
    runners = {"zz": _runner("zz", extensions=(), available=False, unavailable_reason="image 'x' is not defined",
                             image="x", seccomp="strict", description=""),
               "py": _runner("py")}
    resp = wire.runners_response(runners)
    assert [r.name for r in resp.runners] == ["py", "zz"]        # sorted by name
    py, zz = resp.runners
    assert py.image == "host"
    assert list(py.command) == ["/usr/bin/python3", "-I", "{script}"]
    assert list(py.env_allowlist) == ["LANG", "LC_*"]
    assert py.seccomp_profile == "default"
    assert py.file_extension == "py"
    assert list(py.file_extensions) == ["py", "pyw"]
    assert py.available is True and py.unavailable_reason == ""
    assert py.description == "Python 3"
    assert py.default_limits == wire.limits_msg(Limits())
    assert py.default_limits.memory_bytes == Limits().memory
    assert py.max_limits.pids == 100 and py.max_limits.wall_time_seconds == DEFAULT_MAX.wall_time
    assert (zz.available, zz.unavailable_reason) == (False, "image 'x' is not defined")
    assert zz.file_extension == "" and list(zz.file_extensions) == []
    assert zz.seccomp_profile == "strict" and zz.image == "x"


def test_runners_response_empty():
    assert list(wire.runners_response({}).runners) == []


# --- RunSpec JSON -------------------------------------------------------------------------------------------------

def _spec() -> RunSpec:
    return RunSpec(
        run_id="run-42", argv=("/usr/bin/python3", "-I", "/work/main.py", "arg \u00e9"),
        env=(("LANG", "C.UTF-8"), ("PATH", "/usr/bin")),
        image=ImageSpec(name="deb", source="/srv/deb", entries=("usr", "bin"), etc=("ssl/certs",)),
        seccomp=SeccompProgram(name="default", sha256="ab" * 32, bpf=bytes(range(256)) * 2),
        limits=Limits(wall_time=2.5, memory=64 << 20, pids=5, cpus=0.5),
        files=(File("main.py", b"print(1)\n"), File("data/blob.bin", b"\x00\xff\x80 {\"__b64__\": 1}", 0o600),
               File("empty", b"")),
        uid=200001, gid=200001, hostname="h", user="u", network="none", stop_on_output_limit=False)


def test_runspec_json_round_trip():
    spec = _spec()
    raw = spec.to_json()
    assert isinstance(raw, bytes)
    back = RunSpec.from_json(raw)
    assert back == spec
    assert isinstance(back.files[1].data, bytes) and back.files[1].data == b"\x00\xff\x80 {\"__b64__\": 1}"
    assert isinstance(back.seccomp.bpf, bytes) and back.seccomp.bpf == spec.seccomp.bpf
    assert isinstance(back.argv, tuple) and isinstance(back.env[0], tuple)
    assert isinstance(back.image.entries, tuple)
    assert back.files[1].mode == 0o600


def test_runspec_json_is_plain_json_with_no_raw_bytes():
    raw = _spec().to_json()
    doc = json.loads(raw)
    assert doc["files"][0]["data"] == {"__b64__": "cHJpbnQoMSkK"}
    assert doc["limits"]["pids"] == 5


def test_runspec_defaults_round_trip():
    spec = RunSpec(run_id="r", argv=("/bin/true",), env=(), image=ImageSpec("host", "/"),
                   seccomp=SeccompProgram("default", "00" * 32, b""))
    assert RunSpec.from_json(spec.to_json()) == spec


def test_summary_has_no_raw_file_data():
    spec = _spec()
    summary = spec.summary()
    assert summary["files"] == [{"path": f.path, "size": len(f.data), "sha256": hashlib.sha256(f.data).hexdigest()}
                                for f in spec.files]
    assert summary["files"][0]["size"] == 9
    assert summary["seccomp"] == {"name": "default", "sha256": "ab" * 32}     # no BPF bytes either
    text = json.dumps(summary)                      # serialisable as is: nothing is bytes
    assert "print(1)" not in text
    # The interpreter is kept; arguments and env values (which may carry secrets) only as hashes.
    assert summary["argv"] == [spec.argv[0]] + ["sha256:" + hashlib.sha256(a.encode()).hexdigest()
                                                for a in spec.argv[1:]]
    assert summary["env"] == {k: "sha256:" + hashlib.sha256(v.encode()).hexdigest() for k, v in spec.env}
    assert not any(json.dumps(v) in text for _, v in spec.env)
    assert summary["limits"]["memory"] == 64 << 20
    assert summary["run_id"] == "run-42"
