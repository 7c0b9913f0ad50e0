"""`sandboxd`: serve, check-config, audit, mcp. Runs the daemon in the foreground (systemd or `make run` supervise it).

Start-up order matters: configuration and seccomp programs first (fail fast on a bad file), then the launcher
(before any gRPC thread exists), then the store, then the gRPC server. SIGTERM/SIGINT stop accepting, refuse
requests still queued (UNAVAILABLE, recorded), let running runs finish within the grace period, stop the rest
(recorded), and exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys

import grpc

from .. import __version__, config as config_mod, logs
from ..errors import ConfigError
from . import quiet_on_broken_pipe

log = logging.getLogger("sandboxd")


def _unix_path(addr: str) -> str | None:
    return addr[len("unix://"):] if addr.startswith("unix://") else None


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)  # a stale socket from a previous daemon


async def _prune_forever(daemon) -> None:
    while True:
        try:
            await daemon.prune()
        except Exception:  # noqa: BLE001 - retention must never take the daemon down
            log.exception("retention: pruning failed")
        await asyncio.sleep(daemon.config.store.prune_interval)


async def _every(what: str, interval, fn) -> None:
    """Call fn every interval() seconds (read each time, so a reload applies); a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval())
        try:
            await fn()
        except Exception:  # noqa: BLE001
            log.exception("%s failed", what)


def start_metrics(daemon, listen: str) -> str | None:
    """Serve /metrics on HOST:PORT (port 0 picks a free one); returns the bound address, None when "off"."""
    if listen in ("", "off", "none"):
        return None
    from prometheus_client import start_http_server
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server, _thread = start_http_server(int(port), addr=host, registry=daemon.metrics.registry)
    daemon.metrics_server = server
    return f"[{host}]:{server.server_port}" if ":" in host else f"{host}:{server.server_port}"


async def watch_health(daemon, health_servicer, interval: float = 2.0) -> None:
    from grpc_health.v1 import health_pb2
    last = None
    while True:
        ok, why = await daemon.healthy()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "sandboxd.v1.Sandbox"):
            await health_servicer.set(service, status)
        if ok != last:
            (log.info if ok else log.error)("health: %s", why)
            last = ok
        await asyncio.sleep(interval)


