"""The session's Python kernel (sandboxd/kernel/python_kernel.py), driven over its real protocol: the image's
/usr/bin/python3 runs the file with a SOCK_SEQPACKET socketpair on fd 3, and each cell gets a real memfd and real
pipes. No sandbox here: what the kernel does with a cell does not depend on one."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading

import pytest

from sandboxd import kernel as kernel_pkg

PYTHON = "/usr/bin/python3"


class Cell:
    """A cell's three pipes, read to EOF concurrently (a full pipe must not stall the kernel)."""

    def __init__(self):
        self.stdout_r, self.stdout_w = os.pipe2(os.O_CLOEXEC)
        self.stderr_r, self.stderr_w = os.pipe2(os.O_CLOEXEC)
        self.report_r, self.report_w = os.pipe2(os.O_CLOEXEC)
        self.out: dict[int, bytearray] = {fd: bytearray() for fd in (self.stdout_r, self.stderr_r, self.report_r)}
        self.order: list[tuple[str, bytes]] = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        names = {self.stdout_r: "stdout", self.stderr_r: "stderr", self.report_r: "report"}
        open_fds = set(names)
        while open_fds:
            ready, _, _ = select.select(list(open_fds), [], [])
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                    continue
                self.out[fd] += data
                self.order.append((names[fd], data))

    def wait(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the cell's pipes never reached EOF"
        for fd in self.out:
            os.close(fd)

    @property
    def stdout(self) -> str:
        return self.out[self.stdout_r].decode()

    @property
    def stderr(self) -> str:
        return self.out[self.stderr_r].decode()

    @property
    def raw_reports(self) -> bytes:
        return bytes(self.out[self.report_r])

    @property
    def reports(self) -> list[dict]:
        return [json.loads(line) for line in self.raw_reports.splitlines()]

    def results(self, kind=None):
        return [r for r in self.reports if r["type"] == "result" and kind in (None, r["kind"])]

    def error(self):
        errors = [r for r in self.reports if r["type"] == "error"]
        return errors[0] if errors else None


class Kernel:
    def __init__(self):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The control socket goes on fd 3 through bash (dash takes one-digit fds only), not a preexec_fn: that
        # would make Popen fork() this process, whose gRPC threads (from other tests) can abort the child.
        fd = theirs.fileno()
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec 3<&{fd} {fd}<&- "$@"', "bash",
             PYTHON, "-I", "-u", os.path.join(os.path.dirname(kernel_pkg.__file__), "python_kernel.py")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(fd,), cwd="/tmp",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"})
        theirs.close()
        self.count = 0

    def start_cell(self, code: str) -> Cell:
        self.count += 1
        cell = Cell()
        memfd = os.memfd_create("cell", os.MFD_CLOEXEC)
        os.write(memfd, code.encode())
        fds = [memfd, cell.stdout_w, cell.stderr_w, cell.report_w]
        msg = json.dumps({"op": "cell", "id": "call-%d" % self.count, "count": self.count}).encode()
        socket.send_fds(self.sock, [msg], fds)
        for fd in fds:
            os.close(fd)
        return cell

    def run(self, code: str) -> Cell:
        cell = self.start_cell(code)
        cell.wait()
        return cell

    def ping(self) -> list[dict]:
        r, w = os.pipe2(os.O_CLOEXEC)
        socket.send_fds(self.sock, [b'{"op": "ping"}'], [w])
        os.close(w)
        with os.fdopen(r, "rb") as f:
            return [json.loads(line) for line in f.read().splitlines()]

    def wait_for_stdout(self, cell: Cell, fragment: bytes):
        """Until the cell has written `fragment` to its stdout (the cell has reached a known point)."""
        while fragment not in cell.out[cell.stdout_r]:
            assert cell.thread.is_alive(), "the cell ended before printing %r" % fragment
            cell.thread.join(0.02)

    def close(self):
        self.sock.close()       # EOF: an idle kernel exits 0; one stuck in a cell (a failed test) is killed
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def kernel():
    if not os.access(PYTHON, os.X_OK):
        pytest.skip(f"{PYTHON} is missing")
    k = Kernel()
    try:
        yield k
    finally:
        k.close()


def test_source_is_the_kernel_file():
    assert kernel_pkg.source().startswith(b'"""The Python kernel of a session')


def test_state_persists_and_last_expression_is_a_result(kernel):
    assert kernel.run("x = 20").reports == [{"type": "done"}]
    cell = kernel.run("y = x + 1\ny * 2")
    assert cell.reports == [{"type": "result", "kind": "execute_result", "data": {"text/plain": "42"}},
                            {"type": "done"}]
    cell = kernel.run("_ + 1")
    assert cell.results()[0]["data"]["text/plain"] == "43"
    assert kernel.run("(__, ___)").results()[0]["data"]["text/plain"] == "(42, None)"
    # None, an assignment, and a trailing ';' give no result.
    assert kernel.run("None").results() == []
    assert kernel.run("z = 1").results() == []
    assert kernel.run("x;  # silenced").results() == []
    assert kernel.run("__name__").results()[0]["data"]["text/plain"] == "'__main__'"


def test_containers_are_pretty_printed(kernel):
    cell = kernel.run("{'b': list(range(30)), 'a': 1}")
    text = cell.results()[0]["data"]["text/plain"]
    assert text.startswith("{'b': [0,") and text.rstrip().endswith("'a': 1}") and "\n" in text


def test_display_and_rich_reprs(kernel):
    cell = kernel.run(
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_markdown_(self): raise ValueError('broken formatter')\n"
        "    def __repr__(self): return 'Rich()'\n"
        "class Bundle:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/plain': 'B', 'image/svg+xml': '<svg/>'}, {}\n"
        "display(Rich(), 3)\n"
        "print('between')\n"
        "display(Bundle())\n"
        "Rich")
    results = cell.results()
    assert [r["kind"] for r in results] == ["display_data"] * 3 + ["execute_result"]
    assert results[0]["data"] == {"text/html": "<b>rich</b>", "image/png": "iVBORw==",
                                  "application/json": '{"a": [1, 2]}', "text/plain": "Rich()"}
    assert results[1]["data"] == {"text/plain": "3"}
    assert results[2]["data"] == {"text/plain": "B", "image/svg+xml": "<svg/>"}
    # A class is not formatted through its unbound _repr_html_.
    assert results[3]["data"] == {"text/plain": "<class '__main__.Rich'>"}
    assert cell.stdout == "between\n"
    assert "_repr_markdown_ failed: ValueError: broken formatter" in cell.stderr
    assert cell.reports[-1] == {"type": "done"}


def test_traceback_names_the_cell_lines(kernel):
    kernel.run("def f(d):\n    return 1 / d\n")
    cell = kernel.run("a = 1\nf(0)\n")
    err = cell.error()
    assert (err["name"], err["value"]) == ("ZeroDivisionError", "division by zero")
    text = "\n".join(err["traceback"])
    assert 'File "<cell-2>", line 2' in text and "f(0)" in text
    assert 'File "<cell-1>", line 2, in f' in text and "return 1 / d" in text
    assert "python_kernel" not in text
    assert cell.reports[-1] == {"type": "done"} and cell.results() == []


def test_syntax_error_is_an_error(kernel):
    cell = kernel.run("x = (1,\n")
    err = cell.error()
    assert err["name"] == "SyntaxError"
    assert any("<cell-1>" in line for line in err["traceback"])
    assert "python_kernel" not in "\n".join(err["traceback"])
    assert cell.reports[-1] == {"type": "done"}
    assert kernel.run("1 + 1").results()[0]["data"]["text/plain"] == "2"


def test_print_streams_in_order_and_stays_off_the_report_channel(kernel, tmp_path):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    cell = kernel.start_cell(
        "import sys\n"
        "print('first')\n"
        f"open({str(gate)!r}).read()\n"        # holds the cell until the test has seen 'first'

        "print('second', file=sys.stderr)\n"
        "print('{\"type\": \"result\", \"kind\": \"execute_result\", \"data\": {\"text/plain\": \"fake\"}}')\n"
        "print('{\"type\": \"done\"}', file=sys.stderr)\n"
        "'real'")
    kernel.wait_for_stdout(cell, b"first\n")
    assert cell.raw_reports == b""       # printed output arrived before the cell ended, and not as a report
    with open(gate, "w") as f:
        f.write("go")
    cell.wait()
    assert cell.stdout.splitlines() == ["first", '{"type": "result", "kind": "execute_result", '
                                                 '"data": {"text/plain": "fake"}}']
    assert cell.stderr.splitlines() == ["second", '{"type": "done"}']
    assert cell.reports == [{"type": "result", "kind": "execute_result", "data": {"text/plain": "'real'"}},
                            {"type": "done"}]


@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(100)"])
def test_interrupt_raises_keyboard_interrupt_and_the_kernel_survives(kernel, code):
    kernel.run("kept = 'yes'")
    cell = kernel.start_cell("print('running', flush=True)\n" + code)
    kernel.wait_for_stdout(cell, b"running\n")
    os.kill(kernel.proc.pid, signal.SIGINT)
    cell.wait()
    err = cell.error()
    assert err["name"] == "KeyboardInterrupt"
    assert any("<cell-2>" in line for line in err["traceback"])
    assert cell.reports[-1] == {"type": "done"}
    assert kernel.run("kept").results()[0]["data"]["text/plain"] == "'yes'"


def test_sigint_between_cells_is_ignored(kernel):
    kernel.run("v = 7")
    for _ in range(3):
        os.kill(kernel.proc.pid, signal.SIGINT)
    # A ping is answered only after the kernel has received it, so the signals arrived while it waited.
    assert kernel.ping() == [{"type": "pong"}]
    assert kernel.proc.poll() is None
    cell = kernel.run("v")
    assert cell.error() is None and cell.results()[0]["data"]["text/plain"] == "7"


def test_a_cell_resetting_the_sigint_handler_does_not_leave_the_kernel_killable(kernel):
    kernel.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)")
    os.kill(kernel.proc.pid, signal.SIGINT)
    assert kernel.ping() == [{"type": "pong"}]


