"""The Python kernel of a session: runs inside the sandbox, as the sandbox's uid, under its seccomp filter.

The daemon never imports this file. It copies it read-only into the sandbox and the image's own interpreter runs
it (`python3 -I -u /.sandboxd/python_kernel.py`), so it must work on any Python 3.9+ and use the stdlib only.

Theory of operation:

    daemon --fd 3 (SOCK_SEQPACKET; one JSON object per message, fds attached with SCM_RIGHTS)--> kernel
      {"op": "cell", "id": ..., "count": N}  fds [code memfd, stdout_w, stderr_w, report_w]
      {"op": "ping"}                          fds [report_w]                 -> {"type": "pong"}
    EOF on fd 3: exit 0.

A cell's stdout and stderr are the pipes it came with (dup2'd onto fds 1 and 2 for the cell only); its reports
(results, an error, then always {"type": "done"}) go one JSON line each to report_w, a channel the cell's own
output never reaches. After the cell, fds 1 and 2 point at /dev/null again, so a thread or child that outlives
the cell cannot write into a finished cell's pipes, and every received fd is closed. Cells run one at a time.

SIGINT from the daemon raises KeyboardInterrupt while a cell (or the formatting of its results) runs, and is
ignored between cells: an interrupt that arrives late must never kill the kernel.

Everything here runs in the same process as untrusted code: the daemon trusts nothing this file writes.
"""
import ast
import base64
import builtins
import io
import json
import linecache
import os
import pprint
import signal
import socket
import sys
import threading
import traceback
import types

CONTROL_FD = 3
MAX_MESSAGE = 64 * 1024
MAX_FDS = 8
CO_COROUTINE = 0x80
KERNEL_FILE = __file__

# _repr_*_ methods and the MIME type each one gives, as IPython's formatters do.
REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)
BINARY_TYPES = ("image/png", "image/jpeg")
CONTAINERS = (dict, list, tuple, set, frozenset)


def _text_stream(fd):
    """Line-flushing UTF-8 text over an fd, so print() streams and no encoding error hides output."""
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                            errors="backslashreplace", line_buffering=True, write_through=True)


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def _is_formattable(obj):
    # A class's _repr_html_ is an unbound function: calling it would fail or mean something else.
    return not isinstance(obj, type)


def _mime_value(mime, value):
    """One MIME bundle entry as the JSON text the report carries, or None to leave it out."""
    if isinstance(value, tuple) and len(value) == 2:   # (data, metadata), as _repr_png_ may return
        value = value[0]
    if value is None:
        return None
    if mime == "application/json" and not isinstance(value, str):
        return json.dumps(value, default=repr)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if mime in BINARY_TYPES:
            return base64.b64encode(bytes(value)).decode("ascii")
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _plain_text(obj):
    try:
        if isinstance(obj, CONTAINERS):
            return pprint.pformat(obj, sort_dicts=False)
        return repr(obj)
    except Exception as exc:    # a broken __repr__ still gives the cell a result it can see
        return "<%s object (repr failed: %s: %s)>" % (type(obj).__name__, type(exc).__name__, exc)


def _figure_png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mime_bundle(obj):
    """The MIME bundle of an object: whatever it offers through _repr_*_, and always text/plain."""
    data = {}
    if _is_formattable(obj):
        method = getattr(obj, "_repr_mimebundle_", None)
        if callable(method):
            try:
                bundle = method(include=None, exclude=None)
                if isinstance(bundle, tuple):
                    bundle = bundle[0]
                for mime, value in (bundle or {}).items():
                    value = _mime_value(str(mime), value)
                    if value is not None:
                        data[str(mime)] = value
            except Exception as exc:
                _warn_repr(obj, "_repr_mimebundle_", exc)
        for name, mime in REPR_METHODS:
            if mime in data:
                continue
            method = getattr(obj, name, None)
            if not callable(method):
                continue
            try:
                value = _mime_value(mime, method())
            except Exception as exc:
                _warn_repr(obj, name, exc)
                continue
            if value is not None:
                data[mime] = value
        if "image/png" not in data and _is_matplotlib_figure(obj):
            data["image/png"] = _figure_png(obj)
    if not isinstance(data.get("text/plain"), str):
        data["text/plain"] = _plain_text(obj)
    return data


def _is_matplotlib_figure(obj):
    figure = sys.modules.get("matplotlib.figure")
    return figure is not None and isinstance(obj, figure.Figure)


