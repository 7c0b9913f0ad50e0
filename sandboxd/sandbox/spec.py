"""RunSpec: the single, immutable description of one run.

The daemon's planner builds it (every limit resolved), the launcher executes it, and the record stores it. If a
value matters to the sandbox, it is in here; the launcher never reads configuration. It crosses the daemon ->
launcher boundary as JSON (bytes as base64) inside a memfd, so its size is not bound by socket buffers.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Every limit of a run, fully resolved. Sizes in bytes, times in seconds."""

    wall_time: float = 10.0
    cpu_time: float = 10.0
    memory: int = 256 << 20          # memory + swap of the whole run (cgroup)
    pids: int = 64                   # processes and threads of the whole run (cgroup)
    cpus: float = 1.0                # CPU bandwidth, in CPUs (cgroup cpu quota)
    output: int = 1 << 20            # per stream; past it the stream is cut
    file_size: int = 64 << 20        # RLIMIT_FSIZE
    open_files: int = 256            # RLIMIT_NOFILE
    stack: int = 8 << 20             # RLIMIT_STACK
    tmp_size: int = 64 << 20         # /tmp tmpfs size
    tmp_inodes: int = 4096
    work_size: int = 64 << 20        # working directory tmpfs size
    work_inodes: int = 4096


@dataclass(frozen=True)
class ImageSpec:
    """A read-only root filesystem assembled from a trusted source tree.

    `source` is a host directory the daemon trusts ("/" for the host image, a debootstrap tree for others).
    `entries` are its top-level names exposed read-only at the same place (a symlink stays a symlink, a
    directory is bind-mounted). `etc` lists paths under source/etc exposed read-only; the rest of /etc is
    generated per run (passwd, group, hosts, nsswitch.conf, hostname) so the host's /etc never leaks in.
    """

    name: str
    source: str
    entries: tuple[str, ...] = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
    etc: tuple[str, ...] = ("ld.so.cache", "alternatives", "localtime", "ssl", "mime.types", "protocols",
                            "services")


@dataclass(frozen=True)
class SeccompProgram:
    """A seccomp profile compiled (once, daemon side) to classic BPF, ready to load in the child."""

    name: str
    sha256: str          # of the profile file, so the record names exactly what was loaded
    bpf: bytes           # struct sock_filter[] as the kernel expects it


