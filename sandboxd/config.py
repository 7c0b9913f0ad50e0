"""Configuration: TOML files into frozen dataclasses, validated, with defaults that are safe on their own.

Runs in the daemon only (the launcher never reads configuration: everything it needs is in the RunSpec).
Every error names the file, the key and what was expected; unknown keys are errors, so a typo never silently
turns a limit off. `load()` with no file gives the built-in default: a unix socket only, the runners in
runners/, the images in images/ (of the source tree, else /usr/share/sandboxd/, else the package's data/).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import pathlib
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .sandbox.spec import Egress, Limits
from .units import parse_duration, parse_size

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")

# Which limits a request may lower, and how each is written in files.
DURATIONS = ("wall_time", "cpu_time")
SIZES = ("memory", "output", "file_size", "stack", "tmp_size", "work_size")
COUNTS = ("pids", "open_files", "tmp_inodes", "work_inodes")
FLOATS = ("cpus",)

# The built-in ceiling: what no runner may exceed unless the config raises it.
DEFAULT_MAX = Limits(wall_time=300.0, cpu_time=300.0, memory=4 << 30, pids=1024, cpus=2.0, output=16 << 20,
                     file_size=1 << 30, open_files=4096, stack=64 << 20, tmp_size=1 << 30, tmp_inodes=1 << 20,
                     work_size=1 << 30, work_inodes=1 << 20)


def _first_existing(*paths: pathlib.Path) -> str:
    """The source tree (editable install), then a system-wide copy, then the copy inside the package (a wheel)."""
    for p in paths:
        if p.is_dir():
            return str(p)
    return str(paths[0])


@dataclass(frozen=True)
class PrincipalEntry:
    """Names a caller and gives it groups and roles. Matched by unix uid, user or group, or certificate id."""

    name: str
    unix_uids: tuple[int, ...] = ()
    unix_users: tuple[str, ...] = ()
    unix_groups: tuple[str, ...] = ()
    cert_ids: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    suspended: bool = False              # refused (PERMISSION_DENIED) and its runs stopped; applied on reload


@dataclass(frozen=True)
class TokenEntry:
    principal: str
    sha256: str                          # of the token; the token itself is never stored
    expires: dt.datetime | None = None


@dataclass(frozen=True)
class Policy:
    """Who may use which runners, with which ceilings. The first policy matching a principal applies."""

    name: str
    principals: tuple[str, ...]          # principal ids, "group:G", "unix-uid:N", "unix-gid:N", "unix-user:U",
                                         # "unix-group:G", "token:NAME", "*"
    runners: tuple[str, ...] = ("*",)
    network: str = "none"                # "none": lo only; "egress": through the recording proxy, see `egress`
    egress: Egress | None = None         # set exactly when network == "egress"
    max_concurrent: int = 0              # per principal; 0: only the daemon-wide limit
    runs_per_minute: int = 0             # per principal; 0: unlimited
    store_code: bool = True
    store_output: bool = False
    limits: Limits | None = None         # ceilings on every limit (requests and runner defaults alike); None: the runner's maximum
    sessions: bool = True                # may create sessions (on the runners above)
    max_sessions: int = 0                # live sessions per principal; 0: only the daemon-wide limit
    session_idle_timeout: float = 0.0    # ceiling; 0: [sessions] idle_timeout_max
    session_max_lifetime: float = 0.0    # ceiling; 0: [sessions] max_lifetime_max

    def matches(self, tags) -> bool:
        return "*" in self.principals or any(p in tags for p in self.principals)

    def allows_runner(self, runner: str) -> bool:
        return "*" in self.runners or runner in self.runners


@dataclass(frozen=True)
class Identity:
    principals: tuple[PrincipalEntry, ...] = ()
    tokens: tuple[TokenEntry, ...] = ()
    policies: tuple[Policy, ...] = ()

    def principal(self, name: str) -> PrincipalEntry | None:
        return next((p for p in self.principals if p.name == name), None)

    def match_unix(self, uid: int, user: str | None, groups: set[str]) -> PrincipalEntry | None:
        for p in self.principals:
            if uid in p.unix_uids or (user and user in p.unix_users) or groups & set(p.unix_groups):
                return p
        return None

    def match_cert(self, cert_id: str) -> PrincipalEntry | None:
        return next((p for p in self.principals if cert_id in p.cert_ids), None)

    def suspended(self) -> frozenset[str]:
        return frozenset(p.name for p in self.principals if p.suspended)


def default_identity() -> Identity:
    """Built in: root (admin) and the daemon's own group on the unix socket may run anything; nobody else."""
    return Identity(
        principals=(PrincipalEntry("root", unix_uids=(0,), roles=("admin",)),),
        policies=(Policy("local-root", principals=("unix-uid:0",)),
                  Policy("local-daemon-group", principals=(f"unix-gid:{os.getgid()}",))))


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""
    key: str = ""
    client_ca: str = ""                  # set: client certificates are verified (mTLS identities)
    require_client_cert: bool = False    # false: callers without a certificate may use tokens