def _warn_repr(obj, name, exc):
    # On the cell's stderr, as IPython does: a broken formatter must not hide the rest of the bundle.
    try:
        sys.stderr.write("%s.%s failed: %s: %s\n" % (type(obj).__name__, name, type(exc).__name__, exc))
    except Exception:
        pass


def _cell_traceback(exc):
    """The exception's traceback lines, starting at the cell's own frames (the kernel's are not the user's)."""
    tb = exc.__traceback__
    first = tb
    while first is not None and not first.tb_frame.f_code.co_filename.startswith("<cell-"):
        first = first.tb_next
    if first is None:                          # no cell frame (a SyntaxError): drop only the kernel's frames
        first = tb
        while first is not None and first.tb_frame.f_code.co_filename == KERNEL_FILE:
            first = first.tb_next
    return "".join(traceback.format_exception(type(exc), exc, first)).splitlines()


def _error_report(exc):
    try:
        value = str(exc)
    except Exception:
        value = "<unprintable %s>" % type(exc).__name__
    try:
        lines = _cell_traceback(exc)
    except Exception:
        lines = ["%s: %s" % (type(exc).__name__, value)]
    return {"type": "error", "name": type(exc).__name__, "value": value, "traceback": lines}


class _PyplotHook:
    """Patches matplotlib.pyplot.show the moment pyplot is imported, so plt.show() in the very cell that imports
    pyplot already emits the figures (the Agg backend's own show does nothing)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def find_spec(self, name, path, target=None):
        if name != "matplotlib.pyplot":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def patched_exec(module):
            exec_module(module)
            self.kernel.patch_pyplot(module)
        loader.exec_module = patched_exec
        return spec


class Kernel:
    def __init__(self):
        self.main = types.ModuleType("__main__")
        self.ns = self.main.__dict__
        self.ns["__builtins__"] = builtins
        # Cells define __main__ (pickle and multiprocessing look classes up there), not this script.
        sys.modules["sandboxd_python_kernel"] = sys.modules.get("__main__")
        sys.modules["__main__"] = self.main
        self.report_fd = None
        self.report_lock = threading.Lock()
        self.interruptible = False
        self.loop = None
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.stdout = _text_stream(1)
        self.stderr = _text_stream(2)
        builtins.display = self.display
        sys.meta_path.insert(0, _PyplotHook(self))
        if "matplotlib.pyplot" in sys.modules:
            self.patch_pyplot(sys.modules["matplotlib.pyplot"])

    # --- signals ------------------------------------------------------------------------------------------------
    def on_sigint(self, signum, frame):
        if self.interruptible:
            raise KeyboardInterrupt

    # --- reports ------------------------------------------------------------------------------------------------
    def report(self, obj):
        line = (json.dumps(obj, ensure_ascii=True) + "\n").encode("ascii")
        with self.report_lock:
            fd = self.report_fd
            if fd is None:      # a thread of a finished cell: its cell's report is closed
                return
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:     # the daemon stopped reading; the cell's result is its business now
                pass

    def display(self, *objs, raw=False, **_ignored):
        """display(obj, ...): each object's MIME bundle as display_data, as in Jupyter."""
        for obj in objs:
            if raw and isinstance(obj, dict):
                data = {str(k): _mime_value(str(k), v) for k, v in obj.items()}
                data = {k: v for k, v in data.items() if v is not None}
                data.setdefault("text/plain", "")
            else:
                data = mime_bundle(obj)
            self.report({"type": "result", "kind": "display_data", "data": data})

    # --- matplotlib ---------------------------------------------------------------------------------------------
    def patch_pyplot(self, pyplot):
        def show(*args, **kwargs):
            self.flush_figures()
        show.__doc__ = "Emit the open figures as display_data (sandboxd kernel)."
        pyplot.show = show

    def flush_figures(self):
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        for num in list(pyplot.get_fignums()):
            fig = pyplot.figure(num)
            try:
                data = {"image/png": _figure_png(fig), "text/plain": _plain_text(fig)}
            finally:
                pyplot.close(fig)
            self.report({"type": "result", "kind": "display_data", "data": data})

    # --- one cell -----------------------------------------------------------------------------------------------
    def run_coroutine_or_value(self, code):
        value = eval(code, self.ns)
        if code.co_flags & CO_COROUTINE:    # top-level await
            if self.loop is None:
                import asyncio
                self.loop = asyncio.new_event_loop()
            value = self.loop.run_until_complete(value)
        return value

    def execute(self, source, count):
        filename = "<cell-%d>" % count
        lines = source.splitlines(True)
        linecache.cache[filename] = (len(source), None, lines, filename)
        flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
        tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST | flags, dont_inherit=True)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body.pop()
        if tree.body:
            self.run_coroutine_or_value(compile(tree, filename, "exec", flags, dont_inherit=True))
        if last is None:
            return
        expr = ast.Expression(last.value)
        value = self.run_coroutine_or_value(compile(expr, filename, "eval", flags, dont_inherit=True))
        # A trailing ';' silences the result, as in Jupyter.
        tail = lines[last.end_lineno - 1][last.end_col_offset:] if last.end_lineno <= len(lines) else ""
        if value is None or tail.lstrip().startswith(";"):
            return
        self.ns["___"] = self.ns.get("__")
        self.ns["__"] = self.ns.get("_")
        self.ns["_"] = value
        self.report({"type": "result", "kind": "execute_result", "data": mime_bundle(value)})

    def run_cell(self, code_fd, stdout_fd, stderr_fd, report_fd, count):
        error = None
        self.report_fd = report_fd
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        sys.stdout, sys.stderr = self.stdout, self.stderr   # a previous cell may have replaced them
        signal.signal(signal.SIGINT, self.on_sigint)          # ... or the handler
        self.interruptible = True
        try:
            try:
                source = _read_all(code_fd).decode("utf-8")
                try:
                    self.execute(source, count)
                except BaseException:
                    self.flush_figures_quietly()
                    raise
                self.flush_figures()
            except BaseException as exc:    # the cell's error, SystemExit and KeyboardInterrupt included
                error = exc
            finally:
                self.interruptible = False
        except KeyboardInterrupt as exc:    # the interrupt landed in the handler above
            error = exc
        self.interruptible = False
        if error is not None:
            self.report(_error_report(error))
            error = None
        self.report({"type": "done"})

    def flush_figures_quietly(self):
        try:
            self.flush_figures()
        except Exception:
            pass

    def end_cell(self, fds):
        # First: once report_w closes the daemon may consider the kernel idle and interrupt-safe.
        signal.signal(signal.SIGINT, self.on_sigint)
        for stream in (sys.stdout, sys.stderr, self.stdout, self.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        with self.report_lock:
            self.report_fd = None
        os.dup2(self.devnull, 1)
        os.dup2(self.devnull, 2)
        for fd in fds:
            _close(fd)

    # --- the control loop ---------------------------------------------------------------------------------------
    def handle(self, msg, fds):
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "cell" and len(fds) == 4:
            count = msg.get("count")
            count = count if isinstance(count, int) and not isinstance(count, bool) else 0
            try:
                self.run_cell(fds[0], fds[1], fds[2], fds[3], count)
            finally:
                self.end_cell(fds)
        elif op == "ping" and len(fds) == 1:
            self.report_fd = fds[0]
            try:
                self.report({"type": "pong"})
            finally:
                self.end_cell(fds)
        else:       # not a request this kernel knows: drop it and its fds
            for fd in fds:
                _close(fd)

    def serve(self, sock):
        while True:
            msg, fds = _receive(sock)
            if msg is None:
                return
            try:
                self.handle(msg, fds)
            except KeyboardInterrupt:   # a late interrupt, outside any cell: ignored by contract
                pass


def _read_all(fd):
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _receive(sock):
    """The next request as (dict or garbage, fds), or (None, []) at EOF."""
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4),
                                               getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    except (ConnectionResetError, BrokenPipeError):
        return None, []
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4))
    if not data and not fds:
        return None, []
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            _close(fd)
        return {}, []
    try:
        return json.loads(data.decode("utf-8")), fds
    except ValueError:
        return {}, fds


def main():
    # Before any cell: a headless backend, whatever the cell imports.
    os.environ["MPLBACKEND"] = "Agg"
    os.set_inheritable(CONTROL_FD, False)    # a cell's children must not reach the control socket
    sock = socket.socket(fileno=CONTROL_FD)
    kernel = Kernel()
    signal.signal(signal.SIGINT, kernel.on_sigint)
    os.dup2(kernel.devnull, 0)              # input() gets EOF rather than waiting on nothing
    os.dup2(kernel.devnull, 1)
    os.dup2(kernel.devnull, 2)
    kernel.serve(sock)
    # Now, not at interpreter exit: a thread a cell left running must not keep a closed session's kernel alive.
    os._exit(0)


if __name__ == "__main__":
    main()