async def serve(cfg: config_mod.Config, config_path: str | None = None, overrides=lambda c: c) -> int:
    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from ..service import RequestGuard, SandboxService
    from ..state import Daemon
    from ..v1 import sandbox_pb2, sandbox_pb2_grpc

    daemon = Daemon(cfg)
    await daemon.start()
    try:
        metrics_addr = start_metrics(daemon, cfg.server.metrics_listen)
    except (OSError, ValueError) as e:
        await daemon.stop()
        raise ConfigError(f"server.metrics_listen: cannot listen on {cfg.server.metrics_listen!r}: {e}") from None
    limit = cfg.server.max_request_bytes + (1 << 20)
    # RequestGuard reads each request itself, so bodies gRPC refuses (too large, undecodable) are counted too.
    server = grpc.aio.server(interceptors=[RequestGuard(daemon, limit)],
                             options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 4 << 20), ("grpc.so_reuseport", 0)])
    sandbox_pb2_grpc.add_SandboxServicer_to_server(SandboxService(daemon), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    sockets = []
    try:
        # Unix callers reach gRPC through the peer-credential relay; the real socket is root-only.
        private = os.path.join(cfg.server.runtime_dir, "private")
        os.makedirs(private, mode=0o700, exist_ok=True)
        os.chmod(private, 0o700)
        internal = os.path.join(private, "grpc.sock")
        _prepare_socket(internal)
        server.add_insecure_port(f"unix://{internal}")
        for addr in cfg.server.listen:
            path = _unix_path(addr)
            if path is not None:
                _prepare_socket(path)
                sockets.append(path)
            elif daemon.tls is not None:  # rotated on SIGHUP (sandboxd/tls.py)
                server.add_secure_port(addr, daemon.tls.credentials())
            else:  # allowed by config only with insecure_tcp = true; the authenticator then demands tokens
                log.warning("listening on %s WITHOUT TLS (server.insecure_tcp): tokens cross the network in clear",
                            addr)
                server.add_insecure_port(addr)
        await server.start()
        from ..auth import UnixPeerProxy
        daemon.proxy = UnixPeerProxy(internal)
        for path in sockets:
            await daemon.proxy.listen(path, cfg.server.socket_mode)
    except Exception:
        await server.stop(0)
        await daemon.stop()
        raise
    sockets.append(internal)
    pruner = asyncio.ensure_future(_prune_forever(daemon))
    audit_tasks = [asyncio.ensure_future(_every("audit: signed checkpoint",
                                                lambda: daemon.config.audit.checkpoint_interval, daemon.checkpoint)),
                   asyncio.ensure_future(_every("audit: refusal summary",
                                                lambda: daemon.config.audit.refusal_summary_interval,
                                                daemon.flush_refusals))]
    log.info("sandboxd %s serving on %s (cgroup driver %s, state %s, metrics %s)", __version__,
             ", ".join(cfg.server.listen), daemon.launcher.driver, cfg.server.state_dir,
             f"http://{metrics_addr}/metrics" if metrics_addr else "off")
    watcher = asyncio.ensure_future(watch_health(daemon, health_servicer))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Handlers only queue work; the reload itself runs as a task (one at a time).
    reload_lock = asyncio.Lock()

    async def reload():
        async with reload_lock:
            await daemon.reload(config_path, overrides)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    code = await _supervise_launcher(daemon, stop)
    watcher.cancel()
    pruner.cancel()
    for task in audit_tasks:
        task.cancel()
    await health_servicer.enter_graceful_shutdown()
    grace = daemon.config.server.shutdown_grace  # a reload may have changed it
    log.info("shutting down: %d runs active, %d queued (refused), grace %gs", daemon.admission.running,
             daemon.admission.queued, grace)
    # Nothing starts after shutdown began: queued requests (and any still arriving) get UNAVAILABLE, recorded.
    from ..errors import ShuttingDown
    daemon.admission.close(ShuttingDown("sandboxd is shutting down: the run was not started; retry later"))
    # Stop accepting new connections at once (new runs and sessions on open ones are refused: admission is
    # closed); give running runs the grace period, then stop them ourselves so their callers still get a result
    # (outcome cancelled). Only then does gRPC send its GOAWAY and close the calls: sent during the grace it let a
    # caller's connection close under a run that was still going to answer (seen once in CI).
    daemon.proxy.stop_listening()
    deadline = loop.time() + grace
    while daemon.supervisor.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await daemon.supervisor.cancel_all("shutdown")
    while daemon.supervisor.active and loop.time() < deadline + 10:
        await asyncio.sleep(0.01)
    await server.stop(10)
    await daemon.proxy.close()
    await daemon.stop()
    if getattr(daemon, "metrics_server", None):
        daemon.metrics_server.shutdown()
    for path in sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(OSError):  # only if empty: never remove what we did not put there
        os.rmdir(private)
    log.info("sandboxd stopped")
    return code


async def _supervise_launcher(daemon, stop: asyncio.Event, max_restarts: int = 5, window: float = 60.0) -> int:
    """Wait for a stop signal; restart the launcher if it dies (the new one removes the old one's cgroups).
    A launcher that keeps dying is not restarted forever: after max_restarts in `window` seconds the daemon
    cleans up and exits 1 for its supervisor (systemd) to decide."""
    loop = asyncio.get_running_loop()
    restarts: list[float] = []
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            gone = asyncio.ensure_future(asyncio.to_thread(daemon.launcher.proc.wait))
            await asyncio.wait([stopper, gone], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                gone.cancel()
                return 0
            status = daemon.launcher.proc.returncode
            now = loop.time()
            restarts = [t for t in restarts if t > now - window] + [now]
            if len(restarts) > max_restarts:
                log.error("the launcher exited (status %s) %d times in %gs; giving up", status, len(restarts), window)
                await asyncio.to_thread(daemon.cleanup_cgroups)
                return 1
            log.error("the launcher exited unexpectedly (status %s); starting a new one", status)
            try:
                await daemon.launcher.start()
            except Exception as e:  # noqa: BLE001
                log.error("the launcher could not be restarted: %s", e)
                await asyncio.to_thread(daemon.cleanup_cgroups)
                return 1
    finally:
        stopper.cancel()


def _overrides(args):
    """Command-line flags win over the file, on start and on every reload."""
    import dataclasses
    server = {}
    if args.listen:
        for addr in args.listen:
            config_mod.validate_listen(addr, "--listen")
        server["listen"] = tuple(args.listen)
    if args.state_dir:
        server["state_dir"] = os.path.abspath(args.state_dir)
    if args.runtime_dir:
        server["runtime_dir"] = os.path.abspath(args.runtime_dir)
    if args.metrics_listen:
        server["metrics_listen"] = args.metrics_listen

    def apply(cfg):
        if not server:
            return cfg
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, **server))
        # The file's own listen addresses were checked when it was read; these come from the command line.
        for addr in cfg.server.listen:
            if not addr.startswith("unix://") and cfg.tls is None and not cfg.server.insecure_tcp:
                raise ConfigError(f"--listen {addr}: a TCP listener needs TLS: add [server.tls] cert and key to the "
                                  f"configuration (or set server.insecure_tcp = true to accept plaintext TCP, where "
                                  f"every caller must then send a token)")
        return cfg
    return apply


