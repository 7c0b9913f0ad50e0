"""Plan: turn a validated request, its runner and the configuration into one immutable RunSpec.

Pure logic, no I/O, daemon side. Limits: a request may set the five limits of REQUEST_LIMITS anywhere up to the
lower of the runner's maximum and the policy's ceiling (above the runner's default too: an agent that needs a
longer run asks for it, and the operator bounds it with the maximum and the policy). Every other limit is the
runner's default. The policy's ceiling caps every limit, including those a request cannot set, so a ceiling in
[policies.limits] is never silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .config import ENV_NAME_RE, Identity, Policy
from .errors import InvalidRequest, NotAllowed, NotFound, TooLarge, Unavailable
from .runners import Runner
from .sandbox.spec import Egress, File, ImageSpec, Limits, RunSpec, SeccompProgram

MAX_ARGS = 1024
MAX_FILES = 256
MAX_PATH_DEPTH = 8
RUNNER_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
REQUEST_LIMITS = ("wall_time", "cpu_time", "memory", "pids", "output")


@dataclass(frozen=True)
class RunRequest:
    """What the caller asked for, already out of protobuf. Zero limits mean "the runner's default"."""

    runner: str
    code: bytes
    args: tuple[str, ...] = ()
    stdin: bytes = b""
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()
    limits: dict = field(default_factory=dict)   # subset of REQUEST_LIMITS -> value
    collect: tuple[str, ...] = ()                 # glob patterns of files to hand back (relative to /work)

    @property
    def size(self) -> int:
        def n(text: str) -> int:  # bytes on the wire and in the sandbox, not characters
            return len(text.encode("utf-8", "surrogatepass"))
        return (len(self.code) + len(self.stdin) + sum(n(a) for a in self.args)
                + sum(n(k) + n(v) for k, v in self.env) + sum(n(p) + len(d) for p, d in self.files))


def authorize(principal, runner: str, identity: Identity) -> Policy:
    """The first policy that matches the principal and allows the runner. Default deny: no match, no run."""
    tags = principal.tags | {principal.id}
    matching = [p for p in identity.policies if p.matches(tags)]
    if not matching:
        raise NotAllowed(f"principal {principal.id!r} ({principal.method}) is not allowed to run anything: "
                         f"no policy names it")
    for p in matching:
        if p.allows_runner(runner):
            return p
    raise NotAllowed(f"principal {principal.id!r} may not use runner {runner!r} "
                     f"(policies {', '.join(p.name for p in matching)} do not list it)")


def resolve_limits(requested: dict, runner: Runner, ceiling: Limits | None = None) -> Limits:
    ceiling = ceiling or runner.max_limits
    # Limits a request cannot set: the runner's default, held under the policy's ceiling.
    resolved = {f.name: min(getattr(runner.default_limits, f.name), getattr(ceiling, f.name))
                for f in dataclasses.fields(Limits) if f.name not in REQUEST_LIMITS}
    for name in REQUEST_LIMITS:
        value = requested.get(name) or 0
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"limits.{name}: expected a finite number, got {value}")
        if value < 0:
            raise InvalidRequest(f"limits.{name}: expected a positive value or 0 for the default, got {value}")
        maximum = min(getattr(runner.max_limits, name), getattr(ceiling, name))
        if value == 0:
            resolved[name] = min(getattr(runner.default_limits, name), maximum)
        elif value > maximum:
            raise InvalidRequest(f"limits.{name}: {value} is above the maximum {maximum} for runner "
                                 f"{runner.name!r} and this caller's policy")
        else:
            resolved[name] = value
    if resolved["memory"] < (4 << 20):
        raise InvalidRequest(f"limits.memory: {resolved['memory']} bytes is too small to start anything "
                             f"(minimum 4MiB)")
    if resolved["wall_time"] < 0.001:
        raise InvalidRequest("limits.wall_time: expected at least 1ms")
    return Limits(**resolved)


def _check_path(path: str) -> str:
    parts = path.split("/")
    if (not path or path.startswith("/") or len(parts) > MAX_PATH_DEPTH or "\0" in path
            or any(p in ("", ".", "..") or len(p.encode()) > 255 for p in parts)):
        raise InvalidRequest(f"files: {path!r}: expected a relative path without '.', '..' or empty parts "
                             f"(at most {MAX_PATH_DEPTH} levels)")
    return path


def plan_run(req: RunRequest, runners: dict[str, Runner], images: dict[str, ImageSpec],
             seccomp: dict[str, SeccompProgram], run_id: str, max_request_bytes: int,
             stop_on_output_limit: bool = True, ceiling: Limits | None = None,
             collect_max: int = 16 << 20, landlock_min_abi: int = 1,
             egress: Egress | None = None) -> tuple[RunSpec, tuple[str, ...]]:
    """Return the RunSpec (uid/gid still 0: the supervisor allocates them) and the env names dropped by the
    runner's allowlist (recorded, not an error: the allowlist is a filter)."""
    if not RUNNER_RE.match(req.runner):
        raise InvalidRequest(f"runner: {req.runner!r} is not a valid runner name ([a-z0-9_.-], at most 64)")
    runner = runners.get(req.runner)
    if runner is None:
        raise NotFound(f"runner: no runner named {req.runner!r} (available: {', '.join(sorted(runners))})")
    if not runner.available:
        raise Unavailable(f"runner {runner.name!r} cannot run here: {runner.unavailable_reason}")
    if req.size > max_request_bytes:
        raise TooLarge(f"request: {req.size} bytes of code, stdin, args, env and files is above the maximum "
                       f"of {max_request_bytes} bytes")
    if len(req.args) > MAX_ARGS or any("\0" in a for a in req.args):
        raise InvalidRequest(f"args: expected at most {MAX_ARGS} arguments without NUL bytes")
    env = dict(runner.env)
    dropped = []
    for name, value in req.env:
        if not ENV_NAME_RE.match(name):
            raise InvalidRequest(f"env: {name!r} is not a valid variable name")
        if "\0" in value:
            raise InvalidRequest(f"env: {name}: value contains a NUL byte")
        if runner.allows_env(name):
            env[name] = value
        else:
            dropped.append(name)
    if len(req.files) > MAX_FILES:
        raise InvalidRequest(f"files: {len(req.files)} files is above the maximum of {MAX_FILES}")
    files = [File(runner.script, req.code, 0o644)]
    seen = {runner.script}
    for path, data in req.files:
        _check_path(path)
        if path in seen or any(path.startswith(s + "/") or s.startswith(path + "/") for s in seen):
            raise InvalidRequest(f"files: {path!r} collides with the script or another file")
        seen.add(path)
        files.append(File(path, data, 0o644))
    limits = resolve_limits(req.limits, runner, ceiling)
    if egress is not None:
        env.update(proxy_env(egress))
    workdir = "/work"
    argv = tuple(f"{workdir}/{runner.script}" if part == "{script}" else part for part in runner.command)
    if len(req.collect) > 64:
        raise InvalidRequest(f"collect_files: {len(req.collect)} patterns is above the maximum of 64")
    for pattern in req.collect:
        if (not pattern or pattern.startswith("/") or "\0" in pattern or len(pattern) > 1024
                or ".." in pattern.split("/")):
            raise InvalidRequest(f"collect_files: {pattern!r}: expected a glob relative to the working directory, "
                                 f"without '..'")
    spec = RunSpec(
        run_id=run_id, argv=argv + tuple(req.args), env=tuple(sorted(env.items())), image=images[runner.image],
        seccomp=seccomp[runner.seccomp], limits=limits, files=tuple(files), workdir=workdir,
        stop_on_output_limit=stop_on_output_limit, collect=tuple(req.collect), collect_max=collect_max,
        landlock_min_abi=landlock_min_abi, network="egress" if egress else "none", egress=egress)
    return spec, tuple(dropped)