@dataclass(frozen=True)
class StoreConfig:
    retention: float = 0.0               # seconds; 0 keeps every event forever
    prune_interval: float = 3600.0


@dataclass(frozen=True)
class AuditConfig:
    checkpoint_every: int = 1000         # sign the chain head after this many events ...
    checkpoint_interval: float = 300.0   # ... or this many seconds, whichever comes first (and at shutdown)
    key_path: str = ""                   # the Ed25519 signing key; "": <state_dir>/audit.key, created at first start
    anchor_dir: str = ""                 # where anchors.jsonl is appended; "": <state_dir>/anchors
    refusal_summary_interval: float = 60.0   # unauthenticated refusals are recorded as one summary event this often

    def key_file(self, state_dir: str) -> str:
        return self.key_path or os.path.join(state_dir, "audit.key")

    def anchor_directory(self, state_dir: str) -> str:
        return self.anchor_dir or os.path.join(state_dir, "anchors")


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("unix:///run/sandboxd/sandboxd.sock",)
    socket_mode: int = 0o660
    state_dir: str = "/var/lib/sandboxd"
    runtime_dir: str = "/run/sandboxd"
    max_request_bytes: int = 16 << 20
    metrics_listen: str = "127.0.0.1:9464"
    shutdown_grace: float = 10.0
    insecure_tcp: bool = False           # allow TCP without TLS (tokens are still required)


@dataclass(frozen=True)
class SandboxConfig:
    uid_start: int = 200000             # runs get uids uid_start .. uid_start+uid_count-1, one per live run
    uid_count: int = 1024
    cgroup_parent_name: str = "sandboxd"
    cgroup_parent_path: str = ""        # a delegated cgroup to use instead of "<own cgroup>/<parent name>"
    runners_dir: str = field(default_factory=lambda: _first_existing(SOURCE_ROOT / "runners",
                                                                       pathlib.Path("/usr/share/sandboxd/runners"),
                                                                       PACKAGE_DIR / "data" / "runners"))
    images_dir: str = field(default_factory=lambda: _first_existing(SOURCE_ROOT / "images",
                                                                      pathlib.Path("/usr/share/sandboxd/images"),
                                                                      PACKAGE_DIR / "data" / "images"))
    seccomp_dir: str = str(PACKAGE_DIR / "seccomp")
    stop_on_output_limit: bool = True
    require_landlock: bool = True       # fail closed (setup_failed) when the kernel lacks Landlock
    landlock_min_abi: int = 1           # with require_landlock: the lowest Landlock ABI a run may start with

    @property
    def landlock_required_abi(self) -> int:
        """What each RunSpec demands: 0 (anything, even no Landlock) when Landlock is not required."""
        return self.landlock_min_abi if self.require_landlock else 0


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent: int = 0             # 0: derived from CPU count and memory at start-up
    max_queue: int = 64
    max_queue_wait: float = 30.0
    max_queue_per_principal: int = 0    # 0: half of max_queue (at least 1)


