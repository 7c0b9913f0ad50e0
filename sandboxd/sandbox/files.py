"""The in-sandbox file agent: every file operation on a session (put, get, stat, list, remove, mkdir, export,
import) and the files a one-shot run hands back (collect).

Where it runs: in a process forked by the sandbox's init, inside the sandbox's mount namespace, after the same
rlimits, credentials, Landlock rules and seccomp filter as any payload (init.py). So it sees exactly what the
session's own processes see, with their permissions: a symlink planted in the workspace resolves inside the
sandbox's root (openat2 RESOLVE_IN_ROOT), /proc magic links are refused (RESOLVE_NO_MAGICLINKS), and nothing the
host's root could open is reachable. The daemon never opens a path in a sandbox; data crosses through two pipes
as frames, which the daemon parses with bounds (this process runs beside untrusted code and is not trusted
either):

    frame = kind (1 byte: b"J" JSON object, b"D" data, b"E" end of a file's data) + length (4 bytes, big endian)
            + payload (at most FRAME bytes)

Everything here must already be imported when the launcher starts: after pivot_root the daemon's Python tree is
not visible, so a lazy import would fail.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import hashlib
import io
import json
import os
import re
import stat
import struct
import tarfile

from . import _libc

FRAME = 256 << 10
MAX_ENTRIES = 100_000
WORKDIR = "/work"

SYS_openat2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class FileOpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


ERRNO_CODES = {
    errno.ENOENT: "not_found", errno.EACCES: "permission_denied", errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied", errno.EISDIR: "is_directory", errno.ENOTDIR: "not_a_directory",
    errno.EEXIST: "already_exists", errno.ENOTEMPTY: "already_exists", errno.ELOOP: "invalid_path",
    errno.EXDEV: "invalid_path", errno.ENAMETOOLONG: "invalid_path", errno.EINVAL: "invalid_path",
    errno.EFBIG: "too_large", errno.ENOSPC: "too_large", errno.EDQUOT: "too_large",
}


def _error(e: OSError, path: str) -> FileOpError:
    code = ERRNO_CODES.get(e.errno or 0, "other")
    what = os.strerror(e.errno) if e.errno else str(e)
    if e.errno == errno.EXDEV:
        what = "the path leaves the sandbox's root"
    return FileOpError(code, f"{path}: {what}")


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)) else 0, resolve)
    fd = _libc._libc.syscall(SYS_openat2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def check_path(path: str) -> str:
    """The sandbox's absolute path for a request path (relative ones are relative to the workspace)."""
    if not isinstance(path, str) or "\0" in path or len(path.encode()) > 4096:
        raise FileOpError("invalid_path", f"{path!r}: expected a path without NUL bytes, at most 4096 bytes")
    if not path or path == ".":
        return WORKDIR
    full = path if path.startswith("/") else f"{WORKDIR}/{path}"
    if any(len(p.encode()) > 255 for p in full.split("/")):
        raise FileOpError("invalid_path", f"{path!r}: a path component is longer than 255 bytes")
    return os.path.normpath(full) if not full.startswith("//") else os.path.normpath(full[1:])


