"""policy.plan_run / resolve_limits: a request sets limits up to the runner's and the policy's maximum, the policy caps
every limit, and everything a request carries is validated."""
from __future__ import annotations

import dataclasses
import math

import pytest

from sandboxd.config import DEFAULT_MAX, Policy
from sandboxd.errors import InvalidRequest, NotFound, TooLarge, Unavailable
from sandboxd.policy import MAX_ARGS, MAX_FILES, MAX_PATH_DEPTH, RunRequest, plan_run, plan_session, resolve_limits
from sandboxd.runners import Runner
from sandboxd.sandbox.spec import File, ImageSpec, Limits, RunSpec, SeccompProgram

DEFAULTS = Limits(wall_time=5.0, cpu_time=4.0, memory=128 << 20, pids=32, output=64 << 10)
MAXIMA = dataclasses.replace(DEFAULT_MAX, wall_time=60.0, cpu_time=30.0, memory=1 << 30, pids=256, output=8 << 20)
IMAGES = {"host": ImageSpec(name="host", source="/"), "deb": ImageSpec(name="deb", source="/srv/deb")}
SECCOMP = {"default": SeccompProgram(name="default", sha256="ab" * 32, bpf=b"\x06\x00\x00\x00\x00\x00\xff\x7f"),
           "strict": SeccompProgram(name="strict", sha256="cd" * 32, bpf=b"\x06" + b"\x00" * 7)}
MAXREQ = 1 << 20


def _runner(**changes) -> Runner:
    base = Runner(name="py", image="deb", command=("/usr/bin/python3", "-I", "{script}", "--"), script="main.py",
                  extensions=("py",), seccomp="strict", env=(("PATH", "/usr/bin"), ("LANG", "C.UTF-8")),
                  env_allowlist=("LANG", "LC_*", "APP_?"), default_limits=DEFAULTS, max_limits=MAXIMA)
    return dataclasses.replace(base, **changes)


RUNNERS = {"py": _runner(), "off": _runner(name="off", available=False, unavailable_reason="no python here")}


def _plan(req: RunRequest, runners=None, max_request_bytes=MAXREQ, **kw) -> tuple[RunSpec, tuple[str, ...]]:
    return plan_run(req, runners or RUNNERS, IMAGES, SECCOMP, "run-1", max_request_bytes, **kw)


def _req(**kw) -> RunRequest:
    return RunRequest(runner=kw.pop("runner", "py"), code=kw.pop("code", b"print(1)\n"), **kw)


# --- resolve_limits -----------------------------------------------------------------------------------------------

def test_limits_default_from_the_runner():
    assert resolve_limits({}, _runner()) == DEFAULTS
    assert _plan(_req())[0].limits == DEFAULTS


def test_zero_means_the_runners_default():
    assert resolve_limits({"memory": 0, "wall_time": 0.0, "pids": None}, _runner()) == DEFAULTS


def test_lower_limits_are_accepted():
    lim = resolve_limits({"wall_time": 1.5, "cpu_time": 1, "memory": 64 << 20, "pids": 3, "output": 10}, _runner())
    assert (lim.wall_time, lim.cpu_time, lim.memory, lim.pids, lim.output) == (1.5, 1, 64 << 20, 3, 10)
    # Limits a request cannot name keep the runner's values.
    assert (lim.cpus, lim.stack, lim.tmp_size, lim.open_files) == (DEFAULTS.cpus, DEFAULTS.stack, DEFAULTS.tmp_size,
                                                                  DEFAULTS.open_files)


def test_limits_between_default_and_max_are_accepted():
    lim = resolve_limits({"memory": 1 << 30, "wall_time": 60.0}, _runner())
    assert lim.memory == 1 << 30 and lim.wall_time == 60.0