@dataclass(frozen=True)
class SessionsConfig:
    max_live: int = 16                   # live sessions daemon-wide; their uids come from [sandbox]'s range
    memory_budget: int = 0               # bytes of session memory limits live at once; 0: half the host's memory
    idle_timeout: float = 600.0          # default: a session with no call in progress for this long is closed
    idle_timeout_max: float = 3600.0     # the most a request may ask for
    max_lifetime: float = 3600.0         # default lifetime
    max_lifetime_max: float = 86400.0
    transfer_limit: int = 64 << 20       # bytes of one file in or out (GetFiles, PutFiles); larger: too_large
    collect_limit: int = 16 << 20        # bytes of files a one-shot Execute may collect, in all
    cell_grace: float = 2.0              # after a cell's timeout interrupts it, seconds before the kernel is killed


@dataclass(frozen=True)
class PoolConfig:
    """The warm pool (sandboxd/pool.py): single-use sandboxes built ahead of time, per runner."""

    size: int = 0                        # ready sandboxes per runner not named in `runners`
    runners: tuple[tuple[str, int], ...] = (("python", 2),)   # per-runner sizes
    max_total: int = 8                   # ready or being built, all runners together
    refill_concurrency: int = 1          # sandboxes built at once
    # Session sandboxes built ahead of time, per runner (only the runners named): CreateSession claims one.
    sessions: tuple[tuple[str, int], ...] = (("python", 1),)

    def size_of(self, runner: str) -> int:
        return dict(self.runners).get(runner, self.size)

    def sessions_of(self, runner: str) -> int:
        return dict(self.sessions).get(runner, 0)