@dataclass(frozen=True)
class File:
    path: str            # relative to the working directory, validated by the planner
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Egress:
    """What a run with network = "egress" may reach, and how much. Init listens on 127.0.0.1:port inside the
    run's network namespace and hands that socket to the daemon's proxy, which enforces the rest. With
    `transparent`, init also listens on transparent_port and redirects every other TCP connection of the run
    there (a route through lo and an nftables rule in the run's namespace; sandbox/egress.py)."""

    policy: str                          # named in refusals and records
    allow: tuple[str, ...] = ()          # "host:port", "*.suffix:port", "1.2.3.4:port", "[v6]:port"
    networks: tuple[str, ...] = ()       # non-public CIDRs the policy opens on purpose (else refused)
    port: int = 3128
    max_connections: int = 8             # at once
    max_bytes_in: int = 256 << 20        # per run, destination -> run
    max_bytes_out: int = 16 << 20        # per run, run -> destination
    max_connection_time: float = 60.0    # seconds per connection
    transparent: bool = True             # programs that ignore proxy settings: their TCP is redirected
    transparent_port: int = 3129


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    image: ImageSpec
    seccomp: SeccompProgram
    limits: Limits = field(default_factory=Limits)
    files: tuple[File, ...] = ()
    workdir: str = "/work"
    hostname: str = "sandbox"
    uid: int = 0                     # allocated per run by the daemon; 0 is refused by the launcher
    gid: int = 0
    user: str = "sandbox"
    network: str = "none"            # "none" (lo only) or "egress" (lo + a proxy listener, see Egress)
    egress: Egress | None = None
    stop_on_output_limit: bool = True
    # Sessions: init stays up as a command server (init.py) for `lifetime` seconds at most, instead of running
    # argv once. support_files are written read-only under /.sandboxd (the kernel script), before any payload.
    session: bool = False
    lifetime: float = 0.0
    support_files: tuple[File, ...] = ()
    # One-shot runs: files of /work matching these globs are collected after the payload exits (collect_max
    # bytes in all) and streamed to the daemon before the sandbox is torn down.
    collect: tuple[str, ...] = ()
    collect_max: int = 0
    landlock_min_abi: int = 1        # below it (0: no Landlock) the run fails closed; 0 accepts any kernel
    # The warm pool: a sandbox built ahead of time (everything up to the root filesystem) whose init waits for
    # the one run it will serve; that run's spec must have the same sandbox_key and uid (launcher and init check).
    pooled: bool = False
    # A pooled template: start the interpreter now, waiting on a FIFO at workdir/<prestart> for its script
    # (child._prestart). A claiming run: use that interpreter; its argv, env and stack limit must be the
    # template's (the launcher and init check), as an interpreter already started cannot take others.
    prestart: str = ""

    def to_json(self) -> bytes:
        return json.dumps(_encode(dataclasses.asdict(self))).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "RunSpec":
        d = _decode(json.loads(raw))
        return cls(
            run_id=d["run_id"],
            argv=tuple(d["argv"]),
            env=tuple((k, v) for k, v in d["env"]),
            image=ImageSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["image"].items()}),
            seccomp=SeccompProgram(**d["seccomp"]),
            limits=Limits(**d["limits"]),
            files=tuple(File(**f) for f in d["files"]),
            support_files=tuple(File(**f) for f in d.get("support_files", ())),
            collect=tuple(d.get("collect", ())),
            egress=Egress(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["egress"].items()})
            if d.get("egress") else None,
            **{k: d[k] for k in ("workdir", "hostname", "uid", "gid", "user", "network", "stop_on_output_limit",
                                 "session", "lifetime", "collect_max", "landlock_min_abi", "pooled", "prestart")
               if k in d},
        )

    def summary(self) -> dict:
        """What the record stores: everything but payload bytes and caller-supplied values (env values and
        arguments can carry secrets), which are hashed so a record can still prove what ran."""
        d = dataclasses.asdict(self)
        d["files"] = [{"path": f.path, "size": len(f.data), "sha256": _sha(f.data)} for f in self.files]
        d["support_files"] = [{"path": f.path, "size": len(f.data), "sha256": _sha(f.data)}
                              for f in self.support_files]
        d["seccomp"] = {"name": self.seccomp.name, "sha256": self.seccomp.sha256}
        d["env"] = {k: "sha256:" + _sha(v.encode()) for k, v in self.env}
        d["argv"] = [self.argv[0]] + ["sha256:" + _sha(a.encode()) for a in self.argv[1:]] if self.argv else []
        return d


def sandbox_key(spec: RunSpec) -> tuple:
    """What shapes a sandbox before its program exists: namespaces, root filesystem and mounts (with their sizes).
    A pooled sandbox serves a run only if both keys are equal; the cgroup's limits are set again for the run at
    its claim, and everything else (argv, env, files, rlimits, the seccomp program, Landlock) is applied to the
    claiming run as in a cold one."""
    lim = spec.limits
    return (spec.image, spec.hostname, spec.user, spec.workdir, spec.network, spec.egress, spec.session,
            spec.support_files, lim.tmp_size, lim.tmp_inodes, lim.work_size, lim.work_inodes)


# The largest script a prestarted interpreter takes: the FIFO's buffer (F_SETPIPE_SZ), so init's write never waits
# on the interpreter. A larger script takes the pooled sandbox without its interpreter.
PRESTART_MAX_SCRIPT = 1 << 20


def prestart_key(spec: RunSpec) -> tuple:
    """What a prestarted interpreter fixed when it was exec'd: its command line and environment, the seccomp
    program and Landlock floor it runs under, and the stack limit (read at execve only). A run uses the
    interpreter only if its key equals the template's; every other rlimit is set on it again at the claim."""
    return (spec.argv, spec.env, spec.seccomp, spec.landlock_min_abi, spec.limits.stack, spec.workdir)


def prestart_script(spec: RunSpec) -> bytes | None:
    """The data of the run's script (the file named by spec.prestart), or None if there is none."""
    return next((f.data for f in spec.files if f.path == spec.prestart), None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(o):
    if isinstance(o, bytes):
        return {"__b64__": base64.b64encode(o).decode()}
    if isinstance(o, dict):
        return {k: _encode(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_encode(v) for v in o]
    return o


def _decode(o):
    if isinstance(o, dict):
        if set(o) == {"__b64__"}:
            return base64.b64decode(o["__b64__"])
        return {k: _decode(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_decode(v) for v in o]
    return o
