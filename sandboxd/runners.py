"""Runner and image definitions: which interpreter runs a script, in which image, with which limits.

Runs in the daemon. Runners are data (runners/*.toml, one per language); images are data
(images/<name>/image.toml). Both are loaded and validated at start-up and on reload; a runner whose image or
interpreter is missing is kept but marked unavailable, so ListRunners can say why and Execute answers
FAILED_PRECONDITION instead of failing inside the sandbox.

The daemon reads these as root and runs code on what they say, so `require_trusted` refuses any of them that
someone other than root could change (see its docstring for exactly what is checked).
"""
from __future__ import annotations

import fnmatch
import os
import pathlib
import stat
import tomllib
from dataclasses import dataclass

from .config import ENV_NAME_RE, NAME_RE, Config, _Reader, check_within, read_limits
from .errors import ConfigError
from .sandbox.spec import ImageSpec, Limits


@dataclass(frozen=True)
class Runner:
    name: str
    image: str
    command: tuple[str, ...]          # "{script}" is replaced by the script's path; request args follow
    script: str                       # the script's file name in the working directory
    extensions: tuple[str, ...]
    seccomp: str
    env: tuple[tuple[str, str], ...]  # always set
    env_allowlist: tuple[str, ...]    # names (or globs) a request may set
    default_limits: Limits
    max_limits: Limits
    description: str = ""
    # Sessions: the kernel RunCode starts ("python": the interpreter of `command`), and the environment rules of
    # Exec, where the caller sets the env (one-shot Execute keeps env_allowlist): names a call may not set, and
    # values always set whatever a call asks.
    kernel: str = ""
    session_env_forbid: tuple[str, ...] = ()
    session_env_force: tuple[tuple[str, str], ...] = ()
    # The warm pool may start the interpreter ahead of the run and hand it the script through a FIFO at the
    # script's path (child._prestart): true only for interpreters that open their script by path once started
    # and read it once, as CPython does.
    prestart: bool = False
    available: bool = True
    unavailable_reason: str = ""
    source: str = ""

    def allows_env(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.env_allowlist)

    def allows_session_env(self, name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.session_env_forbid)


