"""Network by policy: egress through the daemon's recording proxy (docs/network.md).

The "internet" is a network namespace this module creates, joined to the host by a veth pair on a private /30,
holding an HTTP package index, an HTTPS server with a test CA and a raw TCP port (egress_internet.py). Names
resolve through the proxy's static resolver. Nothing is sent anywhere but to that namespace and to loopback.
The daemon is real, the runs are real sandboxes; each property below fails when its mechanism is removed.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import urllib.request
import zipfile

import pytest

HERE = pathlib.Path(__file__).resolve().parent
N = os.getpid() % 250 + 1
NS = f"sbxnet{os.getpid()}"
HOST_IF, NS_IF = f"sbxh{os.getpid()}"[:15], f"sbxn{os.getpid()}"[:15]
HOST_IP, NET_IP = f"10.213.{N}.1", f"10.213.{N}.2"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _wheel(path: pathlib.Path) -> None:
    files = {"sbxdemo/__init__.py": b"VALUE = 42\n",
             "sbxdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: sbxdemo\nVersion: 1.0\n",
             "sbxdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "sbxdemo-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("sbxdemo-1.0.dist-info/RECORD", record)


def _pki(d: pathlib.Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("openssl", "req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-subj",
       "/CN=sandboxd test CA", "-days", "2")
    sh("openssl", "req", *ec, "-keyout", str(d / "api.key"), "-out", str(d / "api.csr"), "-subj", "/CN=api.test")
    (d / "ext").write_text("subjectAltName=DNS:api.test\n")
    sh("openssl", "x509", "-req", "-in", str(d / "api.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
       "-CAcreateserial", "-out", str(d / "api.pem"), "-days", "2", "-extfile", str(d / "ext"))


@pytest.fixture(scope="module")
def internet(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    d = tmp_path_factory.mktemp("internet")
    _pki(d)
    _wheel(d / "sbxdemo-1.0-py3-none-any.whl")
    sh("ip", "netns", "add", NS)
    proc = None
    try:
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "addr", "add", f"{NET_IP}/30", "dev", NS_IF)
        sh("ip", "-n", NS, "link", "set", NS_IF, "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, str(HERE / "egress_internet.py"), str(d)],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        yield d
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)


class Loopback:
    """A listener of the host's loopback that counts the connections it gets: the proxy must never connect."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            while True:
                c, _ = self.sock.accept()
                self.accepted += 1
                c.close()


@pytest.fixture(scope="module")
def loopback():
    lb = Loopback()
    yield lb
    lb.sock.close()


def egress_config(loopback_port: int, extra: str = "") -> str:
    return f"""
[egress]
resolver = "static"
[egress.hosts]
"pypi.test" = "{NET_IP}"
"api.test" = "{NET_IP}"
"rebind.test" = "127.0.0.1"
"meta.test" = "169.254.169.254"

[[principals]]
name = "root"
unix_uids = [0]
roles = ["admin"]

[[policies]]
name = "agents"
principals = ["root"]
network = "egress"
egress_allow = ["pypi.test:8080", "api.test:8443", "rebind.test:{loopback_port}", "meta.test:80",
                "127.0.0.1:{loopback_port}", "[::1]:{loopback_port}"]
egress_allow_networks = ["{NET_IP}/32"]
{extra}
"""


@pytest.fixture(scope="module")
def egress_daemon(internet, loopback, tmp_path_factory):
    from conftest import Daemon, _check_stopped
    d = Daemon(tmp_path_factory.mktemp("sandboxd-egress"), egress_config(loopback.port))
    try:
        yield d
    finally:
        _check_stopped(d)


def run(d, code: str, files=None, **limits):
    with d.client() as c:
        r = c.run(textwrap.dedent(code), files=files or {}, **limits)
    assert (r.outcome, r.exit_code) == ("exited", 0), (r, r.stderr.decode(errors="replace")[-3000:])
    return json.loads(r.stdout.decode().splitlines()[-1]), r.run_id


PRELUDE = """
import errno, json, os, socket, ssl, subprocess, sys, urllib.error, urllib.request
out = {}
def fetch(url, **kw):
    try:
        with urllib.request.urlopen(url, timeout=20, **kw) as r:
            return [r.status, r.read().decode(errors="replace")[:200]]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace")[:300]]
    except Exception as e:
        return [type(e).__name__, str(e)[:300]]
def connect(host, port):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n\\r\\n".encode())
    return s.recv(4096).decode(errors="replace").split("\\r\\n")[0]
def err(fn, *a, **kw):
    try:
        fn(*a, **kw)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
"""


