"""Who is calling, what they may do, and what the record says about it, against real daemons (no mocks).

Callers come the three ways docs/identity.md describes: unix peer credentials (root here, and uid 65534 from a
subprocess that drops privileges before importing grpc), bearer tokens (over TLS and over the unix socket), and
client certificates (mTLS, from a throwaway CA made here with the openssl CLI). conftest's Daemon writes a
[server] table with exactly one listen address, so the daemons here come from ConfiguredDaemon, which writes
the whole file itself and keeps conftest's cleanup: stopped by pid, no cgroup or process left behind. Their
work directories are world-traversable (pytest's own are not) so the uid-65534 client can reach the socket.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from conftest import ROOT, Daemon, _check_stopped
from sandboxd import __version__
from sandboxd.auth import hash_token, new_token
from sandboxd.client import Client, SandboxdError

NOBODY = 65534
HEX64 = re.compile(r"[0-9a-f]{64}")
TRIAGE = "spiffe://example.org/agent/triage"
BUILDER = "spiffe://example.org/agent/builder"

# Runs as uid/gid 65534 (or another unprivileged uid) with no groups (setpriv drops them before Python starts, so before grpc is imported):
# performs the ops in argv[1] with sandboxd.client and prints one JSON result per op.
NOBODY_CLIENT = r"""
import json, os, sys
from sandboxd.client import Client, SandboxdError
spec = json.loads(sys.argv[1])
assert os.getuid() == os.geteuid() == spec["uid"] and os.getgroups() == []
out = []
with Client(spec["target"], metadata=[tuple(m) for m in spec.get("metadata", [])]) as c:
    for op in spec["ops"]:
        try:
            if op["op"] == "run":
                r = c.run(op["code"], op.get("runner", "python"), wall_time=10)
                out.append({"run_id": r.run_id, "outcome": r.outcome, "stdout": r.stdout.decode()})
            elif op["op"] == "get_run":  # "$N": the run id of op N's result
                run_id = op["run_id"]
                run_id = out[int(run_id[1:])]["run_id"] if run_id.startswith("$") else run_id
                out.append({"record": c.get_run(run_id)})
            elif op["op"] == "list_runs":
                out.append({"runs": c.list_runs(principal=op.get("principal", ""), limit=1000)[0]})
        except SandboxdError as e:
            out.append({"error": e.code, "message": e.message})