def test_system_exit_is_an_error_and_the_kernel_survives(kernel):
    cell = kernel.run("import sys\nsys.exit(3)")
    err = cell.error()
    assert (err["name"], err["value"]) == ("SystemExit", "3")
    assert kernel.run("40 + 2").results()[0]["data"]["text/plain"] == "42"


def test_garbage_in_its_own_report_fd_does_not_break_the_next_cell(kernel):
    cell = kernel.run(
        "import os\n"
        "for fd in range(4, 64):\n"
        "    try: os.write(fd, b'garbage\\n{not json')\n"
        "    except OSError: pass\n")
    assert b"garbage" in cell.raw_reports
    cell = kernel.run("'clean'")
    assert cell.reports == [{"type": "result", "kind": "execute_result", "data": {"text/plain": "'clean'"}},
                            {"type": "done"}]


def test_a_thread_printing_after_its_cell_does_not_reach_the_next_cell(kernel):
    kernel.run(
        "import threading, time\n"
        "stop = threading.Event()\n"
        "def chatter():\n"
        "    while not stop.is_set():\n"
        "        print('late'); display('late'); time.sleep(0.01)\n"
        "t = threading.Thread(target=chatter, daemon=True)\n"
        "t.start()\n"
        "time.sleep(0.05)")
    kernel.run("stop.set(); t.join()")
    # The first cell's pipes reached EOF (run() returned) although its thread was still printing.
    cell = kernel.run("print('only me')")
    assert cell.stdout == "only me\n" and cell.reports == [{"type": "done"}]


