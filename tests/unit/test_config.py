"""config.parse/load: defaults, every section, and errors that name the file, the key and what was expected."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import textwrap

import pytest

from sandboxd import config
from sandboxd.config import DEFAULT_MAX, Config, load, parse
from sandboxd.errors import ConfigError
from sandboxd.sandbox.spec import Limits

PATH = "/etc/sandboxd/sandboxd.toml"


def _parse(text: str, path: str = PATH) -> Config:
    return parse(textwrap.dedent(text), path)


def _error(text: str, path: str = PATH) -> str:
    with pytest.raises(ConfigError) as info:
        _parse(text, path)
    return str(info.value)


# --- defaults -----------------------------------------------------------------------------------------------------

def test_empty_file_gives_the_defaults_with_its_path_as_source():
    cfg = _parse("")
    builtin = Config()
    assert cfg.server == builtin.server
    assert cfg.sandbox == builtin.sandbox
    assert cfg.admission == builtin.admission
    assert cfg.logging == builtin.logging
    assert cfg.default_limits == Limits()
    assert cfg.max_limits == DEFAULT_MAX
    assert cfg.source == PATH


def test_builtin_defaults_are_safe_on_their_own():
    cfg = Config()
    assert cfg.server.listen == ("unix:///run/sandboxd/sandboxd.sock",)  # no TCP unless asked for
    assert cfg.server.socket_mode == 0o660
    assert cfg.sandbox.uid_start >= 1000
    assert cfg.source == "<built-in default>"
    for f in dataclasses.fields(Limits):
        assert getattr(cfg.default_limits, f.name) <= getattr(cfg.max_limits, f.name), f.name


def test_load_without_a_path_is_the_builtin_default():
    assert load(None) == Config()
    assert load() == Config()


# --- every section ------------------------------------------------------------------------------------------------

def test_every_section_is_read():
    cfg = _parse("""
        [server]
        listen = ["unix:///tmp/s.sock", "127.0.0.1:7000", "[::1]:7001", "sandbox.example:443"]
        socket_mode = "0600"
        state_dir = "/srv/state"
        runtime_dir = "/srv/run"
        max_request_bytes = "8MiB"
        metrics_listen = "0.0.0.0:9000"
        shutdown_grace = "2500ms"
        insecure_tcp = true

        [sandbox]
        uid_start = 300000
        uid_count = 16
        cgroup_parent_name = "sbx"
        cgroup_parent_path = "/sys/fs/cgroup/delegated"
        runners_dir = "/opt/runners"
        images_dir = "/opt/images"
        seccomp_dir = "/opt/seccomp"
        stop_on_output_limit = false

        [admission]
        max_concurrent = 3
        max_queue = 7
        max_queue_wait = "1m"

        [logging]
        level = "debug"
        format = "json"

        [limits.max]
        wall_time = "60s"
        memory = "1GiB"
        pids = 100
        cpus = 1.5

        [limits.default]
        wall_time = 5
        memory = "128MiB"
        pids = 10
        cpus = 0.5
        output = "64k"
        """)
    s = cfg.server
    assert s.listen == ("unix:///tmp/s.sock", "127.0.0.1:7000", "[::1]:7001", "sandbox.example:443")
    assert s.socket_mode == 0o600
    assert (s.state_dir, s.runtime_dir) == ("/srv/state", "/srv/run")
    assert s.max_request_bytes == 8 << 20
    assert s.metrics_listen == "0.0.0.0:9000"
    assert s.shutdown_grace == 2.5
    assert s.insecure_tcp is True
    b = cfg.sandbox
    assert (b.uid_start, b.uid_count) == (300000, 16)
    assert (b.cgroup_parent_name, b.cgroup_parent_path) == ("sbx", "/sys/fs/cgroup/delegated")
    assert (b.runners_dir, b.images_dir, b.seccomp_dir) == ("/opt/runners", "/opt/images", "/opt/seccomp")
    assert b.stop_on_output_limit is False
    assert cfg.admission == config.AdmissionConfig(max_concurrent=3, max_queue=7, max_queue_wait=60.0)
    assert cfg.logging == config.LoggingConfig(level="DEBUG", format="json")
    assert cfg.max_limits == dataclasses.replace(DEFAULT_MAX, wall_time=60.0, memory=1 << 30, pids=100, cpus=1.5)
    assert cfg.default_limits == dataclasses.replace(Limits(), wall_time=5.0, memory=128 << 20, pids=10, cpus=0.5,
                                                     output=64 << 10)


def test_every_limit_name_is_accepted_in_limits_tables():
    cfg = _parse("""
        [limits.max]
        wall_time = "100s"
        cpu_time = "90s"
        memory = "2GiB"
        pids = 500
        cpus = 2
        output = "8MiB"
        file_size = "512MiB"
        open_files = 1000
        stack = "32MiB"
        tmp_size = "512MiB"
        tmp_inodes = 5000
        work_size = "256MiB"
        work_inodes = 6000
        """)
    assert cfg.max_limits == Limits(wall_time=100.0, cpu_time=90.0, memory=2 << 30, pids=500, cpus=2.0,
                                    output=8 << 20, file_size=512 << 20, open_files=1000, stack=32 << 20,
                                    tmp_size=512 << 20, tmp_inodes=5000, work_size=256 << 20, work_inodes=6000)
    assert isinstance(cfg.max_limits.cpus, float)


# --- errors name file, key and expectation ------------------------------------------------------------------------

def test_unknown_top_level_key():
    msg = _error("serverr = 1\n")
    assert msg.startswith(f"{PATH}: serverr: unknown key")
    assert "server" in msg.split("known:")[1]


@pytest.mark.parametrize("section, key", [
    ("server", "listn"), ("sandbox", "uid_begin"), ("admission", "max_concurent"), ("logging", "colour"),
])
def test_unknown_key_in_a_section(section, key):
    msg = _error(f"[{section}]\n{key} = 1\n")
    assert msg.startswith(f"{PATH}: {section}.{key}: unknown key")


@pytest.mark.parametrize("table", ["limits.max", "limits.default"])
def test_unknown_limit_is_an_error_not_silently_ignored(table):
    msg = _error(f"[{table}]\nmemroy = \"1GiB\"\n")
    assert msg.startswith(f"{PATH}: {table}.memroy: unknown key")
    assert "memory" in msg


def test_unknown_key_in_limits_table():
    assert _error("[limits]\nmaximum = {}\n").startswith(f"{PATH}: limits.maximum: unknown key")


@pytest.mark.parametrize("text, key, expected", [
    ("[server]\nlisten = \"unix:///x.sock\"\n", "server.listen", "a list of strings"),
    ("[server]\nlisten = [1]\n", "server.listen", "a list of strings"),
    ("[server]\nsocket_mode = 432\n", "server.socket_mode", "octal mode"),
    ("[server]\nsocket_mode = \"0999\"\n", "server.socket_mode", "octal mode"),
    ("[server]\nstate_dir = 5\n", "server.state_dir", "a string"),
    ("[server]\nmax_request_bytes = \"lots\"\n", "server.max_request_bytes", "a size like"),
    ("[server]\nmax_request_bytes = -1\n", "server.max_request_bytes", "non-negative"),
    ("[server]\nshutdown_grace = \"soon\"\n", "server.shutdown_grace", "a duration like"),
    ("[sandbox]\nuid_start = \"200000\"\n", "sandbox.uid_start", "a non-negative integer"),
    ("[sandbox]\nuid_count = true\n", "sandbox.uid_count", "a non-negative integer"),
    ("[sandbox]\nuid_count = 1.5\n", "sandbox.uid_count", "a non-negative integer"),
    ("[sandbox]\nstop_on_output_limit = \"yes\"\n", "sandbox.stop_on_output_limit", "true or false"),
    ("[admission]\nmax_queue = -1\n", "admission.max_queue", "a non-negative integer"),
    ("[admission]\nmax_queue_wait = -2\n", "admission.max_queue_wait", "non-negative"),
    ("[logging]\nlevel = \"verbose\"\n", "logging.level", "DEBUG, INFO, WARNING or ERROR"),
    ("[logging]\nformat = \"xml\"\n", "logging.format", "text or json"),
    ("server = 5\n", "server", "a table"),
    ("[limits]\nmax = 3\n", "limits.max", "a table"),
    ("[limits.max]\npids = \"many\"\n", "limits.max.pids", "a non-negative integer"),
    ("[limits.max]\ncpus = true\n", "limits.max.cpus", "a non-negative number"),
    ("[limits.max]\nmemory = 0\n", "limits.max.memory", "a positive value"),
    ("[limits.default]\nwall_time = 0\n", "limits.default.wall_time", "a positive value"),
    ("[sandbox]\ncgroup_parent_name = \"a/b\"\n", "sandbox.cgroup_parent_name", "a simple name"),
    ("[sandbox]\ncgroup_parent_name = \"..\"\n", "sandbox.cgroup_parent_name", "a simple name"),
])
def test_wrong_value_names_file_key_and_expectation(text, key, expected):
    msg = _error(text)
    assert msg.startswith(f"{PATH}: {key}: "), msg
    assert expected in msg


def test_wrong_type_error_shows_the_value_given():
    assert "got 'sixty-four'" in _error("[limits.max]\npids = \"sixty-four\"\n")


def test_cgroup_parent_name_with_trailing_newline_rejected():
    msg = _error('[sandbox]\ncgroup_parent_name = "sbx\\n"\n')
    assert msg.startswith(f"{PATH}: sandbox.cgroup_parent_name: ")


@pytest.mark.parametrize("addr", [
    "unix://relative.sock", "unix://", "localhost", "127.0.0.1", ":80", "host:99999", "host:port",
    "tcp://127.0.0.1:80", "a b:80", "[::1]", "http://x:80",
])
def test_bad_listen_address(addr):
    msg = _error(f"[server]\nlisten = [\"{addr}\"]\n")
    assert msg.startswith(f"{PATH}: server.listen: {addr!r}: expected")


def test_empty_listen_list_is_an_error():
    assert _error("[server]\nlisten = []\n").startswith(f"{PATH}: server.listen: expected at least one address")


@pytest.mark.parametrize("addr", ["unix:///run/x.sock", "localhost:0", "10.0.0.1:65535", "[::]:50051",
                                  "my-host.internal:8080"])
def test_good_listen_address(addr):
    assert _parse(f"[server]\nlisten = [\"{addr}\"]\ninsecure_tcp = true\n").server.listen == (addr,)


def test_tcp_listener_needs_tls_or_an_explicit_insecure_opt_in():
    msg = _error('[server]\nlisten = ["unix:///run/x.sock", "127.0.0.1:7000"]\n')
    assert msg.startswith(f"{PATH}: server.listen: '127.0.0.1:7000': ")
    assert "tls" in msg


@pytest.mark.parametrize("start, count", [
    (0, 1024), (999, 10), (1000, 0), (2**32 - 10, 100), (2**32 - 2, 1),
])
def test_uid_range_must_be_unprivileged_and_fit(start, count):
    msg = _error(f"[sandbox]\nuid_start = {start}\nuid_count = {count}\n")
    assert msg.startswith(f"{PATH}: sandbox.uid_start: expected a range of unprivileged uids")
    assert f"{start}+{count}" in msg


@pytest.mark.parametrize("start, count", [(1000, 1), (2**32 - 3, 1), (100000, 65536)])
def test_uid_range_edges_accepted(start, count):
    s = _parse(f"[sandbox]\nuid_start = {start}\nuid_count = {count}\n").sandbox
    assert (s.uid_start, s.uid_count) == (start, count)


@pytest.mark.parametrize("name, above", [
    ("memory", "\"5GiB\""), ("wall_time", "\"301s\""), ("pids", "1025"), ("cpus", "2.5"), ("output", "\"17MiB\""),
])
def test_default_limit_above_builtin_max_is_an_error(name, above):
    msg = _error(f"[limits.default]\n{name} = {above}\n")
    assert msg.startswith(f"{PATH}: limits.default.{name}: ")
    assert "above the maximum" in msg
    assert repr(getattr(DEFAULT_MAX, name)) in msg


def test_default_limits_follow_a_lowered_max_when_not_set():
    cfg = _parse("""
        [limits.max]
        memory = "128MiB"
        wall_time = "2s"
        pids = 8
        """)
    assert cfg.max_limits.memory == 128 << 20
    assert cfg.default_limits.memory == 128 << 20        # 256MiB default clamped down
    assert cfg.default_limits.wall_time == 2.0           # 10s default clamped down
    assert cfg.default_limits.pids == 8                  # 64 default clamped down
    assert cfg.default_limits.cpu_time == Limits().cpu_time  # untouched: max not lowered


def test_default_limit_set_explicitly_above_a_lowered_max_is_an_error():
    msg = _error("""
        [limits.max]
        memory = "128MiB"
        [limits.default]
        memory = "256MiB"
        """)
    assert msg.startswith(f"{PATH}: limits.default.memory: ")
    assert str(256 << 20) in msg and str(128 << 20) in msg


def test_explicit_default_below_a_lowered_max_is_kept_and_others_are_clamped():
    cfg = _parse("""
        [limits.max]
        memory = "128MiB"
        pids = 8
        [limits.default]
        memory = "64MiB"
        """)
    assert cfg.default_limits.memory == 64 << 20
    assert cfg.default_limits.pids == 8


def test_max_may_be_raised_above_the_builtin_ceiling():
    cfg = _parse("[limits.max]\nmemory = \"16GiB\"\n[limits.default]\nmemory = \"8GiB\"\n")
    assert cfg.max_limits.memory == 16 << 30
    assert cfg.default_limits.memory == 8 << 30


def test_invalid_toml_names_the_file():
    msg = _error("[server\nlisten = 1\n")
    assert msg.startswith(f"{PATH}: invalid TOML")


def test_duplicate_key_is_invalid_toml():
    assert "invalid TOML" in _error("[admission]\nmax_queue = 1\nmax_queue = 2\n")


# --- files and relative paths -------------------------------------------------------------------------------------

def test_relative_dirs_resolve_against_the_config_files_directory(tmp_path):
    etc = tmp_path / "etc" / "sandboxd"
    etc.mkdir(parents=True)
    path = etc / "sandboxd.toml"
    path.write_text('[sandbox]\nrunners_dir = "runners"\nimages_dir = "../images"\nseccomp_dir = "./sc"\n')
    cfg = load(str(path))
    assert cfg.sandbox.runners_dir == str(etc / "runners")
    assert cfg.sandbox.images_dir == str(tmp_path / "etc" / "images")
    assert cfg.sandbox.seccomp_dir == str(etc / "sc")
    assert cfg.source == str(path)


def test_relative_dirs_resolve_against_the_file_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "conf" / "s.toml").write_text('[sandbox]\nrunners_dir = "r"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load("../conf/s.toml")
    assert cfg.sandbox.runners_dir == str((tmp_path / "conf" / "r").resolve())


def test_absolute_dirs_are_kept(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[sandbox]\nrunners_dir = "/opt/r"\n')
    assert load(str(path)).sandbox.runners_dir == "/opt/r"


def test_load_reads_and_validates_a_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[admission]\nmax_queue = 3\n')
    assert load(str(path)).admission.max_queue == 3
    path.write_text('[admission]\nmax_queue = "3"\n')
    with pytest.raises(ConfigError, match=f"^{path}: admission.max_queue: expected a non-negative integer"):
        load(str(path))


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}: cannot read: {os.strerror(2)}"


def test_load_unreadable_file(tmp_path):
    # A directory cannot be read as a file, even by root (chmod 000 would not stop root).
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read: "):
        load(str(tmp_path))


def test_load_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("this is not toml\n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid TOML"):
        load(str(path))


def test_load_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nstate_dir = "/srv/caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load(str(path))


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server = None  # type: ignore[misc]


def test_default_dirs_exist_in_the_source_tree():
    # The built-in default points at the repo's runners/ and images/ when run from a checkout.
    root = pathlib.Path(config.__file__).resolve().parents[1]
    assert Config().sandbox.runners_dir == str(root / "runners")
    assert Config().sandbox.seccomp_dir == str(root / "sandboxd" / "seccomp")


def test_a_policy_naming_x509_ids_is_refused_not_silently_empty():
    """No principal carries an "x509:ID" tag (certificates are named by their principal id), so a policy written
    that way would match no one; check-config says what to write instead."""
    message = _error('[[policies]]\nprincipals = ["root", "x509:spiffe://example.org/a"]\n')
    assert "policies[0].principals[1]" in message and "x509-cn:" in message and "cert_ids" in message


def test_landlock_is_required_by_default_and_can_demand_a_higher_abi():
    assert config.SandboxConfig().landlock_required_abi == 1
    assert _parse("[sandbox]\nlandlock_min_abi = 6\n").sandbox.landlock_required_abi == 6
    assert _parse("[sandbox]\nrequire_landlock = false\n").sandbox.landlock_required_abi == 0
    with pytest.raises(ConfigError, match=r"sandbox\.landlock_min_abi: expected an ABI version of 1 or more"):
        _parse("[sandbox]\nlandlock_min_abi = 0\n")


def test_audit_section_is_read_with_paths_relative_to_the_file():
    cfg = _parse('[audit]\ncheckpoint_every = 10\ncheckpoint_interval = "30s"\nkey_path = "keys/audit.key"\n'
                 'anchor_dir = "/srv/anchors"\nrefusal_summary_interval = "10s"\n')
    a = cfg.audit
    assert (a.checkpoint_every, a.checkpoint_interval, a.anchor_dir, a.refusal_summary_interval) == (
        10, 30.0, "/srv/anchors", 10.0)
    assert a.key_path == str(pathlib.Path(PATH).resolve().parent / "keys" / "audit.key")
    d = _parse("").audit
    assert (d.checkpoint_every, d.checkpoint_interval) == (1000, 300.0)
    assert (d.key_file("/var/lib/sandboxd"), d.anchor_directory("/var/lib/sandboxd")) == (
        "/var/lib/sandboxd/audit.key", "/var/lib/sandboxd/anchors")


@pytest.mark.parametrize("text, expected", [
    ("checkpoint_every = 0", "audit.checkpoint_every: expected a positive value"),
    ("checkpoint_every = -1", "audit.checkpoint_every: expected a non-negative integer"),
    ('checkpoint_interval = "0s"', "audit.checkpoint_interval: expected a positive value"),
    ('refusal_summary_interval = "soon"', "audit.refusal_summary_interval"),
    ("key_path = 1", "audit.key_path: expected a string"),
    ("anchors = 1", "audit.anchors: unknown key"),
])
def test_audit_section_errors_name_the_key(text, expected):
    assert expected in _error(f"[audit]\n{text}\n")


def test_pool_section():
    assert Config().pool.size_of("python") == 2 and Config().pool.size_of("sh") == 0
    cfg = parse("[pool]\nsize = 1\nmax_total = 3\nrefill_concurrency = 2\nrunners = { python = 4, sh = 0 }\n", "f")
    assert (cfg.pool.size_of("python"), cfg.pool.size_of("sh"), cfg.pool.size_of("node")) == (4, 0, 1)
    assert (cfg.pool.max_total, cfg.pool.refill_concurrency) == (3, 2)
    assert parse("[pool]\nrunners = {}\n", "f").pool.size_of("python") == 0
    assert Config().pool.sessions_of("python") == 1 and Config().pool.sessions_of("sh") == 0
    cfg = parse("[pool]\nsessions = { python = 3 }\n", "f")
    assert (cfg.pool.sessions_of("python"), cfg.pool.size_of("python")) == (3, 2)
    assert parse("[pool]\nsessions = {}\n", "f").pool.sessions_of("python") == 0
    with pytest.raises(ConfigError, match=r"pool\.sessions\.python"):
        parse("[pool]\nsessions = { python = -2 }\n", "f")
    for bad, key in (("runners = { python = -1 }", "pool.runners.python"), ("refill_concurrency = 0",
                     "pool.refill_concurrency"), ("sizes = 2", "pool.sizes"), ("size = true", "pool.size")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse(f"[pool]\n{bad}\n", "f")