@pytest.mark.parametrize("name, value", [
    ("wall_time", 60.5), ("cpu_time", 31), ("memory", (1 << 30) + 1), ("pids", 257), ("output", (8 << 20) + 1),
])
def test_above_max_names_the_limit(name, value):
    with pytest.raises(InvalidRequest) as info:
        resolve_limits({name: value}, _runner())
    msg = str(info.value)
    assert msg.startswith(f"limits.{name}: {value} is above the maximum {getattr(MAXIMA, name)}")
    assert "'py'" in msg


@pytest.mark.parametrize("name", ["wall_time", "cpu_time", "memory", "pids", "output"])
@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), float("-inf")])
def test_negative_or_non_finite_rejected(name, value):
    with pytest.raises(InvalidRequest, match=f"^limits.{name}: "):
        resolve_limits({name: value}, _runner())


def test_ceiling_lowers_the_maximum():
    ceiling = dataclasses.replace(MAXIMA, memory=64 << 20, wall_time=2.0)
    with pytest.raises(InvalidRequest, match=f"limits.memory: {65 << 20} is above the maximum {64 << 20}"):
        resolve_limits({"memory": 65 << 20}, _runner(), ceiling)
    # defaults above the ceiling follow it down
    lim = resolve_limits({}, _runner(), ceiling)
    assert lim.memory == 64 << 20 and lim.wall_time == 2.0 and lim.pids == DEFAULTS.pids


def test_ceiling_cannot_raise_the_runners_maximum():
    ceiling = dataclasses.replace(MAXIMA, memory=8 << 30)
    with pytest.raises(InvalidRequest, match="above the maximum"):
        resolve_limits({"memory": 2 << 30}, _runner(), ceiling)


def test_plan_run_passes_the_ceiling():
    ceiling = dataclasses.replace(MAXIMA, pids=8)
    with pytest.raises(InvalidRequest, match="limits.pids"):
        _plan(_req(limits={"pids": 9}), ceiling=ceiling)
    assert _plan(_req(), ceiling=ceiling)[0].limits.pids == 8


@pytest.mark.parametrize("memory", [1, 1 << 20, (4 << 20) - 1])
def test_memory_below_4mib_rejected(memory):
    with pytest.raises(InvalidRequest, match="limits.memory: .*minimum 4MiB"):
        resolve_limits({"memory": memory}, _runner())


def test_memory_of_exactly_4mib_accepted():
    assert resolve_limits({"memory": 4 << 20}, _runner()).memory == 4 << 20


def test_runner_default_memory_below_4mib_rejected():
    with pytest.raises(InvalidRequest, match="limits.memory"):
        resolve_limits({}, _runner(default_limits=dataclasses.replace(DEFAULTS, memory=1 << 20)))


def test_wall_time_below_1ms_rejected():
    with pytest.raises(InvalidRequest, match="limits.wall_time"):
        resolve_limits({"wall_time": 0.0001}, _runner())
    assert resolve_limits({"wall_time": 0.001}, _runner()).wall_time == 0.001


def test_request_limits_are_validated_by_plan_run():
    with pytest.raises(InvalidRequest, match="limits.output"):
        _plan(_req(limits={"output": 1 << 40}))
    assert _plan(_req(limits={"memory": 32 << 20}))[0].limits.memory == 32 << 20


# --- runner selection ---------------------------------------------------------------------------------------------

def test_unknown_runner_is_not_found_and_lists_the_available_ones():
    with pytest.raises(NotFound) as info:
        _plan(_req(runner="ruby"))
    assert "'ruby'" in str(info.value) and "off, py" in str(info.value)


@pytest.mark.parametrize("name", ["", "Py", "../py", "py/x", "p y", "-py", "a" * 65, "py\0", ".py"])
def test_invalid_runner_name(name):
    with pytest.raises(InvalidRequest, match="^runner: "):
        _plan(_req(runner=name))


def test_unavailable_runner():
    with pytest.raises(Unavailable, match="'off' cannot run here: no python here"):
        _plan(_req(runner="off"))