class Agent:
    def __init__(self, in_fd: int, out_fd: int):
        self.in_fd, self.out_fd = in_fd, out_fd
        self.root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inbuf = b""

    # -- frames ------------------------------------------------------------------------------------------------
    def send(self, kind: bytes, payload: bytes) -> None:
        data = kind + struct.pack(">I", len(payload)) + payload
        view = memoryview(data)
        while view:
            view = view[os.write(self.out_fd, view):]

    def send_json(self, **obj) -> None:
        self.send(b"J", json.dumps(obj).encode())

    def _read_exact(self, n: int) -> bytes:
        while len(self.inbuf) < n:
            chunk = os.read(self.in_fd, max(FRAME, n - len(self.inbuf)))
            if not chunk:
                raise EOFError
            self.inbuf += chunk
        out, self.inbuf = self.inbuf[:n], self.inbuf[n:]
        return out

    def recv(self) -> tuple[bytes, bytes]:
        head = self._read_exact(5)
        kind, size = head[:1], struct.unpack(">I", head[1:])[0]
        if size > FRAME + 4096:
            raise ValueError("frame too large")
        return kind, self._read_exact(size)

    # -- resolution -------------------------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0) -> int:
        try:
            return openat2(self.root, path, flags, mode)
        except OSError as e:
            raise _error(e, path) from None

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        """mkdir -p inside the sandbox's root: each existing component is resolved as the sandbox would."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            try:
                os.close(openat2(self.root, prefix, os.O_RDONLY | os.O_DIRECTORY))
                continue
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise _error(e, prefix) from None
            parent = self.open("/" + "/".join(parts[:i - 1]), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.mkdir(parts[i - 1], mode, dir_fd=parent)
            except FileExistsError:
                pass
            except OSError as e:
                raise _error(e, prefix) from None
            finally:
                os.close(parent)

    # -- operations -------------------------------------------------------------------------------------------
    def put(self, req: dict) -> None:
        """Frames in: J {"path", "mode"}, D chunks, E; ... ; then the input closes. One J result per file."""
        while True:
            try:
                kind, payload = self.recv()
            except EOFError:
                return
            if kind != b"J":
                continue
            head = json.loads(payload)
            path, mode = head.get("path", ""), int(head.get("mode") or 0o644) & 0o7777
            fd, err, size, digest, created, full = -1, None, 0, hashlib.sha256(), False, ""
            try:
                full = check_path(path)
                if full == WORKDIR or full == "/":
                    raise FileOpError("is_directory", f"{path}: is a directory")
                self.makedirs(os.path.dirname(full))
                try:
                    fd = openat2(self.root, full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NONBLOCK, mode)
                    created = True
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise _error(e, path) from None
                    # As the session's user writing to it would: through a symlink (inside the root), or
                    # refused on a read-only file.
                    fd = self.open(full, os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise FileOpError("other", f"{path}: not a regular file")
                os.set_blocking(fd, True)
            except FileOpError as e:
                err = e
            while True:
                kind, payload = self.recv()
                if kind == b"E":
                    break
                if kind == b"X":  # the daemon cut it: over the transfer limit; leave no partial new file
                    err = err or FileOpError("too_large", f"{path}: over the transfer limit")
                    if created:
                        with _suppress():
                            parent = self.open(os.path.dirname(full), os.O_RDONLY | os.O_DIRECTORY)
                            os.unlink(os.path.basename(full), dir_fd=parent)
                            os.close(parent)
                        created = False
                    continue
                if kind == b"D" and err is None:
                    try:
                        view = memoryview(payload)
                        while view:
                            view = view[os.write(fd, view):]
                        size += len(payload)
                        digest.update(payload)
                    except OSError as e:
                        err = _error(e, path)
            if fd >= 0:
                os.close(fd)
            if err is not None:
                self.send_json(path=path, error=err.code, message=str(err))
            else:
                self.send_json(path=path, error="", size=size, sha256=digest.hexdigest())

    def get(self, req: dict) -> None:
        limit = int(req["max_bytes"])
        for path in req["paths"]:
            try:
                full = check_path(path)
                # O_NONBLOCK: a FIFO planted where a file is expected opens at once instead of hanging.
                fd = self.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except FileOpError as e:
                self.send_json(path=path, error=e.code, message=str(e))
                continue
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise FileOpError("is_directory", f"{path}: is a directory")
                if not stat.S_ISREG(st.st_mode):
                    raise FileOpError("other", f"{path}: not a regular file")
                if st.st_size > limit:
                    raise FileOpError("too_large", f"{path}: {st.st_size} bytes is above the transfer limit of "
                                                   f"{limit} bytes")
                os.set_blocking(fd, True)
                self.send_json(path=path, size=st.st_size, mode=stat.S_IMODE(st.st_mode))
                total, digest = 0, hashlib.sha256()
                while chunk := os.read(fd, FRAME):
                    total += len(chunk)
                    if total > limit:  # it grew while we read it: never a silently short read
                        raise FileOpError("too_large", f"{path}: grew past the transfer limit of {limit} bytes "
                                                       f"while being read")
                    digest.update(chunk)
                    self.send(b"D", chunk)
                self.send_json(path=path, eof=True, size=total, sha256=digest.hexdigest())
            except FileOpError as e:
                self.send_json(path=path, error=e.code, message=str(e))
            except OSError as e:
                err = _error(e, path)
                self.send_json(path=path, error=err.code, message=str(err))
            finally:
                os.close(fd)

    def _info(self, name: str, rel: str, st: os.stat_result, dirfd: int | None) -> dict:
        mode = st.st_mode
        kind = ("directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "symlink"
                if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "char_device" if stat.S_ISCHR(mode) else "block_device" if stat.S_ISBLK(mode) else "other")
        info = {"name": name, "path": rel, "type": kind, "size": st.st_size, "mode": stat.S_IMODE(mode),
                "mtime": st.st_mtime}
        if kind == "symlink" and dirfd is not None:
            try:
                info["link_target"] = os.readlink(name, dir_fd=dirfd)
            except OSError:
                pass
        return info

    def _lstat(self, full: str, path: str) -> tuple[os.stat_result, int, str]:
        """lstat of the final component, its parent resolved inside the root. Returns (stat, parent fd, name)."""
        parent, name = os.path.split(full)
        pfd = self.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not name:
                return os.fstat(pfd), pfd, "."
            return os.stat(name, dir_fd=pfd, follow_symlinks=False), pfd, name
        except OSError as e:
            os.close(pfd)
            raise _error(e, path) from None

    def stat(self, req: dict) -> None:
        path = req["path"]
        try:
            full = check_path(path)
            st, pfd, name = self._lstat(full, path)
            try:
                self.send_json(**self._info(os.path.basename(full) or "/", path, st, pfd))
            finally:
                os.close(pfd)
        except FileOpError as e:
            self.send_json(path=path, error=e.code, message=str(e))

    def list(self, req: dict) -> None:
        path, depth = req["path"], max(1, int(req.get("depth") or 1))
        try:
            full = check_path(path)
            fd = self.open(full, os.O_RDONLY | os.O_DIRECTORY)
        except FileOpError as e:
            self.send_json(error=e.code, message=str(e))
            return
        count = [0]

        def walk(dfd: int, prefix: str, level: int) -> None:
            with os.scandir(dfd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                if count[0] >= MAX_ENTRIES:
                    return
                count[0] += 1
                try:
                    st = os.stat(entry.name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                rel = f"{prefix}{entry.name}"
                self.send_json(**self._info(entry.name, rel, st, dfd))
                if level < depth and stat.S_ISDIR(st.st_mode):
                    try:
                        sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      dir_fd=dfd)
                    except OSError:
                        continue
                    try:
                        walk(sub, rel + "/", level + 1)
                    finally:
                        os.close(sub)
        try:
            walk(fd, "", 1)
            self.send_json(done=True, truncated=count[0] >= MAX_ENTRIES)
        except OSError as e:
            err = _error(e, path)
            self.send_json(error=err.code, message=str(err))
        finally:
            os.close(fd)

    def remove(self, req: dict) -> None:
        for path in req["paths"]:
            try:
                full = check_path(path)
                if full in ("/", WORKDIR):
                    raise FileOpError("invalid_path", f"{path}: refusing to remove the workspace itself")
                st, pfd, name = self._lstat(full, path)
                try:
                    if stat.S_ISDIR(st.st_mode):
                        if req.get("recursive"):
                            _rmtree(pfd, name)
                        else:
                            try:
                                os.rmdir(name, dir_fd=pfd)
                            except OSError as e:
                                if e.errno == errno.ENOTEMPTY:
                                    raise FileOpError("is_directory", f"{path}: a directory that is not empty "
                                                                      f"(remove it recursively)") from None
                                raise
                    else:
                        os.unlink(name, dir_fd=pfd)
                finally:
                    os.close(pfd)
                self.send_json(path=path, error="")
            except FileOpError as e:
                self.send_json(path=path, error=e.code, message=str(e))
            except OSError as e:
                err = _error(e, path)
                self.send_json(path=path, error=err.code, message=str(err))

    def mkdir(self, req: dict) -> None:
        path, mode = req["path"], int(req.get("mode") or 0o755) & 0o7777
        try:
            full = check_path(path)
            if req.get("parents"):
                self.makedirs(full, mode)
            else:
                parent, name = os.path.split(full)
                pfd = self.open(parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.mkdir(name, mode, dir_fd=pfd)
                except OSError as e:
                    raise _error(e, path) from None
                finally:
                    os.close(pfd)
            self.send_json(path=path, error="")
        except FileOpError as e:
            self.send_json(path=path, error=e.code, message=str(e))

    def export(self, req: dict) -> None:
        """A tar of a directory (default the workspace), streamed as D frames, never following a symlink."""
        path = req.get("path") or ""
        try:
            fd = self.open(check_path(path), os.O_RDONLY | os.O_DIRECTORY)
        except FileOpError as e:
            self.send_json(error=e.code, message=str(e))
            return
        out = _FrameWriter(self)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_tree(tar, fd, "")
        os.close(fd)
        out.flush()
        self.send_json(done=True)

    def import_(self, req: dict) -> None:
        """Unpack a tar (D frames in) beneath a directory. Refused: absolute names, '..', device and FIFO
        entries, links that point outside the target. Every member is written with the sandbox's own rights."""
        path = req.get("path") or ""
        files, total = 0, 0
        try:
            full = check_path(path)
            self.makedirs(full)
            base = self.open(full, os.O_RDONLY | os.O_DIRECTORY)
        except FileOpError as e:
            self._drain()
            self.send_json(error=e.code, message=str(e))
            return
        try:
            with tarfile.open(fileobj=_FrameReader(self), mode="r|") as tar:
                for m in tar:
                    name = _member_name(m)
                    if m.isdir():
                        _mkdirs_beneath(base, name, m.mode & 0o7777 or 0o755)
                    elif m.isreg():
                        dfd = _mkdirs_beneath(base, os.path.dirname(name), 0o755)
                        try:
                            leaf = os.path.basename(name)
                            try:
                                os.unlink(leaf, dir_fd=dfd)
                            except FileNotFoundError:
                                pass
                            out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                          m.mode & 0o777 or 0o644, dir_fd=dfd)
                            with os.fdopen(out, "wb") as f:
                                src = tar.extractfile(m)
                                while chunk := src.read(FRAME):
                                    f.write(chunk)
                            files += 1
                            total += m.size
                        finally:
                            if dfd != base:
                                os.close(dfd)
                    elif m.issym() or m.islnk():
                        target = m.linkname
                        if target.startswith("/") or _escapes(os.path.dirname(name) if m.issym() else "", target):
                            raise FileOpError("invalid_path", f"tar member {m.name!r}: a link to {target!r} "
                                                              f"points outside the target directory")
                        dfd = _mkdirs_beneath(base, os.path.dirname(name), 0o755)
                        try:
                            leaf = os.path.basename(name)
                            try:
                                os.unlink(leaf, dir_fd=dfd)
                            except FileNotFoundError:
                                pass
                            if m.issym():
                                os.symlink(target, leaf, dir_fd=dfd)
                            else:
                                os.link(_member_name_str(target), leaf, src_dir_fd=base, dst_dir_fd=dfd,
                                        follow_symlinks=False)
                            files += 1
                        finally:
                            if dfd != base:
                                os.close(dfd)
                    else:
                        raise FileOpError("invalid_path", f"tar member {m.name!r}: device, FIFO and other special "
                                                          f"entries are refused")
            self.send_json(done=True, files=files, bytes=total)
        except FileOpError as e:
            self._drain()
            self.send_json(error=e.code, message=str(e))
        except (tarfile.TarError, EOFError) as e:
            self._drain()
            self.send_json(error="invalid_path", message=f"not a valid tar archive: {e}")
        except OSError as e:
            self._drain()
            err = _error(e, getattr(e, "filename", None) or "tar member")
            self.send_json(error=err.code, message=str(err))
        finally:
            os.close(base)

    def _drain(self) -> None:
        try:
            while True:
                self.recv()
        except (EOFError, ValueError, OSError):
            pass

    def collect(self, req: dict) -> None:
        """Regular files under the workspace matching any pattern, in name order, until the total cap."""
        patterns, cap = [p for p in req["patterns"]], int(req["max_bytes"])
        regexes = [_glob_regex(p) for p in patterns]
        total, truncated = 0, False
        base = self.open(WORKDIR, os.O_RDONLY | os.O_DIRECTORY)
        for rel, dfd, name in _walk_files(base, "", 0):
            if not any(r.match(rel) for r in regexes):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if total + st.st_size > cap:
                    truncated = True
                    continue
                os.set_blocking(fd, True)
                data = b""
                while len(data) <= st.st_size and (chunk := os.read(fd, FRAME)):
                    data += chunk
                data = data[:st.st_size]
                total += len(data)
                self.send_json(path=rel, size=len(data), mode=stat.S_IMODE(st.st_mode))
                for i in range(0, len(data), FRAME):
                    self.send(b"D", data[i:i + FRAME])
                self.send(b"E", b"")
            finally:
                os.close(fd)
        self.send_json(done=True, truncated=truncated)


