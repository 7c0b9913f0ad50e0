"""Configuration: TOML files into frozen dataclasses, validated, with defaults that are safe on their own.

Runs in the daemon only (the launcher never reads configuration: everything it needs is in the RunSpec).
Every error names the file, the key and what was expected; unknown keys are errors, so a typo never silently
turns a limit off. `load()` with no file gives the built-in default: a unix socket only, the runners in
runners/, the images in images/.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .sandbox.spec import Limits
from .units import parse_duration, parse_size

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

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
    for p in paths:
        if p.is_dir():
            return str(p)
    return str(paths[0])


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("unix:///run/sandboxd/sandboxd.sock",)
    socket_mode: int = 0o660
    state_dir: str = "/var/lib/sandboxd"
    runtime_dir: str = "/run/sandboxd"
    max_request_bytes: int = 16 << 20
    metrics_listen: str = "127.0.0.1:9464"
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class SandboxConfig:
    uid_start: int = 200000             # runs get uids uid_start .. uid_start+uid_count-1, one per live run
    uid_count: int = 1024
    cgroup_parent_name: str = "sandboxd"
    cgroup_parent_path: str = ""        # a delegated cgroup to use instead of "<own cgroup>/<parent name>"
    runners_dir: str = field(default_factory=lambda: _first_existing(SOURCE_ROOT / "runners",
                                                                       pathlib.Path("/usr/share/sandboxd/runners")))
    images_dir: str = field(default_factory=lambda: _first_existing(SOURCE_ROOT / "images",
                                                                      pathlib.Path("/usr/share/sandboxd/images")))
    seccomp_dir: str = str(PACKAGE_DIR / "seccomp")
    stop_on_output_limit: bool = True


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent: int = 0             # 0: derived from CPU count and memory at start-up
    max_queue: int = 64
    max_queue_wait: float = 30.0


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
        shutdown_grace=s.get("shutdown_grace", "duration", d.shutdown_grace))
    s.done()
    if not server.listen:
        raise ConfigError(f"{path}: server.listen: expected at least one address")
    for addr in server.listen:
        validate_listen(addr, f"{path}: server.listen")
    b = _Reader(path, top.table_of("sandbox"), "sandbox.")
    d2 = SandboxConfig()
    sandbox = SandboxConfig(
        uid_start=b.get("uid_start", "int", d2.uid_start), uid_count=b.get("uid_count", "int", d2.uid_count),
        cgroup_parent_name=b.get("cgroup_parent_name", "str", d2.cgroup_parent_name),
        cgroup_parent_path=b.get("cgroup_parent_path", "str", d2.cgroup_parent_path),
        runners_dir=_rel(path, b.get("runners_dir", "str", d2.runners_dir)),
        images_dir=_rel(path, b.get("images_dir", "str", d2.images_dir)),
        seccomp_dir=_rel(path, b.get("seccomp_dir", "str", d2.seccomp_dir)),
        stop_on_output_limit=b.get("stop_on_output_limit", "bool", d2.stop_on_output_limit))
    b.done()
    if sandbox.uid_start < 1000 or sandbox.uid_start + sandbox.uid_count > 2**32 - 2 or sandbox.uid_count < 1:
        raise ConfigError(f"{path}: sandbox.uid_start: expected a range of unprivileged uids (start >= 1000, "
                          f"count >= 1), got {sandbox.uid_start}+{sandbox.uid_count}")
    if not NAME_RE.match(sandbox.cgroup_parent_name):
        raise ConfigError(f"{path}: sandbox.cgroup_parent_name: expected a simple name, got {sandbox.cgroup_parent_name!r}")
    a = _Reader(path, top.table_of("admission"), "admission.")
    d3 = AdmissionConfig()
    admission = AdmissionConfig(max_concurrent=a.get("max_concurrent", "int", d3.max_concurrent),
                                max_queue=a.get("max_queue", "int", d3.max_queue),
                                max_queue_wait=a.get("max_queue_wait", "duration", d3.max_queue_wait))
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
    top.done()
    return Config(server=server, sandbox=sandbox, admission=admission, logging=logging_cfg,
                  default_limits=default_limits, max_limits=max_limits, source=path)


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
        text = pathlib.Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, path)