def test_oversize_request():
    with pytest.raises(TooLarge, match="1001 bytes .* maximum of 1000 bytes"):
        _plan(_req(code=b"x" * 1001), max_request_bytes=1000)
    assert _plan(_req(code=b"x" * 1000), max_request_bytes=1000)[0].files[0].data == b"x" * 1000


@pytest.mark.parametrize("part", [
    {"stdin": b"s" * 600},
    {"args": ("a" * 300, "b" * 300)},
    {"env": (("LANG", "v" * 600),)},
    {"files": (("data.bin", b"d" * 600),)},
])
def test_every_part_of_the_request_counts_towards_its_size(part):
    with pytest.raises(TooLarge):
        _plan(_req(code=b"c" * 500, **part), max_request_bytes=1000)


def test_request_size_counts_utf8_bytes():
    req = _req(code=b"", args=("\u00e9" * 600,))   # 600 characters, 1200 bytes
    with pytest.raises(TooLarge):
        _plan(req, max_request_bytes=1000)


# --- env ----------------------------------------------------------------------------------------------------------

def test_env_filtered_by_allowlist_and_dropped_names_returned():
    spec, dropped = _plan(_req(env=(("LANG", "fr_FR.UTF-8"), ("LC_ALL", "C"), ("APP_1", "x"), ("PATH", "/evil"),
                                    ("LD_PRELOAD", "/x.so"), ("APP_12", "y"))))
    assert dict(spec.env) == {"PATH": "/usr/bin", "LANG": "fr_FR.UTF-8", "LC_ALL": "C", "APP_1": "x"}
    assert dropped == ("PATH", "LD_PRELOAD", "APP_12")
    assert list(spec.env) == sorted(spec.env)


def test_runner_env_is_always_set():
    spec, dropped = _plan(_req())
    assert spec.env == (("LANG", "C.UTF-8"), ("PATH", "/usr/bin"))
    assert dropped == ()


@pytest.mark.parametrize("name", ["", "1X", "A-B", "A B", "A=B", "\u00c9", "A\0", "X" * 129])
def test_invalid_env_name_rejected(name):
    with pytest.raises(InvalidRequest, match="^env: "):
        _plan(_req(env=((name, "v"),)))


def test_invalid_env_name_rejected_even_if_it_would_be_dropped():
    with pytest.raises(InvalidRequest):
        _plan(_req(env=(("NOT-ALLOWED", "v"),)))


def test_env_name_with_trailing_newline_rejected():
    with pytest.raises(InvalidRequest, match="^env: "):
        _plan(_req(env=(("LC_ALL\n", "C"),)))


def test_runner_name_with_trailing_newline_is_invalid():
    with pytest.raises(InvalidRequest, match="^runner: "):
        _plan(_req(runner="py\n"))


def test_nul_in_env_value_rejected():
    with pytest.raises(InvalidRequest, match="^env: LANG: value contains a NUL byte"):
        _plan(_req(env=(("LANG", "C\0x"),)))


# --- args ---------------------------------------------------------------------------------------------------------

def test_argv_from_runner_command_with_script_path_and_args():
    spec, _ = _plan(_req(args=("one", "{script}", "")))
    assert spec.argv == ("/usr/bin/python3", "-I", "/work/main.py", "--", "one", "{script}", "")
    assert spec.workdir == "/work"


def test_script_placeholder_replaced_wherever_it_is():
    runner = _runner(command=("/bin/sh", "-c", ". {script}", "{script}"), script="run.sh")
    spec, _ = _plan(_req(), runners={"py": runner})
    assert spec.argv == ("/bin/sh", "-c", ". {script}", "/work/run.sh")


def test_nul_in_args_rejected():
    with pytest.raises(InvalidRequest, match="^args: "):
        _plan(_req(args=("ok", "a\0b")))


def test_too_many_args_rejected():
    assert len(_plan(_req(args=("x",) * MAX_ARGS))[0].argv) == 4 + MAX_ARGS
    with pytest.raises(InvalidRequest, match="^args: "):
        _plan(_req(args=("x",) * (MAX_ARGS + 1)))