def events(d, run_id: str) -> list[dict]:
    db = sqlite3.connect(f"file:{d.state_dir}/sandboxd.db?mode=ro", uri=True)
    try:
        return [json.loads(t) for (t,) in db.execute(
            "SELECT data FROM events WHERE kind = 'egress.connection' AND run_id = ? ORDER BY seq", (run_id,))]
    finally:
        db.close()


def scrape(d) -> dict[str, float]:
    import re
    port = int(re.search(r"metrics http://127\.0\.0\.1:(\d+)", d.log()).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("sandboxd_egress_")}


def test_allowed_https_request_and_plain_http_work(egress_daemon, internet):
    out, run_id = run(egress_daemon, PRELUDE + """
ctx = ssl.create_default_context(cafile="/work/ca.pem")
out["https"] = fetch("https://api.test:8443/hello", context=ctx)
out["http"] = fetch("http://pypi.test:8080/hello")
out["env"] = [os.environ.get(k) for k in ("HTTP_PROXY", "https_proxy", "NO_PROXY")]
print(json.dumps(out))
""", files={"ca.pem": (internet / "ca.pem").read_bytes()})
    assert out["https"] == [200, "hello over tls"]
    assert out["http"] == [200, "hello"]
    assert out["env"] == ["http://127.0.0.1:3128", "http://127.0.0.1:3128", "localhost,127.0.0.1,::1"]
    seen = events(egress_daemon, run_id)
    assert [(e["mode"], e["destination"], e["port"], e["address"], e["decision"], e["rule"]) for e in seen] == [
        ("connect", "api.test", 8443, NET_IP, "allowed", "allow:api.test:8443"),
        ("http", "pypi.test", 8080, NET_IP, "allowed", "allow:pypi.test:8080")]
    assert all(e["principal"] == "root" and e["bytes_in"] > 0 and e["bytes_out"] > 0 for e in seen)
    rec = egress_daemon.client().get_run(run_id)
    assert rec["egress"]["connections"] == {"allowed": 2, "denied": 0, "error": 0}
    assert rec["spec"]["network"] == "egress"