OPS = {"put": Agent.put, "get": Agent.get, "stat": Agent.stat, "list": Agent.list, "remove": Agent.remove,
       "mkdir": Agent.mkdir, "export": Agent.export, "import": Agent.import_, "collect": Agent.collect}


def serve(req: dict, in_fd: int, out_fd: int) -> None:
    """Entry point in the agent process (credentials and filters already applied)."""
    agent = Agent(in_fd, out_fd)
    try:
        OPS[req["op"]](agent, req)
    except FileOpError as e:
        agent.send_json(error=e.code, message=str(e))
    except OSError as e:
        err = _error(e, "")
        agent.send_json(error=err.code, message=str(err))


class _FrameWriter(io.RawIOBase):
    def __init__(self, agent: Agent):
        self.agent, self.buf = agent, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.buf += b
        while len(self.buf) >= FRAME:
            self.agent.send(b"D", bytes(self.buf[:FRAME]))
            del self.buf[:FRAME]
        return len(b)

    def flush(self) -> None:
        if self.buf:
            self.agent.send(b"D", bytes(self.buf))
            self.buf.clear()


class _FrameReader(io.RawIOBase):
    def __init__(self, agent: Agent):
        self.agent, self.buf, self.eof = agent, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf and not self.eof:
            try:
                kind, payload = self.agent.recv()
            except EOFError:
                self.eof = True
                break
            if kind == b"D":
                self.buf = payload
            elif kind == b"E":
                self.eof = True
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], (OSError, FileOpError))


