"""`sandboxd`: serve, check-config, audit. Runs the daemon in the foreground (systemd or `make run` supervise it).

Start-up order matters: configuration and seccomp programs first (fail fast on a bad file), then the launcher
(before any gRPC thread exists), then the store, then the gRPC server. SIGTERM/SIGINT stop accepting, let
running runs finish within the grace period, stop the rest (recorded), and exit 0.
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


def start_metrics(daemon, listen: str) -> str | None:
    """Serve /metrics on HOST:PORT (port 0 picks a free one); returns the bound address, None when "off"."""
    if listen in ("", "off", "none"):
        return None
    from prometheus_client import start_http_server
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server, _thread = start_http_server(int(port), addr=host, registry=daemon.metrics.registry)
    daemon.metrics_server = server
    return f"{host}:{server.server_port}"


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

    from ..service import SandboxService
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
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 4 << 20),
                                      ("grpc.so_reuseport", 0)])
    sandbox_pb2_grpc.add_SandboxServicer_to_server(SandboxService(daemon), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    sockets = []
    try:
        for addr in cfg.server.listen:
            path = _unix_path(addr)
            if path is None:
                raise ConfigError(f"{cfg.source}: server.listen: {addr!r}: TCP listeners need authentication "
                                  f"(TLS or tokens), which this version does not provide; use unix:///path.sock")
            _prepare_socket(path)
            server.add_insecure_port(addr)
            sockets.append(path)
        await server.start()
    except Exception:
        await daemon.stop()
        raise
    for path in sockets:
        os.chmod(path, cfg.server.socket_mode)
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
    launcher_gone = asyncio.ensure_future(asyncio.to_thread(daemon.launcher.proc.wait))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopper, launcher_gone], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if launcher_gone.done() and not stop.is_set():
        log.error("the launcher exited unexpectedly (status %s); shutting down", daemon.launcher.proc.returncode)
        code = 1
    watcher.cancel()
    await health_servicer.enter_graceful_shutdown()
    log.info("shutting down: %d runs active, grace %gs", daemon.admission.running, cfg.server.shutdown_grace)
    grace = asyncio.ensure_future(server.stop(cfg.server.shutdown_grace))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(grace), cfg.server.shutdown_grace)
    await daemon.supervisor.cancel_all("shutdown")
    await grace
    await daemon.stop()
    if getattr(daemon, "metrics_server", None):
        daemon.metrics_server.shutdown()
    for path in sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    stopper.cancel()
    log.info("sandboxd stopped")
    return code


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
    return lambda cfg: dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, **server)) if server else cfg


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
    print(json.dumps(effective, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sandboxd", description="Run untrusted scripts in fresh Linux sandboxes.")
    p.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", help="TOML configuration file (default: the built-in configuration)")
    s.add_argument("--listen", action="append", metavar="ADDR", help="unix:///path.sock (repeatable)")
    s.add_argument("--state-dir", help="where the run store lives (default /var/lib/sandboxd)")
    s.add_argument("--runtime-dir", help="sockets and scratch mount points (default /run/sandboxd)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus endpoint (default 127.0.0.1:9464)")
    s.set_defaults(fn=cmd_serve)
    c = sub.add_parser("check-config", help="validate a configuration file and print the effective configuration")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