def test_pip_installs_a_wheel_through_the_proxy(egress_daemon):
    if subprocess.run(["/usr/bin/python3", "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("the host image has no pip (Debian: python3-pip)")
    out, run_id = run(egress_daemon, PRELUDE + """
p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                    "--index-url", "http://pypi.test:8080/simple/", "--trusted-host", "pypi.test",
                    "--target", "/tmp/site", "sbxdemo"], capture_output=True, text=True)
out["pip"] = p.returncode, p.stderr[-1500:]
sys.path.insert(0, "/tmp/site")
import sbxdemo
out["value"] = sbxdemo.VALUE
print(json.dumps(out))
""", wall_time=120, cpu_time=120, memory=512 << 20)
    assert out["pip"][0] == 0, out["pip"][1]
    assert out["value"] == 42
    seen = events(egress_daemon, run_id)
    assert {e["decision"] for e in seen} == {"allowed"} and len(seen) >= 2


def test_a_session_gets_egress_in_exec_calls_and_code_cells(egress_daemon, internet):
    """pip installs in one call, the package imports in the next and in a cell, a cell makes an allowed HTTPS
    request, a denied name fails; the proxy variables are forced over the caller's; every connection is an
    event under the session's id and the session's record sums them up."""
    if subprocess.run(["/usr/bin/python3", "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("the host image has no pip (Debian: python3-pip)")
    with egress_daemon.client() as c:
        with c.session(runner="python", memory=512 << 20, wall_time=120, cpu_time=120,
                       env={"HTTPS_PROXY": "http://127.0.0.1:9"},
                       files={"ca.pem": (internet / "ca.pem").read_bytes()}) as s:
            pip = s.exec(["/usr/bin/python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                          "--index-url", "http://pypi.test:8080/simple/", "--trusted-host", "pypi.test",
                          "--target", "/work/site", "sbxdemo"],
                         env={"http_proxy": "http://127.0.0.1:9"})
            assert (pip.outcome, pip.exit_code) == ("exited", 0), pip.stderr.decode(errors="replace")[-1500:]
            later = s.exec(["/usr/bin/python3", "-c", "import sys; sys.path.insert(0, '/work/site'); import sbxdemo; "
                            "import os; print(sbxdemo.VALUE, os.environ['HTTPS_PROXY'], os.environ['http_proxy'])"])
            assert later.stdout.decode().split() == ["42", "http://127.0.0.1:3128", "http://127.0.0.1:3128"], later
            cell = s.run_code(PRELUDE + textwrap.dedent("""
                import sys; sys.path.insert(0, "/work/site"); import sbxdemo
                ctx = ssl.create_default_context(cafile="/work/ca.pem")
                out["value"] = sbxdemo.VALUE
                out["https"] = fetch("https://api.test:8443/hello", context=ctx)
                out["denied"] = fetch("https://evil.test:443/", context=ctx)
                with ctx.wrap_socket(socket.create_connection(("192.0.2.1", 8443), timeout=20),
                                     server_hostname="api.test") as t:   # ignoring the proxy: transparent
                    t.sendall(b"GET /hello HTTP/1.1\\r\\nHost: api.test\\r\\nConnection: close\\r\\n\\r\\n")
                    out["transparent"] = t.recv(4096).decode().split("\\r\\n")[0]
                print(json.dumps(out))
                """))
            assert cell.error is None, cell.error
            out = json.loads(cell.stdout.splitlines()[-1])
            assert out["value"] == 42 and out["https"] == [200, "hello over tls"]
            assert out["denied"][0] == "URLError" and "403" in out["denied"][1], out["denied"]
            assert out["transparent"] == "HTTP/1.0 200 OK"   # http.server answers 1.0
            sid = s.id
        seen = events(egress_daemon, sid)
        assert {e["principal"] for e in seen} == {"root"} and {e["policy"] for e in seen} == {"agents"}
        rows = [(e["destination"], e["port"], e["decision"], e["rule"]) for e in seen]
        assert ("pypi.test", 8080, "allowed", "allow:pypi.test:8080") in rows
        assert rows[-3:] == [("api.test", 8443, "allowed", "allow:api.test:8443"),
                             ("evil.test", 443, "denied", "not-allowed"),
                             ("api.test", 8443, "allowed", "allow:api.test:8443")]
        assert seen[-1]["mode"] == "transparent" and seen[-1]["original_address"] == "192.0.2.1"
        rec = c.get_run(sid)
        assert rec["kind"] == "session" and rec["egress"]["connections"]["denied"] == 1
        assert rec["egress"]["connections"]["allowed"] == len(seen) - 1 >= 4


def test_everything_else_fails_and_each_attempt_is_recorded(egress_daemon, loopback):
    before = scrape(egress_daemon)
    p = loopback.port
    out, run_id = run(egress_daemon, PRELUDE + f"""
out["denied_name"] = fetch("http://evil.test:8080/")
out["denied_port"] = connect("api.test", 9000)
out["ip_via_proxy"] = connect("{NET_IP}", 8443)
out["loopback_via_proxy"] = connect("127.0.0.1", {p})
out["loopback_v6_via_proxy"] = connect("[::1]", {p})
out["loopback_direct"] = err(socket.create_connection, ("127.0.0.1", {p}), timeout=5)
out["rebind"] = connect("rebind.test", {p})
out["metadata"] = connect("meta.test", 80)
out["udp"] = err(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto, b"x", ("{NET_IP}", 53))
out["ipv6"] = err(socket.create_connection, ("fd00::1", 443), timeout=5)
out["dns"] = err(socket.getaddrinfo, "api.test", 443)
print(json.dumps(out))
""")
    forbidden = "HTTP/1.1 403 Forbidden"
    assert out["denied_name"][0] == 403 and "not in the egress allowlist of policy 'agents'" in out["denied_name"][1]
    for key in ("denied_port", "ip_via_proxy", "loopback_via_proxy", "loopback_v6_via_proxy", "rebind", "metadata"):
        assert out[key] == forbidden, (key, out[key])
    assert out["udp"] == "EPERM"          # dropped by the run's loopback-only rule (transparent mode)
    assert out["ipv6"] == "ENETUNREACH"   # no IPv6 route at all
    assert out["loopback_direct"] == "ECONNREFUSED"   # the run's own loopback, not the host's
    assert out["dns"] != "ok"
    assert loopback.accepted == 0, "the proxy connected to a refused address"
    seen = [(e["destination"], e["port"], e["decision"], e["rule"]) for e in events(egress_daemon, run_id)]
    assert seen == [
        ("evil.test", 8080, "denied", "not-allowed"),
        ("api.test", 9000, "denied", "not-allowed"),
        (NET_IP, 8443, "denied", "not-allowed"),
        ("127.0.0.1", p, "denied", "address:loopback"),
        ("::1", p, "denied", "address:loopback"),
        ("rebind.test", p, "denied", "address:loopback"),
        ("meta.test", 80, "denied", "address:link-local"),
    ]
    meta = events(egress_daemon, run_id)[-1]
    assert meta["address"] == "169.254.169.254" and meta["bytes_in"] == meta["bytes_out"] == 0
    rec = egress_daemon.client().get_run(run_id)
    assert rec["egress"]["connections"] == {"allowed": 0, "denied": 7, "error": 0}
    assert [c["destination"] for c in rec["egress"]["listed"]][:2] == ["evil.test", "api.test"]
    show = subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "--target", egress_daemon.target, "runs", "show",
                           run_id], capture_output=True, text=True, timeout=60)
    assert "denied   meta.test:80 (169.254.169.254) address:link-local" in show.stdout, show.stdout
    after = scrape(egress_daemon)
    key = 'sandboxd_egress_connections_total{decision="denied"}'
    assert after[key] - before.get(key, 0) == 7


def test_programs_that_ignore_proxy_settings_are_redirected_and_judged_by_name(egress_daemon, internet, loopback):
    """Transparent mode: TCP to any outside address lands at the proxy, which takes the name from SNI or Host,
    checks it and connects to the address it resolves itself (every name below points the program at
    192.0.2.1, which no one serves); no name, no connection."""
    out, run_id = run(egress_daemon, PRELUDE + f"""
import urllib.request
ctx = ssl.create_default_context(cafile="/work/ca.pem")
real = socket.getaddrinfo
socket.getaddrinfo = lambda host, *a, **k: real("192.0.2.1" if host.endswith(".test") else host, *a, **k)
direct = urllib.request.build_opener(urllib.request.ProxyHandler({{}}), urllib.request.HTTPSHandler(context=ctx))
def get(url):
    try:
        with direct.open(url, timeout=20) as r:
            return [r.status, r.read().decode(errors="replace")[:200]]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace")[:300]]
    except Exception as e:
        return [type(e).__name__, str(e)[:300]]
def raw(host, port, data):
    try:
        with socket.create_connection((host, port), timeout=20) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            return got.decode(errors="replace").split("\\r\\n")[0]
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
def no_sni(host, port):
    bare = ssl.create_default_context(cafile="/work/ca.pem")
    bare.check_hostname = False
    try:
        with socket.create_connection((host, port), timeout=20) as s, bare.wrap_socket(s) as t:
            return "handshake"
    except Exception as e:
        return type(e).__name__
out["https"] = get("https://api.test:8443/hello")
out["http"] = get("http://pypi.test:8080/hello")
out["denied_https"] = get("https://evil.test:8443/")
out["denied_http"] = get("http://evil.test:8080/")
out["ip_no_sni"] = no_sni("{NET_IP}", 8443)
out["raw"] = raw("{NET_IP}", 9000, b"hello\\n")
out["metadata"] = raw("169.254.169.254", 80, b"GET / HTTP/1.1\\r\\nHost: meta.test\\r\\n\\r\\n")
out["listener"] = raw("127.0.0.1", 3129, b"GET / HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n")
out["env"] = os.environ["HTTPS_PROXY"]
out["ifaces"] = sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:])
print(json.dumps(out))
""", files={"ca.pem": (internet / "ca.pem").read_bytes()})
    assert out["https"] == [200, "hello over tls"] and out["http"] == [200, "hello"], out
    assert out["denied_https"][0] in ("URLError", "SSLError", "ConnectionResetError", "RemoteDisconnected"), out
    assert out["denied_http"][0] == 403 and "not in the egress allowlist of policy 'agents'" in out["denied_http"][1]
    assert out["ip_no_sni"] != "handshake" and out["raw"] in ("", "ECONNRESET"), out
    assert out["metadata"] == "HTTP/1.1 403 Forbidden" and out["listener"] in ("", "ECONNRESET"), out
    assert out["env"] == "http://127.0.0.1:3128" and out["ifaces"] == ["lo"]
    assert loopback.accepted == 0
    seen = events(egress_daemon, run_id)
    assert [(e["mode"], e.get("via"), e["destination"], e["port"], e.get("original_address"), e["address"],
             e["decision"], e["rule"]) for e in seen] == [
        ("transparent", "sni", "api.test", 8443, "192.0.2.1", NET_IP, "allowed", "allow:api.test:8443"),
        ("transparent", "host", "pypi.test", 8080, "192.0.2.1", NET_IP, "allowed", "allow:pypi.test:8080"),
        ("transparent", "sni", "evil.test", 8443, "192.0.2.1", None, "denied", "not-allowed"),
        ("transparent", "host", "evil.test", 8080, "192.0.2.1", None, "denied", "not-allowed"),
        ("transparent", "sni", None, 8443, NET_IP, None, "denied", "no-name"),
        ("transparent", "unknown", None, 9000, NET_IP, None, "denied", "no-name"),
        ("transparent", "host", "meta.test", 80, "169.254.169.254", "169.254.169.254", "denied", "address:link-local"),
        ("transparent", None, None, 3129, "127.0.0.1", None, "denied", "bad-request"),
    ]
    assert seen[0]["bytes_in"] > 0 and seen[0]["principal"] == "root"
    show = subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "--target", egress_daemon.target, "runs", "show",
                           run_id], capture_output=True, text=True, timeout=60)
    assert f"denied   -:9000 (-) no-name in=0 out=0 via:unknown to:{NET_IP}" in show.stdout, show.stdout