def cmd_serve(args) -> int:
    try:
        overrides = _overrides(args)
        cfg = overrides(config_mod.load(args.config))
    except ConfigError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.logging.level, cfg.logging.format)
    if os.geteuid() != 0:
        print("sandboxd: must run as root (it creates namespaces, cgroups and mounts)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(cfg, args.config, overrides))
    except ConfigError as e:
        log.error("%s", e)
        return 2


def cmd_check_config(args) -> int:
    import dataclasses
    from ..state import build_catalog
    try:
        cfg = config_mod.load(args.file)
        catalog = build_catalog(cfg)
    except ConfigError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return 1
    effective = dataclasses.asdict(cfg)
    effective["runners"] = {name: {"image": r.image, "command": list(r.command), "available": r.available,
                                   "unavailable_reason": r.unavailable_reason, "seccomp": r.seccomp,
                                   "limits": dataclasses.asdict(r.default_limits),
                                   "max_limits": dataclasses.asdict(r.max_limits)}
                            for name, r in catalog.runners.items()}
    effective["seccomp_profiles"] = {n: p.sha256 for n, p in catalog.seccomp.items()}
    effective["config_sha256"] = catalog.config_sha256
    print(json.dumps(_octal_modes(effective), indent=2, default=str))
    return 0


def _octal_modes(value):
    """File modes (keys ending in _mode) as written in the file, "0660", not as the integer 432."""
    if isinstance(value, dict):
        return {k: f"{v:04o}" if k.endswith("_mode") and isinstance(v, int) else _octal_modes(v)
                for k, v in value.items()}
    return value


def cmd_token_new(args) -> int:
    from ..auth import hash_token, new_token
    token = new_token()
    print(token)
    print(f"# paste into the configuration (the token itself is not stored anywhere):\n"
          f"[[tokens]]\nprincipal = {json.dumps(args.principal)}\nsha256 = \"{hash_token(token)}\"", file=sys.stderr)
    return 0


def _db_path(args) -> str:
    return os.path.join(args.state_dir, "sandboxd.db")


VERIFY_EPILOG = """exit status:
  0  ok: the chain, every signed checkpoint and every anchor agree
  1  an event was edited, deleted, inserted or reordered (or the runs table disagrees with the events)
  2  nothing to verify or an input cannot be used (no store, unreadable key, anchors or export; signed
     checkpoints but no public key)
  3  the tail was cut: the anchors vouch for events that are missing from the end
  4  the chain was rewritten without the key: a signature fails or a signed head is not the chain's
  5  a signed checkpoint was removed (the anchors or a later checkpoint name it)
On failure, the first line names the first bad sequence number: FAILED (<kind>) at seq N: <reason>."""


def _public_key(args):
    """The verifier's public key: --pubkey, else derived from the daemon's signing key (--key or the state dir's
    audit.key) when it is readable here, else None."""
    from .. import audit
    if getattr(args, "pubkey", None):
        with open(args.pubkey, "rb") as f:
            return audit.load_public(f.read(), args.pubkey)
    if getattr(args, "export", None):
        return None     # an export from anywhere: never this host's key by accident
    path = args.key or os.path.join(args.state_dir, "audit.key")
    if not os.path.exists(path):
        return None
    return audit.load_key(path, create=False).public_key()


def cmd_audit_verify(args) -> int:
    from .. import audit
    try:
        public = _public_key(args)
        if args.anchors:
            anchors_path = args.anchors
        else:   # the daemon's own anchor file, when it is where it is by default
            default = os.path.join(args.state_dir, "anchors", audit.ANCHOR_FILE)
            anchors_path = default if not args.export and os.path.exists(default) else None
        anchors = audit.read_anchors(anchors_path, public) if anchors_path else []
    except (ConfigError, OSError) as e:
        print(f"sandboxd audit verify: {e}", file=sys.stderr)
        return audit.Verdict.UNUSABLE
    if args.export:
        try:
            with open(args.export, encoding="utf-8") as f:
                report = audit.verify_export(iter(f), public, anchors, args.export)
        except (ConfigError, OSError) as e:
            print(f"sandboxd audit verify: {e}", file=sys.stderr)
            return audit.Verdict.UNUSABLE
        what = args.export
    else:
        what = _db_path(args)
        if not os.path.exists(what):
            print(f"sandboxd audit verify: {what}: no store here", file=sys.stderr)
            return audit.Verdict.UNUSABLE
        report = audit.verify_store(what, public, anchors)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.verdict == audit.Verdict.OK:
        print(f"ok: {report.events} events verified in {what} ({report.checkpoints} signed checkpoints, "
              f"{report.anchors} anchors{' from ' + anchors_path if anchors_path else ''})")
        return 0
    where = f"at seq {report.first_bad_seq}" if report.first_bad_seq is not None else "(no sequence)"
    print(f"FAILED ({report.verdict.name.lower()}) {where}: {report.reason} ({report.events} events checked "
          f"before it)")
    return report.verdict


def cmd_audit_pubkey(args) -> int:
    from .. import audit
    try:
        public = _public_key(args)
    except (ConfigError, OSError) as e:
        print(f"sandboxd audit pubkey: {e}", file=sys.stderr)
        return 2
    if public is None:
        print(f"sandboxd audit pubkey: {args.key or os.path.join(args.state_dir, 'audit.key')}: no signing key "
              f"(the daemon creates it at its first start)", file=sys.stderr)
        return 2
    print(audit.public_pem(public), end="")
    print(f"# key id {audit.key_id(public)}", file=sys.stderr)
    return 0


def cmd_audit_export(args) -> int:
    from .. import audit
    path = _db_path(args)
    if args.format != "jsonl":
        print(f"sandboxd audit export: unknown format {args.format!r} (expected jsonl)", file=sys.stderr)
        return 2
    if not os.path.exists(path):
        print(f"sandboxd audit export: {path}: no store here", file=sys.stderr)
        return 2
    try:
        public = _public_key(args)
    except (ConfigError, OSError) as e:
        print(f"sandboxd audit export: {e}", file=sys.stderr)
        return 2
    count = audit.export(path, sys.stdout, public, args.since_seq)
    print(f"exported {count} events", file=sys.stderr)
    return 0


def cmd_mcp(args) -> int:
    """An MCP server in front of a running daemon (sandboxd.integrations.mcp; needs the `mcp` extra)."""
    try:
        from ..integrations.mcp import MCP_VERSION, SandboxdMCP, serve_http, serve_stdio
    except ImportError as e:
        print(f"sandboxd mcp: {e}: install the mcp extra (pip install 'sandboxd[mcp]')", file=sys.stderr)
        return 2
    from ..aio import AsyncClient

    def client():
        return AsyncClient(args.target, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, agent_name="mcp", agent_version=MCP_VERSION)
    app = SandboxdMCP(client, default_runner=args.runner)
    if not args.http:
        asyncio.run(serve_stdio(app))
        return 0
    host, _, port = args.http.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        print(f"sandboxd mcp: --http {args.http!r}: expected HOST:PORT (e.g. 127.0.0.1:8765)", file=sys.stderr)
        return 2
    token = os.environ.get("SANDBOXD_MCP_TOKEN", "")
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            print(f"sandboxd mcp: --token-file: {e}", file=sys.stderr)
            return 2
    if not token:
        print("sandboxd mcp: --http needs a bearer token for its clients: --token-file FILE or "
              "$SANDBOXD_MCP_TOKEN (make one with `sandboxd token new mcp`)", file=sys.stderr)
        return 2
    asyncio.run(serve_http(app, host, int(port), token,
                           ready=lambda url: print(f"sandboxd mcp: serving {url}", file=sys.stderr, flush=True)))
    return 0


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sandboxd", description="Run untrusted scripts in fresh Linux sandboxes.")
    p.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", help="TOML configuration file (default: the built-in configuration)")
    s.add_argument("--listen", action="append", metavar="ADDR",
                   help="unix:///path.sock, or HOST:PORT with [server.tls] (or server.insecure_tcp); repeatable, "
                        "replaces server.listen")
    s.add_argument("--state-dir", help="where the run store lives (default /var/lib/sandboxd)")
    s.add_argument("--runtime-dir", help="sockets and scratch mount points (default /run/sandboxd)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus endpoint (default 127.0.0.1:9464)")
    s.set_defaults(fn=cmd_serve)
    c = sub.add_parser("check-config", help="validate a configuration file and print the effective configuration")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)
    t = sub.add_parser("token", help="bearer tokens").add_subparsers(dest="token_cmd", required=True)
    tn = t.add_parser("new", help="print a fresh token and the config lines that accept it (as a hash)")
    tn.add_argument("principal")
    tn.set_defaults(fn=cmd_token_new)
    a = sub.add_parser("audit", help="the tamper-evident run log").add_subparsers(dest="audit_cmd", required=True)
    av = a.add_parser("verify", help="check the hash chain, signed checkpoints and anchors offline",
                      description="Verify the audit log of a state directory (or an export) offline.",
                      epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    av.add_argument("--state-dir", default="/var/lib/sandboxd")
    av.add_argument("--export", metavar="FILE", help="verify this `sandboxd audit export` output instead")
    av.add_argument("--pubkey", metavar="FILE", help="the public key to check signatures with (`sandboxd audit "
                    "pubkey`); default: derived from the state dir's audit.key, or the export's own key")
    av.add_argument("--key", metavar="FILE", help="the daemon's signing key, when audit.key_path moved it")
    av.add_argument("--anchors", metavar="FILE", help="an anchor file (default: <state-dir>/anchors/anchors.jsonl "
                    "when it exists)")
    av.set_defaults(fn=cmd_audit_verify)
    ak = a.add_parser("pubkey", help="print the public key of the daemon's audit signing key (PEM)")
    ak.add_argument("--state-dir", default="/var/lib/sandboxd")
    ak.add_argument("--key", metavar="FILE", help="the signing key, when audit.key_path moved it")
    ak.set_defaults(fn=cmd_audit_pubkey)
    ae = a.add_parser("export", help="a header line (format, public key), then events as JSON lines")
    ae.add_argument("--format", default="jsonl")
    ae.add_argument("--state-dir", default="/var/lib/sandboxd")
    ae.add_argument("--key", metavar="FILE", help="the signing key, when audit.key_path moved it")
    ae.add_argument("--since-seq", type=int, default=0)
    ae.set_defaults(fn=cmd_audit_export)
    m = sub.add_parser("mcp", help="an MCP server (stdio, or streamable HTTP with --http) in front of the daemon")
    m.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio "
                   "(bind loopback, e.g. 127.0.0.1:8765; clients must send the bearer token)")
    m.add_argument("--token-file", help="the bearer token HTTP clients must send (default: $SANDBOXD_MCP_TOKEN)")
    m.add_argument("--target", help="the daemon: unix:///path.sock or host:port (default: $SANDBOXD_TARGET or "
                   "the standard socket)")
    m.add_argument("--token", default=None, help="bearer token for the daemon (default: $SANDBOXD_TOKEN); "
                   "without one the daemon sees this process's own uid")
    m.add_argument("--tls-ca", help="CA bundle (PEM) to verify a TCP daemon's certificate")
    m.add_argument("--tls-cert", help="client certificate (PEM) for mTLS to the daemon")
    m.add_argument("--tls-key", help="client key (PEM) for mTLS to the daemon")
    m.add_argument("--runner", default="python", help="create_session's default runner (default: python)")
    m.set_defaults(fn=cmd_mcp)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