# --- files --------------------------------------------------------------------------------------------------------

def test_script_is_the_first_file_then_the_request_files_in_order():
    spec, _ = _plan(_req(code=b"CODE", files=(("b.txt", b"B"), ("dir/a.txt", b"A"), ("dir/sub/c", b""))))
    assert spec.files == (File("main.py", b"CODE", 0o644), File("b.txt", b"B", 0o644),
                          File("dir/a.txt", b"A", 0o644), File("dir/sub/c", b"", 0o644))


@pytest.mark.parametrize("path", [
    "", "/etc/passwd", "/abs", "..", "../x", "a/../../x", "a/..", ".", "./x", "a/./b", "a//b", "a/", "/",
    "a\0b", "/".join(["d"] * (MAX_PATH_DEPTH + 1)), "x" * 256, "d/" + "x" * 256,
])
def test_bad_file_paths_rejected(path):
    with pytest.raises(InvalidRequest, match="^files: "):
        _plan(_req(files=((path, b"x"),)))


def test_deepest_and_longest_allowed_paths():
    deep = "/".join(["d"] * MAX_PATH_DEPTH)
    spec, _ = _plan(_req(files=((deep, b"x"), ("y" * 255, b"y"), ("...", b"z"), (".hidden", b"h"))))
    assert [f.path for f in spec.files[1:]] == [deep, "y" * 255, "...", ".hidden"]


@pytest.mark.parametrize("files", [
    (("main.py", b"x"),),                       # replaces the script
    (("main.py/x", b"x"),),                     # makes the script a directory
    (("a", b"x"), ("a", b"y")),                 # duplicate
    (("a", b"x"), ("a/b", b"y")),               # a file, then used as a directory
    (("a/b", b"y"), ("a", b"x")),               # a directory, then used as a file
    (("a/b/c", b"y"), ("a/b", b"x")),
])
def test_file_collisions_rejected(files):
    with pytest.raises(InvalidRequest, match="collides"):
        _plan(_req(files=files))


def test_siblings_and_prefix_names_do_not_collide():
    spec, _ = _plan(_req(files=(("a/b", b"1"), ("a/c", b"2"), ("ab", b"3"), ("a/bc", b"4"), ("main.pyc", b"5"))))
    assert len(spec.files) == 6


def test_too_many_files_rejected():
    ok = tuple((f"f{i}", b"") for i in range(MAX_FILES))
    assert len(_plan(_req(files=ok))[0].files) == MAX_FILES + 1
    with pytest.raises(InvalidRequest, match=f"^files: {MAX_FILES + 1} files"):
        _plan(_req(files=ok + (("extra", b""),)))


# --- the whole plan -----------------------------------------------------------------------------------------------

def test_plan_uses_the_runners_image_and_seccomp_program():
    spec, _ = _plan(_req(stdin=b"ignored here"), stop_on_output_limit=False)
    assert spec.run_id == "run-1"
    assert spec.image is IMAGES["deb"]
    assert spec.seccomp is SECCOMP["strict"]
    assert spec.stop_on_output_limit is False
    assert (spec.uid, spec.gid) == (0, 0)   # the supervisor allocates them
    assert math.isfinite(spec.limits.wall_time)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Limits)])
def test_policy_ceiling_caps_every_limit(name):
    """Every key [policies.limits] accepts is enforced: a ceiling below the runner's default lowers the run's
    limit, whether or not a request can set that limit itself."""
    low = getattr(DEFAULTS, name) / 2 if name in ("wall_time", "cpu_time", "cpus") else getattr(DEFAULTS, name) // 2
    ceiling = dataclasses.replace(MAXIMA, **{name: low})
    assert getattr(resolve_limits({}, _runner(), ceiling), name) == getattr(ceiling, name)