def test_another_runs_loopback_is_out_of_reach(egress_daemon):
    """Run A listens on its own 127.0.0.1; run B (same policy) reaches neither it directly nor via the proxy."""
    ready = threading.Event()
    result = {}

    def run_a():
        with egress_daemon.client() as c:
            for ev in c.execute(textwrap.dedent("""
                import socket, time
                s = socket.create_server(("127.0.0.1", 7000))
                print("listening", flush=True)
                s.settimeout(8)
                try:
                    s.accept()
                    print("accepted")
                except OSError:
                    print("nobody came")
            """), wall_time=15):
                if getattr(ev, "stream", None) == "stdout":
                    result.setdefault("out", b"")
                    result["out"] += ev.data
                    ready.set()

    t = threading.Thread(target=run_a)
    t.start()
    assert ready.wait(30)
    out, _ = run(egress_daemon, PRELUDE + """
out["direct"] = err(socket.create_connection, ("127.0.0.1", 7000), timeout=5)
out["proxy"] = connect("127.0.0.1", 7000)
print(json.dumps(out))
""")
    t.join(30)
    assert out == {"direct": "ECONNREFUSED", "proxy": "HTTP/1.1 403 Forbidden"}
    assert b"nobody came" in result["out"]


def test_byte_cap_cuts_a_download(internet, loopback, start_daemon):
    d = start_daemon(egress_config(loopback.port, 'egress_max_bytes_in = "64KiB"'))
    out, run_id = run(d, PRELUDE + """
out["big"] = fetch("http://pypi.test:8080/big")
print(json.dumps(out))
""")
    assert out["big"][0] == "IncompleteRead", out
    (e,) = events(d, run_id)
    assert (e["decision"], e["cut"], e["bytes_in"]) == ("allowed", "bytes_in", 64 << 10)