def plan_pooled_session(runner: Runner, images: dict[str, ImageSpec], seccomp: dict[str, SeccompProgram],
                        pool_id: str, support: tuple[File, ...], landlock_min_abi: int = 1) -> RunSpec:
    """The RunSpec a pooled session sandbox of `runner` is built from: plan_session's for a session without egress,
    with the runner's default limits and no files. A session whose plan has the same sandbox_key claims it and
    brings its own spec (limits, files, lifetime) at the claim."""
    return RunSpec(run_id=pool_id, argv=(), env=tuple(sorted(dict(runner.env).items())),
                   image=images[runner.image], seccomp=seccomp[runner.seccomp], limits=resolve_limits({}, runner),
                   workdir="/work", session=True, support_files=support, landlock_min_abi=landlock_min_abi,
                   pooled=True)


def proxy_env(egress: Egress) -> dict[str, str]:
    """The variables that send HTTP clients to the run's proxy listener, both spellings (curl reads only the
    lower-case http_proxy; Python reads either). They override the caller's: no other proxy is reachable."""
    url = f"http://127.0.0.1:{egress.port}"
    env = {}
    for name, value in (("http_proxy", url), ("https_proxy", url), ("no_proxy", "localhost,127.0.0.1,::1")):
        env[name] = env[name.upper()] = value
    return env


