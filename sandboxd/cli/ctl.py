"""`sandboxctl`: run a script in sandboxd from a shell, list runners.

Exit status of `run`: the script's own exit code; 128+N when it was killed by signal N; 124 on timeout;
125 when sandboxd refused or failed the run (with a one-line reason on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import __version__
from ..client import Client, Output, Result, SandboxdError
from ..units import format_size, parse_size

EXIT_TIMEOUT = 124
EXIT_REFUSED = 125


def _client(args) -> Client:
    return Client(args.target, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                  agent_name=args.agent_name, agent_version=args.agent_version,
                  tls_server_name=args.tls_server_name)


def _read_source(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _pick_runner(client: Client, path: str) -> str:
    ext = path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
    if ext:
        for runner in client.runners():
            if ext in runner.extensions and runner.available:
                return runner.name
    return "python"


def exit_status(result: Result) -> int:
    if result.outcome == "exited":
        return result.exit_code
    if result.outcome == "timeout":
        return EXIT_TIMEOUT
    if result.outcome in ("signaled", "memory_limit", "output_limit") and result.signal:
        return 128 + result.signal
    return EXIT_REFUSED


def cmd_run(args) -> int:
    try:
        code = _read_source(args.file)
    except (OSError, UnicodeDecodeError) as e:
        print(f"sandboxctl: cannot read {args.file}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        memory = parse_size(args.memory) if args.memory else 0
    except ValueError as e:
        print(f"sandboxctl: --memory: {e}", file=sys.stderr)
        return EXIT_REFUSED
    with _client(args) as client:
        try:
            runner = args.runner or _pick_runner(client, args.file)
            events = client.execute(code, runner, args=args.args, wall_time=args.timeout or 0, memory=memory)
            out = {"stdout": [], "stderr": []}
            result = None
            for event in events:
                if isinstance(event, Output):
                    if args.json:
                        out[event.stream].append(event.data)
                    else:
                        stream = sys.stdout.buffer if event.stream == "stdout" else sys.stderr.buffer
                        stream.write(event.data)
                        stream.flush()
                elif isinstance(event, Result):
                    result = event
        except SandboxdError as e:
            if args.json:
                print(json.dumps({"outcome": "rejected", "error": e.code, "message": e.message}))
            print(f"sandboxctl: {e.code.lower()}: {e.message}", file=sys.stderr)
            return EXIT_REFUSED
        except KeyboardInterrupt:
            print("sandboxctl: interrupted; the run was cancelled", file=sys.stderr)
            return 130
    if result is None:
        print("sandboxctl: the daemon ended the stream without a result", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        stdout, stderr = b"".join(out["stdout"]), b"".join(out["stderr"])
        print(json.dumps({
            "run_id": result.run_id, "outcome": result.outcome, "exit_code": result.exit_code,
            "signal": result.signal, "stdout": stdout.decode("utf-8", "replace"),
            "stderr": stderr.decode("utf-8", "replace"), "stdout_truncated": result.stdout_truncated,
            "stderr_truncated": result.stderr_truncated, "duration_ms": round(result.wall_time * 1000, 3),
            "cpu_ms": round(result.cpu_time * 1000, 3), "peak_memory_bytes": result.peak_memory,
            "message": result.message}))
    elif result.outcome not in ("exited",):
        print(f"sandboxctl: run {result.run_id}: {result.outcome}: {result.message}", file=sys.stderr)
    elif result.stdout_truncated or result.stderr_truncated:
        print(f"sandboxctl: run {result.run_id}: output truncated at the cap", file=sys.stderr)
    return exit_status(result)


def _record_view(rec: dict) -> dict:
    """The record as `runs show --json` prints it: the stable keys first, everything else after."""
    agent = rec.get("agent") or {}
    view = {"run_id": rec.get("run_id"), "principal": rec.get("principal"), "auth_method": rec.get("auth_method"),
            "agent": {"name": agent.get("name"), "version": agent.get("version"), **agent},
            "policy": rec.get("policy"), "runner": rec.get("runner"), "code_sha256": rec.get("code_sha256"),
            "outcome": rec.get("outcome"), "exit_code": rec.get("exit_code"), "received_at": rec.get("received_at"),
            "finished_at": rec.get("finished_at")}
    return {**view, **{k: v for k, v in rec.items() if k not in view}}


def cmd_runs_list(args) -> int:
    with _client(args) as client:
        try:
            runs, token = client.list_runs(principal=args.principal or "", agent=args.agent or "",
                                           runner=args.runner or "", outcome=args.outcome or "",
                                           since=args.since or "", until=args.until or "", limit=args.limit)
        except SandboxdError as e:
            print(f"sandboxctl: {e.code.lower()}: {e.message}", file=sys.stderr)
            return EXIT_REFUSED
    if args.json:
        print(json.dumps({"runs": [_record_view(r) for r in runs], "next_page_token": token}))
        return 0
    print(f"{'RUN ID':<30}{'RECEIVED':<29}{'PRINCIPAL':<16}{'AGENT':<16}{'RUNNER':<10}OUTCOME")
    for r in runs:
        agent = (r.get("agent") or {}).get("name") or "-"
        print(f"{r.get('run_id', ''):<30}{str(r.get('received_at', '')):<29}{str(r.get('principal') or '-'):<16}"
              f"{agent:<16}{str(r.get('runner') or '-'):<10}{r.get('outcome') or 'running'}")
    return 0


def cmd_runs_show(args) -> int:
    with _client(args) as client:
        try:
            rec = client.get_run(args.run_id)
        except SandboxdError as e:
            print(f"sandboxctl: {e.code.lower()}: {e.message}", file=sys.stderr)
            return EXIT_REFUSED
    view = _record_view(rec)
    if args.json:
        print(json.dumps(view))
        return 0
    for key, value in view.items():
        if key in ("code", "spec") or key.endswith("_b64"):
            continue
        print(f"{key:<20} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_runners(args) -> int:
    with _client(args) as client:
        try:
            runners = client.runners()
        except SandboxdError as e:
            print(f"sandboxctl: {e.code.lower()}: {e.message}", file=sys.stderr)
            return EXIT_REFUSED
    if args.json:
        print(json.dumps([r.__dict__ for r in runners], default=list))
        return 0
    print(f"{'RUNNER':<16}{'IMAGE':<10}{'WALL':>7}{'MEMORY':>10}{'PIDS':>6}  COMMAND")
    for r in runners:
        d, m = r.default_limits, r.max_limits
        status = "" if r.available else f"  (unavailable: {r.unavailable_reason})"
        print(f"{r.name:<16}{r.image:<10}{d['wall_time']:>6g}s{format_size(d['memory']):>10}{d['pids']:>6}  "
              f"{' '.join(r.command)}{status}")
        print(f"{'':<26}max {m['wall_time']:g}s {format_size(m['memory'])} {m['pids']} pids, "
              f"output {format_size(d['output'])}/stream")
    return 0


def main(argv: list[str] | None = None) -> int:
    # allow_abbrev off: "runs list --agent" must not be read as an abbreviation of --agent-name.
    p = argparse.ArgumentParser(prog="sandboxctl", description="Run scripts in sandboxd.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"sandboxctl {__version__}")
    p.add_argument("--target", help="unix:///path.sock or host:port (default: $SANDBOXD_TARGET or "
                                    "unix:///run/sandboxd/sandboxd.sock)")
    p.add_argument("--token", default=None, help="bearer token (default: $SANDBOXD_TOKEN)")
    p.add_argument("--tls-ca", help="CA bundle (PEM) to verify a TCP target's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
    p.add_argument("--tls-key", help="client key (PEM) for mTLS")
    p.add_argument("--tls-server-name", help="expected name in the server certificate, if not the target's host")
    p.add_argument("--agent-name", help="agent name claim recorded with runs (default: $SANDBOXD_AGENT_NAME)")
    p.add_argument("--agent-version", help="agent version claim (default: $SANDBOXD_AGENT_VERSION)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a script (FILE, or - for stdin) and stream its output")
    r.add_argument("--runner", help="runner name (default: from the file extension, else python)")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="wall-clock limit (default: the runner's; may be raised up to the runner's and your policy's maximum)")
    r.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 128MiB (default: the runner's; may be raised up to the runner's and your policy's maximum)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    r.add_argument("file", metavar="FILE|-")
    r.add_argument("args", nargs="*", help="arguments passed to the script (after --)")
    r.set_defaults(fn=cmd_run)
    runs = sub.add_parser("runs", help="read run records").add_subparsers(dest="runs_cmd", required=True)
    rl = runs.add_parser("list", help="runs, newest first (admins see every principal's)")
    for flag in ("principal", "agent", "runner", "outcome", "since", "until"):
        rl.add_argument(f"--{flag}")
    rl.add_argument("--limit", type=int, default=50)
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(fn=cmd_runs_list)
    rs = runs.add_parser("show", help="one run's record")
    rs.add_argument("run_id")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(fn=cmd_runs_show)
    ls = sub.add_parser("runners", help="list runners and their limits")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_runners)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
