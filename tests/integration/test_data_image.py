"""The python-data image (images/python-data, built by `make image-data`) and its runner: numpy, pandas, matplotlib
and Pillow import and work inside a real sandbox, and the session kernel gives their rich results there."""
from __future__ import annotations

import json
import os
import pathlib

import pytest

from sandboxd import kernel

ROOTFS = pathlib.Path(__file__).resolve().parents[2] / "images" / "python-data" / "rootfs"


@pytest.fixture
def data(sandbox):
    if not (ROOTFS / ".sandboxd-image").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must build the python-data image first (make image-data)")
        pytest.skip("the python-data image is not built (make image-data)")
    return sandbox


def test_data_stack_imports_and_renders(data):
    code = ("import os, io, numpy, pandas, matplotlib, PIL.Image\n"
            "import matplotlib.pyplot as plt\n"
            "df = pandas.DataFrame({'x': numpy.arange(4), 'y': numpy.arange(4) ** 2})\n"
            "fig, ax = plt.subplots(); df.plot(x='x', y='y', ax=ax)\n"
            "buf = io.BytesIO(); fig.savefig(buf, format='png')\n"
            "print(matplotlib.get_backend(), int(df['y'].sum()), PIL.Image.open(buf).format, os.getuid() >= 1000)\n"
            "print(sorted(os.listdir('/work')))")
    r = data.run(code, "python-data")
    assert r.outcome == "exited" and r.exit_code == 0, (r, r.stderr)
    first, listing = r.stdout.decode().splitlines()
    assert first.split() == ["agg", "14", "PNG", "True"]
    assert listing == "['main.py']", "matplotlib's caches belong in /tmp, not in the workspace"


# Runs inside the sandbox: starts the kernel the way a session does (fd 3, memfd, pipes) and prints its reports.
DRIVER = r'''
import json, os, socket, subprocess, sys
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
kernel = subprocess.Popen([sys.executable, "-I", "-u", "python_kernel.py"], pass_fds=(3,),
                          preexec_fn=lambda: os.dup2(theirs.fileno(), 3))
theirs.close()
for count, code in enumerate(json.loads(sys.stdin.read()), 1):
    memfd = os.memfd_create("cell")
    os.write(memfd, code.encode())
    out_r, out_w = os.pipe(); err_r, err_w = os.pipe(); rep_r, rep_w = os.pipe()
    socket.send_fds(ours, [json.dumps({"op": "cell", "id": str(count), "count": count}).encode()],
                    [memfd, out_w, err_w, rep_w])
    for fd in (memfd, out_w, err_w, rep_w):
        os.close(fd)
    reports = [json.loads(line) for line in os.fdopen(rep_r, "rb").read().splitlines()]
    print(json.dumps({"reports": reports, "stdout": os.fdopen(out_r).read(), "stderr": os.fdopen(err_r).read()}))
ours.close()
sys.exit(kernel.wait())
'''


def test_kernel_gives_html_for_a_dataframe_and_png_for_a_plot(data):
    cells = ["import pandas as pd\ndf = pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})\ndf",
             "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\ndisplay('after show')\n"
             "plt.figure(figsize=(2, 2))\nplt.plot([1])\nplt.title('t')"]
    r = data.run(DRIVER, "python-data", stdin=json.dumps(cells).encode(),
                 files={"python_kernel.py": kernel.source()})
    assert r.outcome == "exited" and r.exit_code == 0, (r, r.stderr)
    frame, plot = (json.loads(line) for line in r.stdout.decode().splitlines())
    (result,) = [x for x in frame["reports"] if x["type"] == "result"]
    assert result["kind"] == "execute_result"
    assert "<table" in result["data"]["text/html"] and "a  b" in result["data"]["text/plain"]
    # plt.show() emits the open figure where it is called; the figure still open at the end follows the result.
    shown, between, result, last, done = plot["reports"]
    assert between == {"type": "result", "kind": "display_data", "data": {"text/plain": "'after show'"}}
    assert result["kind"] == "execute_result" and result["data"]["text/plain"] == "Text(0.5, 1.0, 't')"
    assert done == {"type": "done"}
    assert shown["data"]["text/plain"] == "<Figure size 640x480 with 1 Axes>"
    assert last["data"]["text/plain"] == "<Figure size 200x200 with 1 Axes>"
    for figure in (shown, last):
        assert figure["kind"] == "display_data" and figure["data"]["image/png"].startswith("iVBORw0KGgo")