def plan_session(runner_name: str, runners: dict[str, Runner], images: dict[str, ImageSpec],
                 seccomp: dict[str, SeccompProgram], session_id: str, requested: dict, policy: Policy,
                 lifetime: float, files: tuple[tuple[str, bytes], ...], support: tuple[File, ...],
                 max_request_bytes: int, landlock_min_abi: int = 1) -> RunSpec:
    """The RunSpec of a session's sandbox: the runner's image, profile and limits (the request may set them
    within the policy's ceiling), no program of its own; init serves calls until `lifetime` passes. The
    policy's egress comes along as for a run (every call's env gets proxy_env, see SessionManager.call_env)."""
    if not RUNNER_RE.match(runner_name):
        raise InvalidRequest(f"runner: {runner_name!r} is not a valid runner name ([a-z0-9_.-], at most 64)")
    runner = runners.get(runner_name)
    if runner is None:
        raise NotFound(f"runner: no runner named {runner_name!r} (available: {', '.join(sorted(runners))})")
    if not runner.available:
        raise Unavailable(f"runner {runner.name!r} cannot run here: {runner.unavailable_reason}")
    limits = resolve_limits(requested, runner, policy.limits)
    if len(files) > MAX_FILES:
        raise InvalidRequest(f"files: {len(files)} files is above the maximum of {MAX_FILES}")
    if sum(len(p) + len(d) for p, d in files) > max_request_bytes:
        raise TooLarge(f"files: more than {max_request_bytes} bytes in all")
    out, seen = [], set()
    for path, data in files:
        _check_path(path)
        if any(path == s or path.startswith(s + "/") or s.startswith(path + "/") for s in seen):
            raise InvalidRequest(f"files: {path!r} collides with another file")
        seen.add(path)
        out.append(File(path, data, 0o644))
    egress = policy.egress
    env = dict(runner.env) | (proxy_env(egress) if egress else {})
    return RunSpec(run_id=session_id, argv=(), env=tuple(sorted(env.items())),
                   image=images[runner.image], seccomp=seccomp[runner.seccomp], limits=limits, files=tuple(out),
                   workdir="/work", session=True, lifetime=lifetime, support_files=support,
                   landlock_min_abi=landlock_min_abi, network="egress" if egress else "none", egress=egress)


def plan_pooled(runner: Runner, images: dict[str, ImageSpec], seccomp: dict[str, SeccompProgram], pool_id: str,
                landlock_min_abi: int = 1) -> RunSpec:
    """The RunSpec a pooled sandbox of `runner` is built from: what a run of that runner with no limits of its
    own and no egress gets (the runner's default limits), no program and no files yet. A run whose plan has the
    same sandbox_key can claim it (uid/gid still 0: the pool allocates them).

    A runner with `prestart` also gets its interpreter started: the template then carries the argv and env a
    request without args or env of its own is planned with (plan()), which is what such a run must match."""
    workdir = "/work"
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    limits = resolve_limits({}, runner)
    if runner.prestart:
        argv = tuple(f"{workdir}/{runner.script}" if part == "{script}" else part for part in runner.command)
        env = tuple(sorted(dict(runner.env).items()))
        # The interpreter's rlimits can only be lowered at the claim (rlimits.changes): it starts with the
        # highest a request may ask for; the cgroup's limits are set again at the claim anyway.
        limits = dataclasses.replace(limits, cpu_time=runner.max_limits.cpu_time, pids=runner.max_limits.pids)
    return RunSpec(run_id=pool_id, argv=argv, env=env, image=images[runner.image], seccomp=seccomp[runner.seccomp],
                   limits=limits, workdir=workdir, landlock_min_abi=landlock_min_abi,
                   pooled=True, prestart=runner.script if runner.prestart else "")