def test_without_transparent_mode_direct_connections_have_no_route(internet, loopback, start_daemon):
    """egress_transparent = false: the explicit proxy only, no route, no redirect, no second listener."""
    d = start_daemon(egress_config(loopback.port, "egress_transparent = false"))
    out, run_id = run(d, PRELUDE + f"""
out["proxy"] = fetch("http://pypi.test:8080/hello")
out["direct"] = err(socket.create_connection, ("{NET_IP}", 8080), timeout=5)
out["transparent_listener"] = err(socket.create_connection, ("127.0.0.1", 3129), timeout=5)
out["udp"] = err(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto, b"x", ("{NET_IP}", 53))
print(json.dumps(out))
""")
    assert out == {"proxy": [200, "hello"], "direct": "ENETUNREACH", "transparent_listener": "ECONNREFUSED",
                   "udp": "ENETUNREACH"}
    assert [e["mode"] for e in events(d, run_id)] == ["http"]


def test_runs_without_egress_keep_lo_only(start_daemon, loopback):
    """A policy without network (the default) gets no listener and no proxy variables."""
    d = start_daemon()
    out, _ = run(d, PRELUDE + """
out["proxy"] = err(socket.create_connection, ("127.0.0.1", 3128), timeout=5)
out["env"] = [k for k in os.environ if k.lower().endswith("_proxy")]
out["ifaces"] = sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:])
print(json.dumps(out))
""")
    assert out == {"proxy": "ECONNREFUSED", "env": [], "ifaces": ["lo"]}
