"""runners: runner and image definitions loaded from TOML in tmp_path, and resolution of paths inside an image."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import textwrap

import pytest

from sandboxd.config import DEFAULT_MAX, Config
from sandboxd.errors import ConfigError
from sandboxd.runners import (Runner, load_images, load_runner, load_runners, resolve_in,
                              runner_for_filename)
from sandboxd.sandbox.spec import ImageSpec, Limits

REPO = pathlib.Path(__file__).resolve().parents[2]
PROFILES = {"default", "strict"}

VALID = """
    name = "py"
    description = "a test runner"
    image = "img"
    command = ["/usr/bin/python3", "-I", "{script}"]
    script = "main.py"
    extensions = [".py", "pyw"]
    seccomp = "default"
    env_allowlist = ["LANG", "LC_*"]

    [env]
    PATH = "/usr/bin:/bin"
    HOME = "/work"

    [limits]
    memory = "128MiB"
    wall_time = "5s"

    [max_limits]
    memory = "1GiB"
    """


def _exe(path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/false\n")
    path.chmod(0o755)


@pytest.fixture
def rootfs(tmp_path) -> pathlib.Path:
    """A fake image: usr/bin/python3 executable, bin -> usr/bin (merged /usr), a few links."""
    root = tmp_path / "images" / "img" / "rootfs"
    _exe(root / "usr" / "bin" / "python3")
    (root / "usr" / "bin" / "data.txt").write_text("not executable")
    (root / "bin").symlink_to("usr/bin")
    return root


@pytest.fixture
def images(rootfs) -> dict[str, ImageSpec]:
    return {"img": ImageSpec(name="img", source=str(rootfs)), "host": ImageSpec(name="host", source="/")}


@pytest.fixture
def cfg(tmp_path) -> Config:
    d = tmp_path / "runners"
    d.mkdir()
    base = Config()
    return dataclasses.replace(base, sandbox=dataclasses.replace(base.sandbox, runners_dir=str(d)))


def _write(cfg: Config, name: str, text: str) -> pathlib.Path:
    path = pathlib.Path(cfg.sandbox.runners_dir) / name
    path.write_text(textwrap.dedent(text))
    return path


def _variant(**changes: str) -> str:
    """VALID with top-level lines replaced (key -> new TOML line, or "" to drop the key)."""
    lines = []
    for line in textwrap.dedent(VALID).splitlines():
        key = line.split("=")[0].strip() if "=" in line and not line.startswith(" ") else None
        if key in changes and not line.startswith("["):
            if changes[key]:
                lines.append(changes[key])
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


# --- a valid runner -----------------------------------------------------------------------------------------------

def test_valid_runner(cfg, images):
    path = _write(cfg, "py.toml", VALID)
    r = load_runner(path, cfg, images, PROFILES)
    assert r.name == "py"
    assert r.image == "img"
    assert r.command == ("/usr/bin/python3", "-I", "{script}")
    assert r.script == "main.py"
    assert r.extensions == ("py", "pyw")           # leading dots dropped
    assert r.seccomp == "default"
    assert r.env == (("PATH", "/usr/bin:/bin"), ("HOME", "/work"))
    assert r.env_allowlist == ("LANG", "LC_*")
    assert r.description == "a test runner"
    assert r.max_limits == dataclasses.replace(DEFAULT_MAX, memory=1 << 30)
    assert r.default_limits == dataclasses.replace(Limits(), memory=128 << 20, wall_time=5.0)
    assert r.available is True and r.unavailable_reason == ""
    assert r.source == str(path)


def test_name_defaults_to_the_file_stem(cfg, images):
    r = load_runner(_write(cfg, "ruby-ish.toml", _variant(name="")), cfg, images, PROFILES)
    assert r.name == "ruby-ish"


def test_runner_defaults_follow_its_lowered_max(cfg, images):
    text = textwrap.dedent(VALID).replace('[limits]\nmemory = "128MiB"\nwall_time = "5s"\n', "")
    text = text.replace('[max_limits]\nmemory = "1GiB"', '[max_limits]\nmemory = "64MiB"\npids = 4')
    r = load_runner(_write(cfg, "py.toml", text), cfg, images, PROFILES)
    assert r.max_limits.memory == 64 << 20
    assert r.default_limits.memory == 64 << 20   # the config's 256MiB default, clamped
    assert r.default_limits.pids == 4


# --- invalid runners ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key, expected", [
    ({"command": 'command = ["/usr/bin/python3", "main.py"]'}, "command", "{script}"),
    ({"command": 'command = ["python3", "{script}"]'}, "command", "absolute path"),
    ({"command": 'command = ["./python3", "{script}"]'}, "command", "absolute path"),
    ({"command": ""}, "command", "absolute path"),
    ({"command": 'command = "/usr/bin/python3 {script}"'}, "command", "a list of strings"),
    ({"seccomp": 'seccomp = "permissive"'}, "seccomp", "unknown profile 'permissive'"),
    ({"script": 'script = "dir/main.py"'}, "script", "a file name"),
    ({"script": 'script = ".."'}, "script", "a file name"),
    ({"script": ""}, "script", "a file name"),
    ({"name": 'name = "Py"'}, "name", "a lowercase name"),
    ({"name": 'name = "../py"'}, "name", "a lowercase name"),
    ({"image": "image = 3"}, "image", "a string"),
    ({"env_allowlist": 'env_allowlist = "LANG"'}, "env_allowlist", "a list of strings"),
    ({"extensions": "extensions = [1]"}, "extensions", "a list of strings"),
    ({"description": 'colour = "blue"'}, "colour", "unknown key"),
])
def test_invalid_runner_names_file_and_key(cfg, images, change, key, expected):
    path = _write(cfg, "py.toml", _variant(**change))
    with pytest.raises(ConfigError) as info:
        load_runner(path, cfg, images, PROFILES)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert expected in msg


def test_unknown_seccomp_profile_lists_the_known_ones(cfg, images):
    path = _write(cfg, "py.toml", _variant(seccomp='seccomp = "nope"'))
    with pytest.raises(ConfigError, match="known: default, strict"):
        load_runner(path, cfg, images, PROFILES)


@pytest.mark.parametrize("env_line", ['BAD-NAME = "x"', 'HOME = 3', '"1X" = "y"', 'NUL = "a\\u0000b"'])
def test_invalid_env_entry(cfg, images, env_line):
    path = _write(cfg, "py.toml", VALID.replace('HOME = "/work"', env_line))
    with pytest.raises(ConfigError, match=rf"^{path}: env\..*: expected NAME = \"string\""):
        load_runner(path, cfg, images, PROFILES)


def test_invalid_toml(cfg, images):
    path = _write(cfg, "py.toml", "name = \n")
    with pytest.raises(ConfigError, match=f"^{path}: invalid runner definition"):
        load_runner(path, cfg, images, PROFILES)


def test_runner_file_that_is_not_utf8(cfg, images):
    path = pathlib.Path(cfg.sandbox.runners_dir) / "py.toml"
    path.write_bytes(textwrap.dedent(VALID).replace("a test runner", "caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load_runner(path, cfg, images, PROFILES)


def test_runner_max_above_config_max(cfg, images):
    path = _write(cfg, "py.toml", VALID.replace('memory = "1GiB"', 'memory = "5GiB"'))
    with pytest.raises(ConfigError) as info:
        load_runner(path, cfg, images, PROFILES)
    assert str(info.value).startswith(f"{path}: max_limits.memory: ")
    assert "above the maximum" in str(info.value)


def test_runner_max_above_a_lowered_config_max(cfg, images):
    low = dataclasses.replace(cfg, max_limits=dataclasses.replace(DEFAULT_MAX, memory=512 << 20))
    path = _write(cfg, "py.toml", VALID)   # asks for max memory 1GiB
    with pytest.raises(ConfigError, match=rf"^{path}: max_limits\.memory: {1 << 30} is above the maximum {512 << 20}"):
        load_runner(path, low, images, PROFILES)


def test_runner_default_above_its_own_max(cfg, images):
    path = _write(cfg, "py.toml", VALID.replace('memory = "128MiB"', 'memory = "2GiB"'))
    with pytest.raises(ConfigError, match=rf"^{path}: limits\.memory: .*above the maximum {1 << 30}"):
        load_runner(path, cfg, images, PROFILES)


def test_runner_default_above_config_max_without_own_max(cfg, images):
    path = _write(cfg, "py.toml", VALID.replace('[max_limits]\nmemory = "1GiB"', "")
                  .replace('wall_time = "5s"', 'wall_time = "10m"'))
    with pytest.raises(ConfigError, match=rf"^{path}: limits\.wall_time: "):
        load_runner(path, cfg, images, PROFILES)


def test_duplicate_runner_names(cfg, images):
    first = _write(cfg, "a.toml", VALID)
    second = _write(cfg, "b.toml", VALID)
    with pytest.raises(ConfigError) as info:
        load_runners(cfg, images, PROFILES)
    msg = str(info.value)
    assert msg.startswith(f"{second}: name: runner 'py' is already defined in {first}")


def test_load_runners_loads_every_file_by_name(cfg, images):
    _write(cfg, "a.toml", VALID)
    _write(cfg, "b.toml", _variant(name='name = "other"'))
    (pathlib.Path(cfg.sandbox.runners_dir) / "notes.txt").write_text("ignored")
    runners = load_runners(cfg, images, PROFILES)
    assert sorted(runners) == ["other", "py"]
    assert all(isinstance(r, Runner) for r in runners.values())


def test_load_runners_empty_dir(cfg, images):
    with pytest.raises(ConfigError, match="no runners"):
        load_runners(cfg, images, PROFILES)


def test_load_runners_missing_dir(cfg, images, tmp_path):
    missing = dataclasses.replace(cfg, sandbox=dataclasses.replace(cfg.sandbox, runners_dir=str(tmp_path / "no")),
                                  source="/etc/s.toml")
    with pytest.raises(ConfigError, match=r"^/etc/s\.toml: sandbox\.runners_dir: .* is not a directory"):
        load_runners(missing, images, PROFILES)


# --- availability -------------------------------------------------------------------------------------------------

def test_interpreter_missing_from_image(cfg, images):
    path = _write(cfg, "py.toml", _variant(command='command = ["/usr/bin/python4", "{script}"]'))
    r = load_runner(path, cfg, images, PROFILES)
    assert r.available is False
    assert r.unavailable_reason == "interpreter /usr/bin/python4 is missing from image 'img'"


def test_interpreter_not_executable(cfg, images):
    path = _write(cfg, "py.toml", _variant(command='command = ["/usr/bin/data.txt", "{script}"]'))
    r = load_runner(path, cfg, images, PROFILES)
    assert r.available is False
    assert "missing from image" in r.unavailable_reason


def test_interpreter_is_a_directory(cfg, images):
    path = _write(cfg, "py.toml", _variant(command='command = ["/usr/bin", "{script}"]'))
    assert load_runner(path, cfg, images, PROFILES).available is False


def test_interpreter_found_through_an_image_symlink(cfg, images):
    path = _write(cfg, "py.toml", _variant(command='command = ["/bin/python3", "{script}"]'))
    assert load_runner(path, cfg, images, PROFILES).available is True


def test_interpreter_only_on_the_host_is_missing_from_the_image(cfg, images, tmp_path):
    # /bin/sh exists on the host but not in the fake image: it must be looked up in the image only.
    assert os.path.exists("/bin/sh")
    path = _write(cfg, "py.toml", _variant(command='command = ["/bin/sh", "{script}"]'))
    r = load_runner(path, cfg, images, PROFILES)
    assert r.available is False
    assert "/bin/sh is missing from image 'img'" in r.unavailable_reason


def test_image_not_defined(cfg, images):
    path = _write(cfg, "py.toml", _variant(image='image = "ghost"'))
    r = load_runner(path, cfg, images, PROFILES)
    assert r.available is False
    assert r.unavailable_reason == "image 'ghost' is not defined"


def test_image_source_missing(cfg, tmp_path):
    images = {"img": ImageSpec(name="img", source=str(tmp_path / "not-built"))}
    r = load_runner(_write(cfg, "py.toml", VALID), cfg, images, PROFILES)
    assert r.available is False
    assert r.unavailable_reason == f"image 'img' is not built ({tmp_path / 'not-built'} is missing)"


def test_repo_runners_load_with_the_builtin_default_config():
    cfg = Config()
    images = load_images(cfg.sandbox.images_dir)
    runners = load_runners(cfg, images, {"default"})
    assert {"python", "python-debian", "python-data", "sh", "bash", "node"} <= set(runners)
    for r in runners.values():
        assert r.source.startswith(str(REPO / "runners"))
        assert "{script}" in r.command and r.command[0].startswith("/")
        assert r.available or r.unavailable_reason, r.name
        for f in dataclasses.fields(Limits):
            assert getattr(r.default_limits, f.name) <= getattr(r.max_limits, f.name) <= getattr(cfg.max_limits,
                                                                                                f.name)
    assert runners["sh"].available, runners["sh"].unavailable_reason   # every Linux host has /bin/sh
    assert runner_for_filename(runners, "x.py") == "python"
    assert runner_for_filename(runners, "x.js") == "node"
    assert runner_for_filename(runners, "x.sh") == "sh"
    assert runner_for_filename(runners, "x.bash") == "bash"
    assert images["host"].source == "/"
    assert images["debian"].source == str(REPO / "images" / "debian" / "rootfs")


# --- images -------------------------------------------------------------------------------------------------------

def test_load_images(tmp_path):
    d = tmp_path / "images"
    (d / "deb").mkdir(parents=True)
    (d / "deb" / "image.toml").write_text('source = "rootfs"\nentries = ["usr", "bin"]\netc = ["ssl/certs"]\n'
                                         'description = "x"\n')
    (d / "abs").mkdir()
    (d / "abs" / "image.toml").write_text('name = "other"\nsource = "/srv/tree"\n')
    images = load_images(str(d))
    assert images["deb"] == ImageSpec(name="deb", source=str(d / "deb" / "rootfs"), entries=("usr", "bin"),
                                      etc=("ssl/certs",))
    assert images["other"].source == "/srv/tree"
    assert images["other"].entries == ImageSpec("x", "/").entries
    assert images["host"] == ImageSpec(name="host", source="/")   # the default image needs no file


@pytest.mark.parametrize("body, expected", [
    ('source = ""\n', "source: expected the image's root directory"),
    ('name = "x"\n', "source: expected the image's root directory"),
    ('source = "/x"\nentries = ["usr/lib"]\n', "entries: expected top-level names"),
    ('source = "/x"\nentries = [".."]\n', "entries: expected top-level names"),
    ('source = "/x"\netc = ["../shadow"]\n', "entries: expected top-level names"),
    ('source = "/x"\nname = "Bad Name"\n', "name: expected a simple lowercase name"),
    ('source = "/x"\nsauce = 1\n', "sauce: unknown key"),
    ('source = [\n', "invalid image definition"),
])
def test_invalid_image(tmp_path, body, expected):
    (tmp_path / "img").mkdir()
    path = tmp_path / "img" / "image.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_images(str(tmp_path))
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


# --- resolve_in ---------------------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """An image root next to a host directory holding decoys with the same names."""
    root = tmp_path / "root"
    _exe(root / "usr" / "bin" / "python3")
    (root / "usr" / "lib").mkdir()
    (root / "bin").symlink_to("usr/bin")                          # relative, merged /usr
    (root / "usr" / "bin" / "py").symlink_to("python3")           # relative, same directory
    (root / "usr" / "bin" / "abs").symlink_to("/usr/bin/python3")  # absolute: must stay in the image
    (root / "usr" / "lib" / "up").symlink_to("../bin/python3")
    (root / "usr" / "bin" / "escape").symlink_to("../../../../../../host/secret")
    (root / "usr" / "bin" / "abs-escape").symlink_to("/../../../host/secret")
    (root / "usr" / "bin" / "loop").symlink_to("loop")
    (root / "usr" / "bin" / "dangling").symlink_to("/nowhere")
    (root / "hostdir").symlink_to(tmp_path / "host")               # absolute, names a real host directory
    _exe(tmp_path / "host" / "secret")
    return root


def test_resolve_plain_path(tree):
    assert resolve_in(str(tree), "/usr/bin/python3") == str(tree / "usr/bin/python3")
    assert resolve_in(str(tree), "usr/bin/python3") == str(tree / "usr/bin/python3")
    assert resolve_in(str(tree), "/") == str(tree)


def test_resolve_missing(tree):
    assert resolve_in(str(tree), "/usr/bin/perl") is None
    assert resolve_in(str(tree), "/usr/bin/python3/x") is None


def test_resolve_relative_symlinks(tree):
    want = str(tree / "usr/bin/python3")
    assert resolve_in(str(tree), "/bin/python3") == want
    assert resolve_in(str(tree), "/bin/py") == want
    assert resolve_in(str(tree), "/usr/lib/up") == want


def test_resolve_absolute_symlink_stays_in_the_image(tree):
    assert resolve_in(str(tree), "/usr/bin/abs") == str(tree / "usr/bin/python3")
    assert resolve_in(str(tree), "/bin/abs") == str(tree / "usr/bin/python3")


def test_resolve_absolute_symlink_to_a_host_path_is_not_followed_on_the_host(tree, tmp_path):
    # root/hostdir -> <tmp_path>/host, which exists on the host (with a secret) but not in the image.
    assert (tmp_path / "host" / "secret").exists()
    assert resolve_in(str(tree), "/hostdir/secret") is None
    # The same absolute path built inside the image is where the link leads.
    inside = tree / str(tmp_path / "host").lstrip("/") / "secret"
    _exe(inside)
    assert resolve_in(str(tree), "/hostdir/secret") == str(inside)


def test_resolve_dotdot_cannot_leave_the_root(tree):
    assert resolve_in(str(tree), "/../../../usr/bin/python3") == str(tree / "usr/bin/python3")
    assert resolve_in(str(tree), "/usr/../../usr/./bin/../bin/python3") == str(tree / "usr/bin/python3")
    assert resolve_in(str(tree), "/usr/../..") == str(tree)
    assert resolve_in(str(tree), "/../host/secret") is None


def test_resolve_symlinks_cannot_leave_the_root(tree):
    assert resolve_in(str(tree), "/usr/bin/escape") is None
    assert resolve_in(str(tree), "/usr/bin/abs-escape") is None


def test_resolve_symlink_loop_and_dangling(tree):
    assert resolve_in(str(tree), "/usr/bin/loop") is None
    assert resolve_in(str(tree), "/usr/bin/dangling") is None


def test_resolve_stays_in_an_image_whose_source_has_a_trailing_slash(tmp_path, tree):
    d = tmp_path / "images"
    (d / "img").mkdir(parents=True)
    (d / "img" / "image.toml").write_text(f'source = "{tree}/"\n')
    root = load_images(str(d))["img"].source
    assert resolve_in(root, "/usr/bin/python3") is not None
    assert resolve_in(root, "/usr/../../host/secret") is None
    assert resolve_in(root, "/usr/bin/abs-escape") is None


# --- runner_for_filename and allows_env ---------------------------------------------------------------------------

def _runner(name: str, extensions=(), allow=()) -> Runner:
    return Runner(name=name, image="host", command=("/bin/x", "{script}"), script="main", extensions=extensions,
                  seccomp="default", env=(), env_allowlist=allow, default_limits=Limits(), max_limits=DEFAULT_MAX)


def test_runner_for_filename():
    runners = {"python": _runner("python", ("py",)), "node": _runner("node", ("js", "mjs")),
               "sh": _runner("sh", ("sh",))}
    assert runner_for_filename(runners, "script.py") == "python"
    assert runner_for_filename(runners, "/a/b.c/x.mjs") == "node"
    assert runner_for_filename(runners, "x.tar.sh") == "sh"
    assert runner_for_filename(runners, "Makefile") == "python"
    assert runner_for_filename(runners, "Makefile", fallback="sh") == "sh"
    assert runner_for_filename(runners, "x.rb", fallback="none") == "none"
    assert runner_for_filename(runners, "x.", fallback="none") == "none"
    assert runner_for_filename(runners, "py", fallback="none") == "none"   # no extension, not a name match


@pytest.mark.parametrize("name, allowed", [
    ("LANG", True), ("LC_ALL", True), ("LC_", True), ("TZ", True), ("APP_1", True),
    ("LANGUAGE", False), ("lang", False), ("lc_all", False), ("PATH", False), ("LD_PRELOAD", False),
    ("XLC_ALL", False), ("TZ2", False), ("", False),
])
def test_allows_env_globs(name, allowed):
    r = _runner("r", allow=("LANG", "LC_*", "T?", "APP_[0-9]"))
    assert r.allows_env(name) is allowed


def test_allows_env_empty_allowlist_allows_nothing():
    assert _runner("r").allows_env("LANG") is False