print(json.dumps(out))
"""


# -- helpers ------------------------------------------------------------------------------------------------
class ConfiguredDaemon(Daemon):
    """conftest.Daemon with a configuration written whole here: any listen list, [server.tls], identity.

    Same attributes, readiness check and cleanup as conftest's (uid range and cgroup name from its counter, so
    daemons of both kinds in one test process never collide)."""

    def __init__(self, workdir: pathlib.Path, *, tcp: tuple[str, ...] = (), server: str = "", rest: str = ""):
        self._place(workdir)
        self._start(config_text(self, tcp, server, rest))

    def metrics(self) -> str:
        addr = re.search(r"metrics http://(\S+)/metrics", self.log()).group(1)
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def rejected(self, reason: str) -> float:
        m = re.search(rf'^sandboxd_rejected_total{{reason="{reason}"}} (\S+)$', self.metrics(), re.M)
        return float(m.group(1))

    def events(self) -> list[dict]:
        db = sqlite3.connect(f"file:{self.state_dir / 'sandboxd.db'}?mode=ro", uri=True)
        try:
            return [{"seq": s, "kind": k, "run_id": r, "data": json.loads(d)}
                    for s, k, r, d in db.execute("SELECT seq, kind, run_id, data FROM events ORDER BY seq")]
        finally:
            db.close()


def config_text(d: Daemon, tcp: tuple[str, ...], server: str, rest: str) -> str:
    listen = ", ".join(json.dumps(a) for a in (d.target, *tcp))
    # `server` may end with [server.*] tables: everything after it starts with its own table header.
    return (f'[server]\nlisten = [{listen}]\nstate_dir = "{d.state_dir}"\nruntime_dir = "{d.runtime_dir}"\n'
            f'metrics_listen = "127.0.0.1:0"\nshutdown_grace = "5s"\nsocket_mode = "0666"\n{server}\n'
            f'[sandbox]\ncgroup_parent_name = "{d.parent_name}"\nuid_start = {d.uid_start}\n'
            f'uid_count = {d.uid_count}\n\n[admission]\nmax_concurrent = 8\n\n{rest}')


class Daemons:
    """Starts ConfiguredDaemons in world-traversable temp dirs; stops them by pid, then removes the dirs."""

    def __init__(self):
        self.started: list[ConfiguredDaemon] = []
        self.dirs: list[str] = []

    def workdir(self) -> pathlib.Path:
        path = tempfile.mkdtemp(prefix="sandboxd-identity-")
        os.chmod(path, 0o755)  # the uid-65534 client must reach the socket inside
        self.dirs.append(path)
        return pathlib.Path(path)

    def start(self, **kw) -> ConfiguredDaemon:
        d = ConfiguredDaemon(self.workdir(), **kw)
        self.started.append(d)
        return d

    def close(self) -> None:
        errors = []
        try:
            for d in self.started:  # every daemon is stopped, even when an earlier one fails its checks
                try:
                    _check_stopped(d)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{d.target}: {e}")
            assert not errors, "\n".join(errors)
        finally:
            for path in self.dirs:
                shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPENSSL_CNF = """[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""


class Pki:
    """A throwaway CA and the certificates the tests present, made with the openssl CLI (P-256 keys: fast)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        (path / "openssl.cnf").write_text(OPENSSL_CNF)
        self._serial = 1000

    def ca(self, name: str) -> str:
        self._openssl("req", "-x509", "-config", "openssl.cnf", "-extensions", "ca", "-newkey", "ec",
                      "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
                      "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}")
        return str(self.path / f"{name}.pem")

    def cert(self, ca: str, name: str, cn: str, usage: str, san: str = "") -> tuple[str, str]:
        ext = ["basicConstraints = CA:FALSE", "keyUsage = critical,digitalSignature",
               f"extendedKeyUsage = {usage}"] + ([f"subjectAltName = {san}"] if san else [])
        (self.path / f"{name}.ext").write_text("\n".join(ext) + "\n")
        self._openssl("req", "-new", "-config", "openssl.cnf", "-newkey", "ec", "-pkeyopt",
                      "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                      "-subj", f"/CN={cn}")
        self._serial += 1
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                      "-set_serial", str(self._serial), "-days", "2", "-extfile", f"{name}.ext",
                      "-out", f"{name}.pem")
        return str(self.path / f"{name}.pem"), str(self.path / f"{name}.key")

    def _openssl(self, *args: str) -> None:
        p = subprocess.run(["openssl", *args], cwd=self.path, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr}"


def cli_token(principal: str) -> tuple[str, str]:
    """(token, config lines) from `sandboxd token new`, as an operator gets them."""
    p = subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", "token", "new", principal],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    lines = p.stderr[p.stderr.index("[[tokens]]"):]
    assert token.startswith("sbx_") and token not in p.stderr and f'sha256 = "{hash_token(token)}"' in lines
    return token, lines


def as_nobody(target: str, ops: list[dict], metadata: list = (), uid: int = NOBODY) -> tuple[int, list[dict]]:
    """(the client's pid, one result per op) of a client running as uid/gid 65534 (or `uid`) without groups."""
    spec = json.dumps({"target": target, "ops": ops, "metadata": list(metadata), "uid": uid})
    proc = subprocess.Popen(["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                             sys.executable, "-c", NOBODY_CLIENT, spec], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return proc.pid, json.loads(out)


def sandboxctl(target: str, *args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandboxd.cli.ctl", "--target", target, *args], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemons():
    if os.geteuid() != 0:
        pytest.skip("sandboxd tests need root")
    ds = Daemons()
    try:
        yield ds
    finally:
        ds.close()


@pytest.fixture(scope="module")
def pki(daemons):
    p = Pki(daemons.workdir())
    p.ca("ca")
    p.ca("rogue-ca")   # a CA the daemon does not trust
    p.cert("ca", "server", "localhost", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    p.cert("ca", "triage", "triage-agent", "clientAuth", f"URI:{TRIAGE}")
    p.cert("ca", "builder", "builder-agent", "clientAuth", f"URI:{BUILDER}")
    p.cert("ca", "cn-only", "cn-only-agent", "clientAuth")
    p.cert("rogue-ca", "rogue", "triage-agent", "clientAuth", f"URI:{TRIAGE}")
    # Trusted certificates whose CN reads like another kind of identity (see the confusion tests).
    p.cert("ca", "cn-uid0", "unix-uid:0", "clientAuth")
    p.cert("ca", "cn-root", "root", "clientAuth")
    p.cert("ca", "cn-group", "group:ops", "clientAuth")
    return p


def tls_table(pki, require: bool) -> str:
    """TLS on TCP; with require, client certificates from the test CA (grpcio cannot make them optional)."""
    table = f'[server.tls]\ncert = "{pki.path}/server.pem"\nkey = "{pki.path}/server.key"\n'
    if require:
        table += f'client_ca = "{pki.path}/ca.pem"\nrequire_client_cert = true\n'
    return table


@pytest.fixture(scope="module")
def default_daemon(daemons, pki):
    """The built-in access rules (no principals, tokens or policies in the file); TLS on TCP with client
    certificates required."""
    port = free_port()
    d = daemons.start(tcp=(f"127.0.0.1:{port}",), server=tls_table(pki, True))
    d.tcp = f"127.0.0.1:{port}"
    return d


@pytest.fixture(scope="module")
def main(daemons, pki):
    """unix socket + TLS on TCP (client_ca set, client certificates optional), principals, tokens, policies."""
    port = free_port()
    ci_token, ci_lines = cli_token("ci-bot")
    tokens = {name: new_token() for name in ("expired", "limited", "serial", "rated", "private")}
    rest = f"""
[[principals]]
name = "root"
unix_uids = [0]
roles = ["admin"]

[[principals]]
name = "agent-a"
unix_uids = [{NOBODY}]

{ci_lines}
[[tokens]]
principal = "ci-bot"
sha256 = "{hash_token(tokens['expired'])}"
expires = "2020-01-01T00:00:00Z"
""" + "".join(f'\n[[tokens]]\nprincipal = "{p}"\nsha256 = "{hash_token(tokens[p])}"\n'
              for p in ("limited", "serial", "rated", "private")) + f"""
[[policies]]
name = "admins"
principals = ["root"]

[[policies]]
name = "agents"
principals = ["agent-a"]
runners = ["python"]

[[policies]]
name = "ci"
principals = ["ci-bot", "{TRIAGE}"]

[[policies]]
name = "ceilings"
principals = ["limited"]
[policies.limits]
memory = "64MiB"
wall_time = "2s"

[[policies]]
name = "one-at-a-time"
principals = ["serial"]
max_concurrent = 1

[[policies]]
name = "two-a-minute"
principals = ["rated"]
runs_per_minute = 2

[[policies]]
name = "output-not-code"
principals = ["private"]
store_code = false
store_output = true

[audit]
refusal_summary_interval = "1s"
"""
    d = daemons.start(tcp=(f"127.0.0.1:{port}",), server=tls_table(pki, False), rest=rest)
    d.tcp = f"127.0.0.1:{port}"
    d.tokens = {"ci-bot": ci_token, **tokens}
    return d


def tls_client(d, pki, **kw) -> Client:
    return Client(d.tcp, tls_ca=str(pki.path / "ca.pem"), **kw)


def cert_client(d, pki, cert: str) -> Client:
    return tls_client(d, pki, tls_cert=str(pki.path / f"{cert}.pem"), tls_key=str(pki.path / f"{cert}.key"))


# -- unix peer credentials ----------------------------------------------------------------------------------
def test_root_is_allowed_by_the_built_in_default_and_recorded_with_its_pid(default_daemon):
    with default_daemon.client() as c:
        r = c.run("print('hi')")
        rec = c.get_run(r.run_id)
    assert r.outcome == "exited" and r.stdout == b"hi\n"
    assert (rec["principal"], rec["auth_method"], rec["policy"]) == ("root", "unix_peercred", "local-root")
    assert rec["peer"]["uid"] == 0 and rec["peer"]["pid"] == os.getpid()


def test_other_uids_are_denied_by_the_built_in_default_and_recorded(default_daemon):
    pid, (denied,) = as_nobody(default_daemon.target, [{"op": "run", "code": "print('nobody')"}])
    assert denied["error"] == "PERMISSION_DENIED", denied
    assert "'unix:nobody'" in denied["message"] and "no policy" in denied["message"]
    with default_daemon.client() as c:
        runs = [r for r in c.list_runs(principal="unix:nobody", limit=1000)[0]
                if r["code_sha256"] == sha256(b"print('nobody')")]
    assert len(runs) == 1
    rec = runs[0]
    assert (rec["outcome"], rec["reason"], rec["auth_method"]) == ("rejected", "permission_denied", "unix_peercred")
    assert rec["message"] == denied["message"]
    assert rec["peer"]["uid"] == NOBODY and rec["peer"]["pid"] == pid
    assert "policy" not in rec and "code" not in rec  # refused before any policy matched


def test_a_named_uid_runs_within_its_policy_and_reads_only_its_own_runs(main):
    with main.client() as c:
        mine = c.run("print('root')")
    pid, (ok, wrong_runner, others, own, list_others, listing) = as_nobody(main.target, [
        {"op": "run", "code": "import os; print(os.getuid() != 65534)"},
        {"op": "run", "code": "echo hi", "runner": "bash"},
        {"op": "get_run", "run_id": mine.run_id},
        {"op": "get_run", "run_id": "$0"},
        {"op": "list_runs", "principal": "root"},
        {"op": "list_runs"},
    ])
    assert ok["outcome"] == "exited" and ok["stdout"] == "True\n", ok  # the run has its own uid, never 65534
    assert wrong_runner["error"] == "PERMISSION_DENIED" and "'bash'" in wrong_runner["message"], wrong_runner
    assert others["error"] == "NOT_FOUND", others
    assert own["record"]["principal"] == "agent-a" and own["record"]["run_id"] == ok["run_id"]
    assert list_others["error"] == "PERMISSION_DENIED", list_others
    runs = listing["runs"]
    assert {r["principal"] for r in runs} == {"agent-a"}
    assert {ok["run_id"]} <= {r["run_id"] for r in runs} and mine.run_id not in {r["run_id"] for r in runs}
    with main.client() as c:
        rec = c.get_run(ok["run_id"])
        refused = [r for r in c.list_runs(principal="agent-a", outcome="rejected", limit=1000)[0]
                   if r["runner"] == "bash"]
    assert (rec["principal"], rec["auth_method"], rec["policy"]) == ("agent-a", "unix_peercred", "agents")
    assert rec["peer"]["uid"] == NOBODY and rec["peer"]["pid"] == pid
    assert refused and refused[0]["reason"] == "permission_denied"


def test_an_agent_claim_never_changes_the_principal(main):
    _, (ok,) = as_nobody(main.target, [{"op": "run", "code": "print(1)"}],
                         metadata=[("x-agent-name", "root"), ("x-agent-version", "0")])
    with main.client() as c:
        rec = c.get_run(ok["run_id"])
    assert rec["principal"] == "agent-a" and rec["agent"] == {"name": "root", "version": "0"}
    assert rec["policy"] == "agents"


def test_admins_read_every_principals_runs(main):
    with main.client(token=main.tokens["ci-bot"]) as c:
        bot = c.run("pass")
    with main.client() as c:
        mine = c.run("pass")
        seen = {r["run_id"]: r["principal"] for r in c.list_runs(limit=1000)[0]}
        assert c.get_run(bot.run_id)["principal"] == "ci-bot"
    assert seen[bot.run_id] == "ci-bot" and seen[mine.run_id] == "root"
    p = sandboxctl(main.target, "runs", "list", "--json", "--limit", "1000")
    assert p.returncode == 0, p.stderr
    listed = {r["run_id"]: r for r in json.loads(p.stdout)["runs"]}
    assert listed[bot.run_id]["principal"] == "ci-bot" and listed[mine.run_id]["auth_method"] == "unix_peercred"


# -- bearer tokens ------------------------------------------------------------------------------------------
def test_tokens_over_tls_and_the_unix_socket(main, pki):
    token = main.tokens["ci-bot"]
    before = main.rejected("unauthenticated")
    with tls_client(main, pki, token=token) as c:
        r = c.run("print('tls')")
        rec = c.get_run(r.run_id)
    assert r.stdout == b"tls\n"
    assert (rec["principal"], rec["auth_method"], rec["policy"]) == ("ci-bot", "token", "ci")
    assert rec["peer"]["address"].startswith("ipv4:127.0.0.1:")
    # The server certificate names localhost too.
    with tls_client(main, pki, token=token, tls_server_name="localhost") as c:
        assert c.run("pass").ok
    # A token on the unix socket wins over the peer credentials: root holding ci-bot's token acts as ci-bot.
    with main.client(token=token) as c:
        r = c.run("pass")
        assert (c.get_run(r.run_id)["principal"], c.get_run(r.run_id)["auth_method"]) == ("ci-bot", "token")
    failures = {}
    for name, kw in (("wrong", {"token": "sbx_" + "A" * 43}), ("expired", {"token": main.tokens["expired"]}),
                     ("none", {})):
        with tls_client(main, pki, **kw) as c, pytest.raises(SandboxdError) as e:
            c.run("print('never')")
        failures[name] = e.value
    assert {e.code for e in failures.values()} == {"UNAUTHENTICATED"}
    assert "not recognised" in failures["wrong"].message
    assert "expired" in failures["expired"].message and "2020-01-01" in failures["expired"].message
    assert "no identity" in failures["none"].message
    # Counted, and recorded in a summary event per interval rather than one durable record each (fault 4).
    def summarised() -> dict:
        db = sqlite3.connect(f"file:{main.state_dir / 'sandboxd.db'}?mode=ro", uri=True)
        try:
            rows = [r for data, in db.execute("SELECT data FROM events WHERE kind = 'auth.refused_summary'")
                    for r in json.loads(data)["refusals"]]
        finally:
            db.close()
        return {r["reason"]: r for r in rows if r["peer"] == "ipv4:127.0.0.1"}
    deadline = time.monotonic() + 30
    while not all(e.message in summarised() for e in failures.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(summarised()[e.message]["count"] >= 1 for e in failures.values()), summarised()
    with main.client() as c:
        refused = [r for r in c.list_runs(outcome="rejected", limit=1000)[0] if r["reason"] == "unauthenticated"]
    assert not refused
    assert main.rejected("unauthenticated") - before == 3


def test_insecure_tcp_still_demands_a_token(daemons):
    token, lines = cli_token("ci-bot")
    port = free_port()
    daemons.start(tcp=(f"127.0.0.1:{port}",), server="insecure_tcp = true",
                      rest=f'{lines}\n[[policies]]\nname = "ci"\nprincipals = ["ci-bot"]\n')
    with Client(f"127.0.0.1:{port}") as c, pytest.raises(SandboxdError) as e:
        c.run("pass")
    assert e.value.code == "UNAUTHENTICATED"
    with Client(f"127.0.0.1:{port}", token=token, allow_insecure_token=True) as c:
        r = c.run("print('ok')")
        rec = c.get_run(r.run_id)
    assert r.stdout == b"ok\n" and (rec["principal"], rec["auth_method"]) == ("ci-bot", "token")


def test_sighup_rotates_the_server_certificate_and_refuses_tls_changes_it_cannot_apply(daemons, pki):
    """The same cert/key paths with new contents (how certificates are usually renewed): after SIGHUP, new
    connections get the new certificate. require_client_cert cannot change on a live listener: refused, named."""
    files = daemons.workdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.path / name, files / name)
    pki.ca("ca2")
    pki.cert("ca2", "server2", "localhost", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    token, lines = cli_token("ci-bot")
    port = free_port()
    d = daemons.start(tcp=(f"127.0.0.1:{port}",),
                      server=f'[server.tls]\ncert = "{files}/server.pem"\nkey = "{files}/server.key"\n',
                      rest=f'{lines}\n[[policies]]\nname = "ci"\nprincipals = ["ci-bot"]\n')

    def connects(ca: str) -> bool:
        # A channel of its own, so each call makes a new connection and a new handshake.
        with Client(f"127.0.0.1:{port}", tls_ca=str(pki.path / ca), token=token, tls_server_name="localhost",
                    options=[("grpc.use_local_subchannel_pool", 1)]) as c:
            try:
                c.runners(timeout=10)
                return True
            except SandboxdError as e:
                assert e.code == "UNAVAILABLE", e
                return False
    assert connects("ca.pem") and not connects("ca2.pem")
    for name in ("pem", "key"):
        shutil.copy(pki.path / f"server2.{name}", files / f"server.{name}")
    os.kill(d.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "new TLS connections use" in d.log()), d.log()[-2000:]
    assert connects("ca2.pem") and not connects("ca.pem")
    # What cannot change on a running listener refuses the reload, naming the key; the rotation stays.
    d.config_path.write_text(d.config_path.read_text().replace(
        "[server.tls]\n", f'[server.tls]\nclient_ca = "{pki.path}/ca.pem"\nrequire_client_cert = true\n'))
    os.kill(d.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in d.log()), d.log()[-2000:]
    assert "server.tls.require_client_cert: changes only on restart" in d.log()
    assert connects("ca2.pem")


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_tcp_listener_without_tls_or_insecure_tcp_refuses_to_start(tmp_path):
    cfg = tmp_path / "sandboxd.toml"
    cfg.write_text(f'[server]\nlisten = ["unix://{tmp_path}/s.sock", "127.0.0.1:{free_port()}"]\n'
                   f'state_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n')
    p = subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "server.listen" in p.stderr and "[server.tls]" in p.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything


def test_serve_listen_flag_with_tcp_and_no_tls_refuses_to_start(tmp_path):
    """--listen bypassed the file's check: a plaintext TCP listener opened though insecure_tcp was false."""
    cfg = tmp_path / "sandboxd.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n')
    p = subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", "serve", "--config", str(cfg),
                        "--listen", f"unix://{tmp_path}/s.sock", "--listen", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "--listen 127.0.0.1:" in p.stderr and "[server.tls]" in p.stderr and "insecure_tcp" in p.stderr
    assert not (tmp_path / "state").exists()


# -- client certificates ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls(daemons, pki):
    """TLS that requires a client certificate from the trusted CA."""
    port = free_port()
    rest = f"""
[[principals]]
name = "root"
unix_uids = [0]
roles = ["admin"]

[[principals]]
name = "triage-bot"
cert_ids = ["{TRIAGE}"]

[[principals]]
name = "operator"
unix_uids = [{NOBODY}]
groups = ["ops"]

[[policies]]
name = "admins"
principals = ["root"]

[[policies]]
name = "certs"
principals = ["triage-bot", "{BUILDER}", "x509-cn:cn-only-agent"]

[[policies]]
name = "ops"
principals = ["group:ops"]
"""
    d = daemons.start(tcp=(f"127.0.0.1:{port}",), server=tls_table(pki, True), rest=rest)
    d.tcp = f"127.0.0.1:{port}"
    return d


@pytest.mark.parametrize("cert,principal", [("builder", BUILDER), ("triage", "triage-bot"),
                                            ("cn-only", "x509-cn:cn-only-agent")])
def test_client_certificates_identify_by_uri_san_mapped_name_or_cn(mtls, pki, cert, principal):
    with cert_client(mtls, pki, cert) as c:
        r = c.run("print('cert')")
        rec = c.get_run(r.run_id)
    assert r.stdout == b"cert\n"
    assert (rec["principal"], rec["auth_method"], rec["policy"]) == (principal, "mtls", "certs")
    assert rec["peer"]["certificate"] == {"builder": BUILDER, "triage": TRIAGE, "cn-only": "cn-only-agent"}[cert]


@pytest.mark.parametrize("cert", ["rogue", None])
def test_a_certificate_from_an_untrusted_ca_or_none_fails_the_handshake(mtls, pki, cert):
    kw = {"tls_cert": str(pki.path / f"{cert}.pem"), "tls_key": str(pki.path / f"{cert}.key")} if cert else {}
    with tls_client(mtls, pki, **kw) as c, pytest.raises(SandboxdError) as e:
        c.run("pass", timeout=20)
    assert e.value.code == "UNAVAILABLE"


def test_a_client_ca_without_required_certificates_is_refused(pki, tmp_path):
    """grpcio can only require a client certificate or never ask for one: a client_ca that would silently
    authenticate nobody is a configuration error, not a quiet no-op."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:1"]\n[server.tls]\ncert = "{pki.path}/server.pem"\n'
                   f'key = "{pki.path}/server.key"\nclient_ca = "{pki.path}/ca.pem"\n')
    p = subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", "check-config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "server.tls.require_client_cert" in p.stderr, p.stderr


# An unmapped certificate's id (URI SAN or CN, chosen by whoever requests the certificate) is used verbatim as
# the principal id and as a policy tag, in the same namespace as unix user names and tags like "unix-uid:0".
CONFUSION = ("bug: an unmapped client certificate's CN becomes the principal id and a policy tag verbatim "
             "(auth.Authenticator._cert: tags = {cert id, ...}; pid = cert id), so a certificate from the trusted "
             "CA can pose as another kind of identity: ")


def test_a_certificate_cannot_claim_a_unix_uid(default_daemon, pki):
    with cert_client(default_daemon, pki, "cn-uid0") as c, pytest.raises(SandboxdError) as e:
        c.run("pass")
    assert e.value.code == "PERMISSION_DENIED"


def test_a_certificate_named_root_cannot_read_roots_runs(default_daemon, pki):
    with default_daemon.client() as c:
        run_id = c.run("print('root only')").run_id
    with cert_client(default_daemon, pki, "cn-root") as c:
        with pytest.raises(SandboxdError) as e:
            c.get_run(run_id)
        assert e.value.code == "NOT_FOUND"
        assert run_id not in {r["run_id"] for r in c.list_runs(limit=1000)[0]}


def test_a_certificate_cannot_claim_a_group(mtls, pki):
    with cert_client(mtls, pki, "cn-group") as c, pytest.raises(SandboxdError) as e:
        c.run("pass")
    assert e.value.code == "PERMISSION_DENIED"


# -- policy ceilings ----------------------------------------------------------------------------------------
def test_policy_limits_are_ceilings_and_clamp_the_defaults(main):
    with main.client(token=main.tokens["limited"]) as c:
        for kw, name in (({"memory": 128 << 20}, "limits.memory"), ({"wall_time": 5}, "limits.wall_time")):
            with pytest.raises(SandboxdError) as e:
                c.run("pass", **kw)
            assert e.value.code == "INVALID_ARGUMENT" and name in e.value.message, e.value
        r = c.run("pass")
        lowered = c.run("pass", memory=32 << 20, wall_time=1)
    assert r.ok and r.limits["memory"] == 64 << 20 and r.limits["wall_time"] == 2
    assert lowered.limits["memory"] == 32 << 20 and lowered.limits["wall_time"] == 1


def test_max_concurrent_serialises_one_principal_without_blocking_others(main):
    code = "import time; time.sleep(2); print('done')"
    results = []

    def serial():
        with main.client(token=main.tokens["serial"]) as c:
            results.append(c.run(code))

    threads = [threading.Thread(target=serial) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)     # both serial runs are in: one running, one waiting for its principal's only slot
    with main.client() as c:
        free = c.run("print('free')")
    for t in threads:
        t.join(60)
    assert len(results) == 2 and all(r.ok for r in results), results
    with main.client() as c:
        first, second = sorted((c.get_run(r.run_id) for r in results), key=lambda rec: rec["started_at"])
        other = c.get_run(free.run_id)
    assert second["started_at"] >= first["finished_at"], (first, second)
    assert other["finished_at"] < second["started_at"]   # root did not queue behind serial's waiting run


def test_runs_per_minute(main):
    with main.client(token=main.tokens["rated"]) as c:
        assert c.run("pass").ok and c.run("pass").ok
        with pytest.raises(SandboxdError) as e:
            c.run("pass")
    assert e.value.code == "RESOURCE_EXHAUSTED" and "2 runs per minute" in e.value.message
    assert e.value.retry_after and 0 < e.value.retry_after <= 60
    with main.client() as c:
        refused = c.list_runs(principal="rated", outcome="rejected")[0]
    assert len(refused) == 1 and refused[0]["reason"] == "rate_limited"


# -- records ------------------------------------------------------------------------------------------------
def test_agent_claims_from_sandboxctl_flags_and_environment(main):
    flags = sandboxctl(main.target, "--agent-name", "triage", "--agent-version", "1.2", "run", "--json", "-",
                       stdin="print(1)")
    env = sandboxctl(main.target, "run", "--json", "-", stdin="print(2)",
                     env={"SANDBOXD_AGENT_NAME": "envagent", "SANDBOXD_AGENT_VERSION": "7"})
    for p, agent in ((flags, {"name": "triage", "version": "1.2"}), (env, {"name": "envagent", "version": "7"})):
        assert p.returncode == 0, p.stderr
        run_id = json.loads(p.stdout)["run_id"]
        shown = sandboxctl(main.target, "runs", "show", run_id, "--json")
        assert shown.returncode == 0, shown.stderr
        rec = json.loads(shown.stdout)
        assert rec["agent"] == agent and rec["principal"] == "root"
    with main.client() as c:
        assert [r["agent"]["name"] for r in c.list_runs(agent="envagent")[0]] == ["envagent"]


def test_sandboxctl_lists_runs_by_agent(main):
    ran = sandboxctl(main.target, "--agent-name", "lister", "run", "--json", "-", stdin="print(3)")
    assert ran.returncode == 0, ran.stderr
    listed = sandboxctl(main.target, "runs", "list", "--agent", "lister", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == [json.loads(ran.stdout)["run_id"]]


def test_allowed_run_record_holds_every_key(main):
    code = "import sys\ndata = sys.stdin.read()\nprint('out', len(data))\nprint('err', file=sys.stderr)"
    stdin = b"some input"
    with main.client(agent_name="triage", agent_version="1.2") as c:
        r = c.run(code, stdin=stdin)
        rec = c.get_run(r.run_id)
    shown = sandboxctl(main.target, "runs", "show", r.run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    config_sha = [e["data"]["config_sha256"] for e in main.events() if e["kind"] == "config.loaded"][-1]
    assert r.stdout == b"out 10\n" and r.stderr == b"err\n"
    for view in (rec, json.loads(shown.stdout)):
        assert view["run_id"] == r.run_id
        assert (view["principal"], view["auth_method"], view["policy"]) == ("root", "unix_peercred", "admins")
        assert view["agent"] == {"name": "triage", "version": "1.2"}
        assert view["code_sha256"] == sha256(code.encode()) and view["code"] == code   # admins: store_code
        assert view["stdin_sha256"] == sha256(stdin)
        assert view["limits"]["memory"] == r.limits["memory"] and view["limits"]["wall_time"] == r.limits["wall_time"]
        profile = view["sandbox_profile"]
        assert {"mnt", "pid", "net", "ipc", "uts", "cgroup"} <= set(profile["namespaces"])
        assert profile["seccomp"] == "default" and HEX64.fullmatch(profile["seccomp_sha256"])
        assert profile["network"] == "none"
        assert view["config_sha256"] == config_sha
        assert view["received_at"] <= view["started_at"] <= view["finished_at"]
        assert (view["outcome"], view["exit_code"], view["signal"]) == ("exited", 0, 0)
        assert view["cpu_seconds"] > 0 and view["peak_memory_bytes"] > 0
        assert (view["stdout_bytes"], view["stderr_bytes"]) == (7, 4)
        assert view["stdout_sha256"] == sha256(r.stdout) and view["stderr_sha256"] == sha256(r.stderr)
        assert "stdout_stored_b64" not in view and "stderr_stored_b64" not in view   # admins: no store_output
        assert view["daemon_version"] == __version__ and view["host"] == socket.gethostname()


def test_store_code_and_store_output_follow_the_policy(main):
    with main.client(token=main.tokens["private"]) as c:
        r = c.run("import sys; print('secret out'); print('secret err', file=sys.stderr)")
        rec = c.get_run(r.run_id)
    assert rec["policy"] == "output-not-code" and rec["code_sha256"]
    assert "code" not in rec
    assert base64.b64decode(rec["stdout_stored_b64"]) == r.stdout == b"secret out\n"
    assert base64.b64decode(rec["stderr_stored_b64"]) == r.stderr
    assert rec["stdout_sha256"] == sha256(r.stdout)


def test_denied_run_record(default_daemon):
    _, (denied,) = as_nobody(default_daemon.target, [{"op": "run", "code": "print('denied')"}])
    with default_daemon.client() as c:
        rec = [r for r in c.list_runs(principal="unix:nobody", limit=1000)[0]
               if r["code_sha256"] == sha256(b"print('denied')")][0]
    shown = sandboxctl(default_daemon.target, "runs", "show", rec["run_id"], "--json")
    view = json.loads(shown.stdout)
    for r in (rec, view):
        assert (r["principal"], r["auth_method"], r["outcome"]) == ("unix:nobody", "unix_peercred", "rejected")
        assert r["reason"] == "permission_denied" and r["message"] == denied["message"]
        assert r["received_at"] <= r["finished_at"] and r["started_at"] is None
        assert r["daemon_version"] == __version__


def test_an_unmapped_uid_without_a_user_name_is_unix_and_its_number(default_daemon):
    """Unmapped unix callers are "unix:<user>", or "unix:<uid>" when the uid has no name (docs/identity.md)."""
    uid = next(u for u in range(64000, 65000) if not _has_passwd_entry(u))
    _, (denied,) = as_nobody(default_daemon.target, [{"op": "run", "code": "pass"}], uid=uid)
    assert denied["error"] == "PERMISSION_DENIED" and f"'unix:{uid}'" in denied["message"], denied


def _has_passwd_entry(uid: int) -> bool:
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def test_the_tls_example_of_the_shipped_config_passes_check_config(pki, tmp_path):
    """etc/sandboxd.toml's commented [server.tls] block, uncommented with real files and a TCP listener."""
    text = (ROOT / "etc" / "sandboxd.toml").read_text()
    block = re.search(r"^# \[server\.tls\]\n(?:^# \w+ = .*\n)+", text, re.M).group()
    files = {"/etc/sandboxd/server.pem": pki.path / "server.pem", "/etc/sandboxd/server.key": pki.path / "server.key",
             "/etc/sandboxd/clients-ca.pem": pki.path / "ca.pem"}
    tls = "".join(line[2:] + "\n" for line in block.splitlines())
    for example, real in files.items():
        assert example in tls, tls
        tls = tls.replace(example, str(real))
    text = text.replace(block, "").replace('listen = ["unix:///run/sandboxd/sandboxd.sock"]',
                                           'listen = ["unix:///run/sandboxd/sandboxd.sock", "127.0.0.1:7443"]')
    text = text.replace("\n[sandbox]\n", "\n" + tls + "\n[sandbox]\n", 1)
    cfg = tmp_path / "sandboxd.toml"
    cfg.write_text(text)
    p = subprocess.run([sys.executable, "-m", "sandboxd.cli.daemon", "check-config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    effective = json.loads(p.stdout)
    assert effective["tls"]["client_ca"] == str(pki.path / "ca.pem") and effective["tls"]["require_client_cert"]