@dataclass(frozen=True)
class EgressConfig:
    """How the egress proxy resolves names: "system" (the host's resolver) or "static" (only `hosts`)."""

    resolver: str = "system"
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"                # text or json


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    default_limits: Limits = field(default_factory=Limits)
    max_limits: Limits = DEFAULT_MAX
    identity: Identity = field(default_factory=default_identity)
    tls: TlsConfig | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    egress: EgressConfig = field(default_factory=EgressConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    source: str = "<built-in default>"


class _Reader:
    """Pulls typed values out of one TOML table, naming file and key in every error."""

    def __init__(self, path: str, table: dict, prefix: str):
        self.path, self.table, self.prefix, self.seen = path, table, prefix, set()

    def fail(self, key: str, expected: str) -> ConfigError:
        value = self.table.get(key, "<missing>")
        return ConfigError(f"{self.path}: {self.prefix}{key}: expected {expected}, got {value!r}")

    def get(self, key: str, kind: str, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.table:
            return default
        v = self.table[key]
        try:
            if kind == "str" and isinstance(v, str):
                return v
            if kind == "bool" and isinstance(v, bool):
                return v
            if kind == "int" and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
            if kind == "float" and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                return float(v)
            if kind == "size":
                return parse_size(v)
            if kind == "duration":
                return parse_duration(v)
            if kind == "strs" and isinstance(v, list) and all(isinstance(x, str) for x in v):
                return tuple(v)
            if kind == "mode" and isinstance(v, str) and re.fullmatch(r"0?[0-7]{3,4}", v):
                return int(v, 8)
        except ValueError as e:
            raise ConfigError(f"{self.path}: {self.prefix}{key}: {e}") from None
        raise self.fail(key, {"str": "a string", "bool": "true or false", "int": "a non-negative integer",
                              "float": "a non-negative number", "strs": "a list of strings",
                              "mode": 'an octal mode string like "0660"', "size": "a size like 64MiB",
                              "duration": "a duration like 10s"}[kind])

    def table_of(self, key: str) -> dict:
        self.seen.add(key)
        v = self.table.get(key, {})
        if not isinstance(v, dict):
            raise self.fail(key, "a table")
        return v

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(f"{self.path}: {self.prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(self.seen))})")


def read_limits(path: str, table: dict, prefix: str, base: Limits, partial: bool = True) -> Limits:
    r = _Reader(path, table, prefix)
    values = {}
    for name in DURATIONS:
        values[name] = r.get(name, "duration", getattr(base, name))
    for name in SIZES:
        values[name] = r.get(name, "size", getattr(base, name))
    for name in COUNTS:
        values[name] = r.get(name, "int", getattr(base, name))
    for name in FLOATS:
        values[name] = r.get(name, "float", getattr(base, name))
    r.done()
    for name, v in values.items():
        if v <= 0 and name not in ("cpu_time",):
            raise ConfigError(f"{path}: {prefix}{name}: expected a positive value, got {v!r}")
    return Limits(**values)


def check_within(path: str, prefix: str, limits: Limits, ceiling: Limits) -> None:
    for f in dataclasses.fields(Limits):
        if getattr(limits, f.name) > getattr(ceiling, f.name):
            raise ConfigError(f"{path}: {prefix}{f.name}: {getattr(limits, f.name)!r} is above the maximum "
                              f"{getattr(ceiling, f.name)!r}")


def parse(text: str, path: str) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    top = _Reader(path, doc, "")
    s = _Reader(path, top.table_of("server"), "server.")
    d = ServerConfig()
    server = ServerConfig(
        listen=s.get("listen", "strs", d.listen), socket_mode=s.get("socket_mode", "mode", d.socket_mode),
        state_dir=s.get("state_dir", "str", d.state_dir), runtime_dir=s.get("runtime_dir", "str", d.runtime_dir),
        max_request_bytes=s.get("max_request_bytes", "size", d.max_request_bytes),
        metrics_listen=s.get("metrics_listen", "str", d.metrics_listen),
        shutdown_grace=s.get("shutdown_grace", "duration", d.shutdown_grace),
        insecure_tcp=s.get("insecure_tcp", "bool", d.insecure_tcp))
    tls = _tls(path, s.table_of("tls")) if "tls" in s.table else None
    s.done()
    if not server.listen:
        raise ConfigError(f"{path}: server.listen: expected at least one address")
    for addr in server.listen:
        validate_listen(addr, f"{path}: server.listen")
        if not addr.startswith("unix://") and tls is None and not server.insecure_tcp:
            raise ConfigError(f"{path}: server.listen: {addr!r}: a TCP listener needs [server.tls] (or "
                              f"server.insecure_tcp = true, and then every caller must send a token)")
    b = _Reader(path, top.table_of("sandbox"), "sandbox.")
    d2 = SandboxConfig()
    sandbox = SandboxConfig(
        uid_start=b.get("uid_start", "int", d2.uid_start), uid_count=b.get("uid_count", "int", d2.uid_count),
        cgroup_parent_name=b.get("cgroup_parent_name", "str", d2.cgroup_parent_name),
        cgroup_parent_path=b.get("cgroup_parent_path", "str", d2.cgroup_parent_path),
        runners_dir=_rel(path, b.get("runners_dir", "str", d2.runners_dir)),
        images_dir=_rel(path, b.get("images_dir", "str", d2.images_dir)),
        seccomp_dir=_rel(path, b.get("seccomp_dir", "str", d2.seccomp_dir)),
        stop_on_output_limit=b.get("stop_on_output_limit", "bool", d2.stop_on_output_limit),
        require_landlock=b.get("require_landlock", "bool", d2.require_landlock),
        landlock_min_abi=b.get("landlock_min_abi", "int", d2.landlock_min_abi))
    b.done()
    if sandbox.landlock_min_abi < 1:
        raise ConfigError(f"{path}: sandbox.landlock_min_abi: expected an ABI version of 1 or more, got "
                          f"{sandbox.landlock_min_abi} (to run without Landlock, set require_landlock = false)")
    if sandbox.uid_start < 1000 or sandbox.uid_start + sandbox.uid_count > 2**32 - 2 or sandbox.uid_count < 1:
        raise ConfigError(f"{path}: sandbox.uid_start: expected a range of unprivileged uids (start >= 1000, "
                          f"count >= 1), got {sandbox.uid_start}+{sandbox.uid_count}")
    if not NAME_RE.match(sandbox.cgroup_parent_name):
        raise ConfigError(f"{path}: sandbox.cgroup_parent_name: expected a simple name, got {sandbox.cgroup_parent_name!r}")
    a = _Reader(path, top.table_of("admission"), "admission.")
    d3 = AdmissionConfig()
    admission = AdmissionConfig(max_concurrent=a.get("max_concurrent", "int", d3.max_concurrent),
                                max_queue=a.get("max_queue", "int", d3.max_queue),
                                max_queue_wait=a.get("max_queue_wait", "duration", d3.max_queue_wait),
                                max_queue_per_principal=a.get("max_queue_per_principal", "int",
                                                              d3.max_queue_per_principal))
    a.done()
    lg = _Reader(path, top.table_of("logging"), "logging.")
    logging_cfg = LoggingConfig(level=lg.get("level", "str", "INFO").upper(), format=lg.get("format", "str", "text"))
    lg.done()
    if logging_cfg.level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{path}: logging.level: expected DEBUG, INFO, WARNING or ERROR, got {logging_cfg.level!r}")
    if logging_cfg.format not in ("text", "json"):
        raise ConfigError(f"{path}: logging.format: expected text or json, got {logging_cfg.format!r}")
    lim = _Reader(path, top.table_of("limits"), "limits.")
    max_limits = read_limits(path, lim.table_of("max"), "limits.max.", DEFAULT_MAX)
    default_limits = read_limits(path, lim.table_of("default"), "limits.default.", Limits())
    lim.done()
    given = lim.table.get("default", {})
    # A default the file does not set follows a lowered maximum down instead of tripping over it.
    default_limits = dataclasses.replace(default_limits, **{
        f.name: min(getattr(default_limits, f.name), getattr(max_limits, f.name))
        for f in dataclasses.fields(Limits) if f.name not in given})
    check_within(path, "limits.default.", default_limits, max_limits)
    identity = _identity(path, top, max_limits)
    st = _Reader(path, top.table_of("store"), "store.")
    store = StoreConfig(retention=st.get("retention", "duration", 0.0),
                        prune_interval=st.get("prune_interval", "duration", 3600.0))
    st.done()
    sessions = _sessions(path, top.table_of("sessions"))
    audit = _audit(path, _Reader(path, top.table_of("audit"), "audit."))
    egress = _egress_config(path, top.table_of("egress"))
    pool = _pool(path, top.table_of("pool"))
    top.done()
    return Config(server=server, sandbox=sandbox, admission=admission, logging=logging_cfg,
                  default_limits=default_limits, max_limits=max_limits, identity=identity, tls=tls, store=store,
                  sessions=sessions, audit=audit, egress=egress, pool=pool, source=path)


def _sessions(path: str, table: dict) -> SessionsConfig:
    r = _Reader(path, table, "sessions.")
    d = SessionsConfig()
    cfg = SessionsConfig(
        max_live=r.get("max_live", "int", d.max_live), memory_budget=r.get("memory_budget", "size", d.memory_budget),
        idle_timeout=r.get("idle_timeout", "duration", d.idle_timeout),
        idle_timeout_max=r.get("idle_timeout_max", "duration", d.idle_timeout_max),
        max_lifetime=r.get("max_lifetime", "duration", d.max_lifetime),
        max_lifetime_max=r.get("max_lifetime_max", "duration", d.max_lifetime_max),
        transfer_limit=r.get("transfer_limit", "size", d.transfer_limit),
        collect_limit=r.get("collect_limit", "size", d.collect_limit),
        cell_grace=r.get("cell_grace", "duration", d.cell_grace))
    r.done()
    if cfg.max_live < 0:
        raise ConfigError(f"{path}: sessions.max_live: expected 0 (no sessions) or more, got {cfg.max_live}")
    for key, dflt, ceiling in (("idle_timeout", cfg.idle_timeout, cfg.idle_timeout_max),
                               ("max_lifetime", cfg.max_lifetime, cfg.max_lifetime_max)):
        if dflt <= 0 or ceiling <= 0 or dflt > ceiling:
            raise ConfigError(f"{path}: sessions.{key}: expected a positive duration at most sessions.{key}_max "
                              f"({ceiling:g}s), got {dflt:g}s")
    if cfg.transfer_limit < (1 << 20):
        raise ConfigError(f"{path}: sessions.transfer_limit: expected at least 1MiB")
    return cfg


def _pool(path: str, table: dict) -> PoolConfig:
    r = _Reader(path, table, "pool.")
    d = PoolConfig()
    sizes = {}
    for key in ("runners", "sessions"):
        given = r.table_of(key)
        sizes[key] = []
        for name, size in (given.items() if key in table else getattr(d, key)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ConfigError(f"{path}: pool.{key}.{name}: expected a non-negative integer, got {size!r}")
            sizes[key].append((name, size))
    cfg = PoolConfig(size=r.get("size", "int", d.size), runners=tuple(sizes["runners"]),
                     sessions=tuple(sizes["sessions"]),
                     max_total=r.get("max_total", "int", d.max_total),
                     refill_concurrency=r.get("refill_concurrency", "int", d.refill_concurrency))
    r.done()
    if cfg.refill_concurrency < 1:
        raise ConfigError(f"{path}: pool.refill_concurrency: expected at least 1, got {cfg.refill_concurrency}")
    return cfg


def _audit(path: str, r: _Reader) -> AuditConfig:
    d = AuditConfig()
    key_path, anchor_dir = r.get("key_path", "str", ""), r.get("anchor_dir", "str", "")
    audit = AuditConfig(checkpoint_every=r.get("checkpoint_every", "int", d.checkpoint_every),
                        checkpoint_interval=r.get("checkpoint_interval", "duration", d.checkpoint_interval),
                        key_path=_rel(path, key_path) if key_path else "",
                        anchor_dir=_rel(path, anchor_dir) if anchor_dir else "",
                        refusal_summary_interval=r.get("refusal_summary_interval", "duration",
                                                       d.refusal_summary_interval))
    r.done()
    for key in ("checkpoint_every", "checkpoint_interval", "refusal_summary_interval"):
        if getattr(audit, key) <= 0:
            raise ConfigError(f"{path}: audit.{key}: expected a positive value, got {r.table[key]!r}")
    return audit


def _egress_config(path: str, table: dict) -> EgressConfig:
    from .egress import rules
    r = _Reader(path, table, "egress.")
    resolver = r.get("resolver", "str", "system")
    hosts = r.table_of("hosts")
    r.done()
    if resolver not in ("system", "static"):
        raise ConfigError(f"{path}: egress.resolver: expected \"system\" or \"static\", got {resolver!r}")
    pinned = []
    for name, addrs in hosts.items():
        if isinstance(addrs, str):
            addrs = [addrs]
        if (not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) and rules.is_address(a)
                                                                for a in addrs)):
            raise ConfigError(f"{path}: egress.hosts.{name}: expected an IP address or a list of them, got {addrs!r}")
        pinned.append((rules.normalize_host(name), tuple(addrs)))
    return EgressConfig(resolver, tuple(pinned))


def _egress_policy(path: str, prefix: str, r: "_Reader", name: str) -> tuple[str, Egress | None]:
    """network = "none" | "egress" and the egress keys of one policy; the egress keys without egress are an error,
    so a policy never looks more open (or more closed) than it is."""
    from .egress import rules
    network = r.get("network", "str", "none")
    keys = ("egress_allow", "egress_allow_networks", "egress_max_connections", "egress_max_bytes_in",
            "egress_max_bytes_out", "egress_max_connection_time", "egress_transparent")
    if network not in ("none", "egress"):
        raise ConfigError(f"{path}: {prefix}network: expected \"none\" or \"egress\", got {network!r}")
    given = [k for k in keys if k in r.table]
    if network == "none":
        if given:
            raise ConfigError(f"{path}: {prefix}{given[0]}: only meaningful with network = \"egress\"")
        return network, None
    d = Egress(policy=name)
    allow = r.get("egress_allow", "strs", ())
    networks = r.get("egress_allow_networks", "strs", ())
    for key, items, check in (("egress_allow", allow, rules.parse_rule),
                              ("egress_allow_networks", networks, rules.parse_network)):
        for item in items:
            try:
                check(item)
            except ValueError as e:
                raise ConfigError(f"{path}: {prefix}{key}: {e}") from None
    egress = Egress(policy=name, allow=allow, networks=networks,
                    max_connections=r.get("egress_max_connections", "int", d.max_connections),
                    max_bytes_in=r.get("egress_max_bytes_in", "size", d.max_bytes_in),
                    max_bytes_out=r.get("egress_max_bytes_out", "size", d.max_bytes_out),
                    max_connection_time=r.get("egress_max_connection_time", "duration", d.max_connection_time),
                    transparent=r.get("egress_transparent", "bool", d.transparent))
    if egress.max_connections < 1 or egress.max_connection_time <= 0:
        raise ConfigError(f"{path}: {prefix}egress_max_connections: expected at least 1 connection and a positive "
                          f"egress_max_connection_time")
    return network, egress


def _tls(path: str, table: dict) -> TlsConfig:
    r = _Reader(path, table, "server.tls.")
    tls = TlsConfig(cert=_rel(path, r.get("cert", "str", "")), key=_rel(path, r.get("key", "str", "")),
                    client_ca=_rel(path, r.get("client_ca", "str", "")) if r.table.get("client_ca") else "",
                    require_client_cert=r.get("require_client_cert", "bool", False))
    r.done()
    if not tls.cert or not tls.key:
        raise ConfigError(f"{path}: server.tls: expected cert and key (PEM files)")
    if tls.require_client_cert and not tls.client_ca:
        raise ConfigError(f"{path}: server.tls.require_client_cert: needs client_ca to verify certificates")
    if tls.client_ca and not tls.require_client_cert:
        # grpcio's Python API can only require a client certificate or not ask for one at all; a CA that is
        # never consulted would look like mTLS while authenticating nobody.
        raise ConfigError(f"{path}: server.tls.require_client_cert: expected true when client_ca is set (grpcio "
                          f"cannot ask for an optional client certificate); remove client_ca for TLS with tokens")
    return tls


def _list_of_tables(path: str, top: _Reader, key: str) -> list[dict]:
    top.seen.add(key)
    v = top.table.get(key, [])
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise ConfigError(f"{path}: {key}: expected an array of tables ([[{key}]])")
    return v


def _identity(path: str, top: _Reader, max_limits: Limits) -> Identity:
    principals, tokens, policies = [], [], []
    for i, t in enumerate(_list_of_tables(path, top, "principals")):
        r = _Reader(path, t, f"principals[{i}].")
        name = r.get("name", "str", "")
        if not name:
            raise ConfigError(f"{path}: principals[{i}].name: expected a non-empty name")
        uids = r.table.get("unix_uids", [])
        r.seen.add("unix_uids")
        if not isinstance(uids, list) or not all(isinstance(u, int) and u >= 0 for u in uids):
            raise ConfigError(f"{path}: principals[{i}].unix_uids: expected a list of uids")
        principals.append(PrincipalEntry(
            name=name, unix_uids=tuple(uids), unix_users=r.get("unix_users", "strs", ()),
            unix_groups=r.get("unix_groups", "strs", ()), cert_ids=r.get("cert_ids", "strs", ()),
            groups=r.get("groups", "strs", ()), roles=r.get("roles", "strs", ()),
            suspended=r.get("suspended", "bool", False)))
        r.done()
    for i, t in enumerate(_list_of_tables(path, top, "tokens")):
        r = _Reader(path, t, f"tokens[{i}].")
        principal = r.get("principal", "str", "")
        digest = r.get("sha256", "str", "").lower()
        expires = r.get("expires", "str", "")
        r.done()
        if not principal:
            raise ConfigError(f"{path}: tokens[{i}].principal: expected the principal this token authenticates")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{path}: tokens[{i}].sha256: expected 64 hex digits (sandboxd token new prints it)")
        when = None
        if expires:
            try:
                when = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(f"{path}: tokens[{i}].expires: expected an RFC 3339 time, got {expires!r}") from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
        tokens.append(TokenEntry(principal, digest, when))
    for i, t in enumerate(_list_of_tables(path, top, "policies")):
        r = _Reader(path, t, f"policies[{i}].")
        name = r.get("name", "str", f"policy-{i}")
        ceiling = None
        if "limits" in r.table:
            ceiling = read_limits(path, r.table_of("limits"), f"policies[{i}].limits.", max_limits)
            check_within(path, f"policies[{i}].limits.", ceiling, max_limits)
        network, egress = _egress_policy(path, f"policies[{i}].", r, name)
        policy = Policy(
            name=name, principals=r.get("principals", "strs", ()), runners=r.get("runners", "strs", ("*",)),
            network=network, egress=egress, max_concurrent=r.get("max_concurrent", "int", 0),
            runs_per_minute=r.get("runs_per_minute", "int", 0), store_code=r.get("store_code", "bool", True),
            store_output=r.get("store_output", "bool", False), limits=ceiling,
            sessions=r.get("sessions", "bool", True), max_sessions=r.get("max_sessions", "int", 0),
            session_idle_timeout=r.get("session_idle_timeout", "duration", 0.0),
            session_max_lifetime=r.get("session_max_lifetime", "duration", 0.0))
        r.done()
        if not policy.principals:
            raise ConfigError(f"{path}: policies[{i}].principals: expected at least one principal, group or \"*\"")
        for j, who in enumerate(policy.principals):
            if who.startswith("x509:"):  # no principal carries this tag: the policy would silently match no one
                raise ConfigError(f"{path}: policies[{i}].principals[{j}]: {who!r} matches no caller; name a "
                                  f"certificate by its principal id (its URI SAN, or \"x509-cn:<CN>\") or map it "
                                  f"to a name with [[principals]] cert_ids")
        policies.append(policy)
    if not principals and not tokens and not policies:
        return default_identity()  # a file that only tunes limits keeps the safe built-in access rules
    return Identity(tuple(principals), tuple(tokens), tuple(policies))


def _rel(config_path: str, value: str) -> str:
    """Relative directories in a file are relative to that file, so a config can ship next to its runners."""
    if os.path.isabs(value) or config_path.startswith("<"):
        return value
    return str((pathlib.Path(config_path).resolve().parent / value).resolve())


def validate_listen(addr: str, where: str) -> None:
    if addr.startswith("unix://"):
        if not addr[len("unix://"):].startswith("/"):
            raise ConfigError(f"{where}: {addr!r}: expected unix:///absolute/path.sock")
        return
    m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})", addr)
    if not m or int(m.group(2)) > 65535:
        raise ConfigError(f"{where}: {addr!r}: expected unix:///path.sock or host:port")


def load(path: str | None = None) -> Config:
    if path is None:
        return Config()
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: expected UTF-8 text (TOML), found an invalid byte at offset {e.start}") from None
    return parse(text, path)