def test_request_may_raise_a_limit_above_the_default_up_to_the_ceiling():
    ceiling = dataclasses.replace(MAXIMA, wall_time=40.0)
    assert resolve_limits({"wall_time": 40.0}, _runner(), ceiling).wall_time == 40.0 > DEFAULTS.wall_time
    with pytest.raises(InvalidRequest, match="limits.wall_time: 40.5 is above the maximum 40.0"):
        resolve_limits({"wall_time": 40.5}, _runner(), ceiling)


def test_a_default_run_fits_its_runners_pooled_template():
    """The pool's template and a run planned with the runner's defaults build the same sandbox (sandbox_key);
    the claim then sets the run's own cgroup limits, so those may differ; mount sizes and egress may not."""
    import dataclasses as dc
    from sandboxd.policy import plan_pooled
    from sandboxd.sandbox.spec import Egress, sandbox_key
    tmpl = plan_pooled(RUNNERS["py"], IMAGES, SECCOMP, "pool")
    spec, _ = _plan(_req(limits={"memory": 64 << 20}))
    assert tmpl.pooled and not spec.pooled and tmpl.files == () and tmpl.argv == ()
    assert sandbox_key(spec) == sandbox_key(tmpl)
    assert sandbox_key(dc.replace(spec, limits=dc.replace(spec.limits, tmp_size=1 << 20))) != sandbox_key(tmpl)
    assert sandbox_key(dc.replace(spec, network="egress", egress=Egress("p"))) != sandbox_key(tmpl)


def test_a_default_run_fits_a_prestarted_interpreter_and_one_with_args_or_env_does_not():
    """A prestart runner's template carries the argv and env of a run without args or env of its own, and the
    highest rlimits a request may ask for (they can only be lowered at the claim): such a run fits it
    (prestart_key equal, rlimits lowerable); args, env of its own or a higher limit do not."""
    import dataclasses as dc
    from sandboxd.policy import plan_pooled
    from sandboxd.sandbox import rlimits
    from sandboxd.sandbox.spec import prestart_key, prestart_script
    runner = _runner(prestart=True)
    tmpl = plan_pooled(runner, IMAGES, SECCOMP, "pool")
    assert tmpl.prestart == "main.py" and tmpl.argv == ("/usr/bin/python3", "-I", "/work/main.py", "--")
    assert (tmpl.limits.cpu_time, tmpl.limits.pids) == (MAXIMA.cpu_time, MAXIMA.pids)
    spec, _ = _plan(_req(limits={"pids": 8, "cpu_time": 1}), runners={"py": runner})
    assert prestart_key(spec) == prestart_key(tmpl) and prestart_script(dc.replace(spec, prestart="main.py"))
    lower = rlimits.changes(tmpl.limits, spec.limits)
    assert lower is not None and {w for w, _, _ in lower} >= {rlimits.resource.RLIMIT_NPROC, rlimits.resource.RLIMIT_CPU}
    for other in (_req(args=("x",)), _req(env=(("LANG", "C"),))):
        assert prestart_key(_plan(other, runners={"py": runner})[0]) != prestart_key(tmpl)
    assert rlimits.changes(spec.limits, tmpl.limits) is None        # raising is never planned
    assert rlimits.changes(tmpl.limits, dc.replace(tmpl.limits, stack=1 << 20)) is None
    assert plan_pooled(_runner(), IMAGES, SECCOMP, "pool").prestart == ""


def test_a_default_session_fits_its_runners_pooled_session_template():
    from sandboxd.policy import plan_pooled_session
    from sandboxd.sandbox.spec import sandbox_key
    tmpl = plan_pooled_session(RUNNERS["py"], IMAGES, SECCOMP, "pool", ())
    assert tmpl.session and tmpl.pooled and tmpl.files == ()
    spec = plan_session("py", RUNNERS, IMAGES, SECCOMP, "s-1", {"memory": 64 << 20}, Policy(name="p", principals=("*",)), 60.0,
                        (("a.txt", b"x"),), (), MAXREQ)
    assert sandbox_key(spec) == sandbox_key(tmpl)