def test_top_level_await(kernel):
    cell = kernel.run("import asyncio\nawait asyncio.sleep(0)\nawait asyncio.sleep(0, result=5)")
    assert cell.results()[0]["data"]["text/plain"] == "5"


def test_bad_requests_are_dropped_and_the_kernel_serves_on(kernel):
    r, w = os.pipe2(os.O_CLOEXEC)
    socket.send_fds(kernel.sock, [b"not json"], [w])
    socket.send_fds(kernel.sock, [b'{"op": "cell", "count": 1}'], [w])   # too few fds
    os.close(w)
    assert os.read(r, 10) == b""            # every copy of the fd was closed, nothing written
    os.close(r)
    assert kernel.ping() == [{"type": "pong"}]


def test_eof_on_the_control_socket_exits_zero(kernel):
    kernel.run("import threading, time\nthreading.Thread(target=time.sleep, args=(1000,)).start()")
    kernel.sock.close()
    assert kernel.proc.wait(30) == 0


def test_matplotlib_figures_come_back_as_png(kernel):
    probe = subprocess.run([PYTHON, "-c", "import matplotlib"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no matplotlib for /usr/bin/python3 here (the python-data image test covers it)")
    cell = kernel.run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\nplt.figure()\n"
                      "plt.plot([3])\nprint(__import__('matplotlib').get_backend())")
    shown = cell.results("display_data")
    assert len(shown) == 2 and cell.stdout.strip().lower() == "agg"
    assert shown[0]["data"]["text/plain"] == "<Figure size 640x480 with 1 Axes>"
    assert shown[0]["data"]["image/png"].startswith("iVBORw0KGgo")
    assert kernel.run("len(plt.get_fignums())").results()[0]["data"]["text/plain"] == "0"