def require_trusted(path: str | os.PathLike, what: str) -> None:
    """ConfigError unless `path` (followed if a symlink) is owned by root and writable by nobody else (no group or
    other write bit). Checked: the runner, image and seccomp directories, every *.toml read from them, each
    image's directory and its source directory itself. Not checked: their parents (a sticky /tmp above a
    root-owned 0700 directory is fine) and the files inside an image's source tree (root builds it)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot stat: {e.strerror}") from None
    if st.st_uid != 0:
        raise ConfigError(f"{path}: {what} is owned by uid {st.st_uid}, not root: sandboxd reads it as root and "
                          "will not trust what another user can change")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path}: {what} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                          "sandboxd reads it as root and will not trust what another user can change "
                          "(chmod go-w)")


def resolve_in(root: str, path: str, depth: int = 0) -> str | None:
    """Resolve `path` as the sandbox would see it with `root` as "/": absolute symlinks stay inside the image.
    Returns the host path of the final file, or None if it does not exist."""
    if depth > 16:
        return None
    root = os.path.normpath(root)  # "/img/" and "/img" must compare equal, or ".." could climb out
    current = root
    parts = [p for p in path.split("/") if p not in ("", ".")]
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = os.path.dirname(current) if current != root else root
            continue
        candidate = os.path.join(current, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(candidate)
            rest = "/".join(parts)
            if target.startswith("/"):
                return resolve_in(root, target + "/" + rest, depth + 1)
            rel = os.path.relpath(current, root)
            return resolve_in(root, ("" if rel == "." else rel) + "/" + target + "/" + rest, depth + 1)
        current = candidate
    return current


def load_images(images_dir: str) -> dict[str, ImageSpec]:
    images: dict[str, ImageSpec] = {}
    if os.path.isdir(images_dir):
        require_trusted(images_dir, "images directory")
    for path in sorted(pathlib.Path(images_dir).glob("*/image.toml")):
        require_trusted(path.parent, "image directory")
        require_trusted(path, "image definition")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: invalid image definition: {e}") from None
        r = _Reader(str(path), doc, "")
        name = r.get("name", "str", path.parent.name)
        source = r.get("source", "str", "")
        entries = r.get("entries", "strs", ImageSpec("x", "/").entries)
        etc = r.get("etc", "strs", ImageSpec("x", "/").etc)
        r.get("description", "str", "")
        r.done()
        if not NAME_RE.match(name):
            raise ConfigError(f"{path}: name: expected a simple lowercase name, got {name!r}")
        if not source:
            raise ConfigError(f"{path}: source: expected the image's root directory")
        for entry in (*entries, *etc):
            if "/" in entry.strip("/") and entry not in etc or entry in ("", ".", "..") or ".." in entry.split("/"):
                raise ConfigError(f"{path}: entries: expected top-level names, got {entry!r}")
        source = str((path.parent / source).resolve()) if not os.path.isabs(source) else os.path.normpath(source)
        if os.path.isdir(source):  # a missing source only makes its runners unavailable
            require_trusted(source, f"source of image {name!r}")
        images[name] = ImageSpec(name=name, source=source, entries=tuple(entries), etc=tuple(etc))
    if "host" not in images:  # the default image needs no file
        images["host"] = ImageSpec(name="host", source="/")
    return images


def load_runner(path: pathlib.Path, cfg: Config, images: dict[str, ImageSpec], profiles: set[str]) -> Runner:
    require_trusted(path, "runner definition")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: invalid runner definition: {e}") from None
    p = str(path)
    r = _Reader(p, doc, "")
    name = r.get("name", "str", path.stem)
    image = r.get("image", "str", "host")
    command = r.get("command", "strs", ())
    script = r.get("script", "str", "")
    extensions = r.get("extensions", "strs", ())
    seccomp = r.get("seccomp", "str", "default")
    description = r.get("description", "str", "")
    env_allowlist = r.get("env_allowlist", "strs", ())
    kernel = r.get("kernel", "str", "")
    prestart = r.get("prestart", "bool", False)
    forbid = r.get("session_env_forbid", "strs", ())
    force_table = r.table_of("session_env_force")
    env_table = r.table_of("env")
    max_limits = read_limits(p, r.table_of("max_limits"), "max_limits.", cfg.max_limits)
    check_within(p, "max_limits.", max_limits, cfg.max_limits)
    base = Limits(**{k: min(getattr(cfg.default_limits, k), getattr(max_limits, k))
                     for k in Limits.__dataclass_fields__})
    default_limits = read_limits(p, r.table_of("limits"), "limits.", base)
    check_within(p, "limits.", default_limits, max_limits)
    r.done()
    if not NAME_RE.match(name):
        raise ConfigError(f"{p}: name: expected a lowercase name ([a-z0-9_.-], max 64), got {name!r}")
    if not command or not command[0].startswith("/"):
        raise ConfigError(f"{p}: command: expected a list starting with the interpreter's absolute path")
    if "{script}" not in command:
        raise ConfigError(f"{p}: command: expected a \"{{script}}\" placeholder")
    if not script or "/" in script or script in (".", ".."):
        raise ConfigError(f"{p}: script: expected a file name like main.py")
    if seccomp not in profiles:
        raise ConfigError(f"{p}: seccomp: unknown profile {seccomp!r} (known: {', '.join(sorted(profiles))})")
    env, force = [], []
    for table, key, out in ((env_table, "env", env), (force_table, "session_env_force", force)):
        for k, v in table.items():
            if not ENV_NAME_RE.match(k) or not isinstance(v, str) or "\0" in v:
                raise ConfigError(f"{p}: {key}.{k}: expected NAME = \"string\"")
            out.append((k, v))
    if kernel not in ("", "python"):
        raise ConfigError(f"{p}: kernel: expected \"python\" or nothing, got {kernel!r}")
    available, reason = True, ""
    if image not in images:
        available, reason = False, f"image {image!r} is not defined"
    elif not os.path.isdir(images[image].source):
        available, reason = False, f"image {image!r} is not built ({images[image].source} is missing)"
    else:
        host = resolve_in(images[image].source, command[0])
        if host is None or not os.path.isfile(host) or not os.access(host, os.X_OK):
            available, reason = False, f"interpreter {command[0]} is missing from image {image!r}"
    return Runner(name=name, image=image, command=command, script=script,
                  extensions=tuple(e.lstrip(".") for e in extensions), seccomp=seccomp, env=tuple(env),
                  env_allowlist=env_allowlist, default_limits=default_limits, max_limits=max_limits,
                  description=description, kernel=kernel, session_env_forbid=forbid, session_env_force=tuple(force),
                  prestart=prestart, available=available, unavailable_reason=reason, source=p)


def load_runners(cfg: Config, images: dict[str, ImageSpec], profiles: set[str]) -> dict[str, Runner]:
    directory = pathlib.Path(cfg.sandbox.runners_dir)
    if not directory.is_dir():
        raise ConfigError(f"{cfg.source}: sandbox.runners_dir: {directory} is not a directory")
    require_trusted(directory, "runners directory")
    runners: dict[str, Runner] = {}
    for path in sorted(directory.glob("*.toml")):
        runner = load_runner(path, cfg, images, profiles)
        if runner.name in runners:
            raise ConfigError(f"{path}: name: runner {runner.name!r} is already defined in {runners[runner.name].source}")
        runners[runner.name] = runner
    if not runners:
        raise ConfigError(f"{directory}: no runners (*.toml) found")
    return runners


def runner_for_filename(runners: dict[str, Runner], filename: str, fallback: str = "python") -> str:
    ext = filename.rsplit(".", 1)[-1] if "." in filename else ""
    for runner in runners.values():
        if ext and ext in runner.extensions:
            return runner.name
    return fallback