def _member_name_str(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _member_name(m: tarfile.TarInfo) -> str:
    name = m.name
    if name.startswith("/") or "\0" in name:
        raise FileOpError("invalid_path", f"tar member {name!r}: absolute paths are refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FileOpError("invalid_path", f"tar member {name!r}: '..' is refused")
    if not parts:
        return "."
    return "/".join(parts)


def _escapes(base: str, target: str) -> bool:
    depth = len([p for p in base.split("/") if p not in ("", ".")])
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _mkdirs_beneath(base: int, rel: str, mode: int) -> int:
    """A directory fd for `rel` under `base`, creating what is missing; never crosses a symlink."""
    fd = base
    for part in [p for p in rel.split("/") if p not in ("", ".")]:
        try:
            os.mkdir(part, mode, dir_fd=fd)
        except FileExistsError:
            pass
        nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        if fd != base:
            os.close(fd)
        fd = nfd
    return fd


def _rmtree(pfd: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        for entry in list(os.scandir(fd)):
            st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _rmtree(fd, entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def _add_tree(tar: tarfile.TarFile, dfd: int, prefix: str) -> None:
    with os.scandir(dfd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue
        info = tarfile.TarInfo(prefix + name)
        info.mode, info.mtime, info.uid, info.gid = stat.S_IMODE(st.st_mode), int(st.st_mtime), 0, 0
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                _add_tree(tar, sub, prefix + name + "/")
            finally:
                os.close(sub)
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dfd)
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                info.size = st.st_size
                tar.addfile(info, _Exactly(f, st.st_size))
        # FIFOs, sockets and devices are skipped: they carry no data.


class _Exactly(io.RawIOBase):
    """Exactly `size` bytes of a file that may grow or shrink while it is read (zero-padded if it shrank)."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.left <= 0:
            return 0
        want = min(len(b), self.left)
        data = self.f.read(want) or b"\0" * want
        n = len(data)
        b[:n] = data
        self.left -= n
        return n


def _walk_files(dfd: int, prefix: str, level: int):
    if level > 32:
        return
    with os.scandir(dfd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                yield from _walk_files(sub, prefix + name + "/", level + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            yield prefix + name, dfd, name


def _glob_regex(pattern: str) -> re.Pattern:
    """fnmatch per component, with '**' matching any number of directories."""
    parts = [p for p in pattern.split("/") if p not in ("", ".")]
    out = []
    for i, part in enumerate(parts):
        if part == "**":
            out.append("(?:[^/]+/)*" if i < len(parts) - 1 else ".*")
        else:
            rx = fnmatch.translate(part)
            rx = rx[4:-3] if rx.startswith("(?s:") and rx.endswith(")\\Z") else rx
            rx = rx.replace(".*", "[^/]*")
            out.append(rx + ("/" if i < len(parts) - 1 else ""))
    return re.compile("^" + "".join(out) + "$")
