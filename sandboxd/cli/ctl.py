"""`sandboxctl`: run a script in sandboxd from a shell, list runners, read run records, and work in sessions.

    sandboxctl run [--runner R] FILE|-                 one script in a fresh sandbox
    sandboxctl session create --runner python          a sandbox kept for many calls; prints its id
    sandboxctl exec SESSION -- wc -l data.csv          a command in it
    sandboxctl code SESSION FILE|-                     a cell in its Python kernel (state kept between cells)
    sandboxctl cp data.csv SESSION:data.csv            files in and out (cp SESSION:out/report.txt .)
    sandboxctl session list | show SESSION | close SESSION
    sandboxctl stop RUN_ID | --principal NAME          the stop button (admins: anyone's; others: their own)

Exit status of `run` and `exec`: see EXIT_STATUS below (also in `sandboxctl --help` and the README). `code`
exits 0 when the cell ran, 1 when it raised, else by the same rules; the session commands and `cp` exit 0 or
125. The session commands live in sandboxd.cli.sessions.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys

from .. import __version__
from . import quiet_on_broken_pipe, table
from ..client import Client, Output, Result, SandboxdError
from ..units import format_size, parse_size

EXIT_TIMEOUT = 124
EXIT_REFUSED = 125
# One status per limit, whatever the script did when it was stopped (a memory_limit run may end by SIGKILL or
# exit after a MemoryError; an output_limit run is stopped by sandboxd, with no signal of its own).
EXIT_MEMORY_LIMIT = 128 + signal.SIGKILL    # what the OOM killer sends
EXIT_OUTPUT_LIMIT = 128 + signal.SIGXFSZ    # the signal for writing past a size limit
EXIT_STATUS = f"""exit status of run and exec: the command's own exit code; 128+N when it was killed by signal N;
  {EXIT_TIMEOUT} timeout; {EXIT_REFUSED} refused or failed by sandboxd (one line on stderr says why);
  {EXIT_MEMORY_LIMIT} memory_limit (128+SIGKILL); {EXIT_OUTPUT_LIMIT} output_limit (128+SIGXFSZ); {EXIT_REFUSED} also for
  cancelled (stopped) and interrupted (the sandbox was lost after the code started: it may have partly run).
  stop: 0 when it stopped something, 1 when nothing was in flight, {EXIT_REFUSED} when refused.
  Any command: 141 (128+SIGPIPE) when its output pipe closes early (e.g. `| head`)."""


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


def exit_status(result) -> int:
    """For a Result (run) or an ExecResult (exec)."""
    if result.outcome == "exited":
        return result.exit_code
    if result.outcome == "timeout":
        return EXIT_TIMEOUT
    if result.outcome == "memory_limit":
        return EXIT_MEMORY_LIMIT
    if result.outcome == "output_limit":
        return EXIT_OUTPUT_LIMIT
    if result.outcome == "signaled" and result.signal:
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
    rows = [(str(r.get("run_id", "")), str(r.get("received_at") or "-"), str(r.get("principal") or "-"),
             str((r.get("agent") or {}).get("name") or "-"), str(r.get("runner") or "-"),
             str(r.get("outcome") or "running")) for r in runs]
    print(table(("RUN ID", "RECEIVED", "PRINCIPAL", "AGENT", "RUNNER", "OUTCOME"), rows))
    return 0


def _text(value) -> str:
    """One spelling for every value of the text view: JSON's (null, true), strings bare."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _show_lines(view: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested objects (agent, peer, limits...) become dotted keys, one value per line."""
    lines = []
    for key, value in view.items():
        if not prefix and (key in ("code", "spec", "agent_name", "agent_version") or key.endswith("_b64")):
            continue  # payloads, and the agent fields already shown as agent.name and agent.version
        if isinstance(value, dict) and value:
            lines += _show_lines(value, f"{prefix}{key}.")
        elif prefix == "egress." and key == "listed" and isinstance(value, list):
            lines += [(f"egress.listed.{i}", _connection_text(c)) for i, c in enumerate(value)]
        else:
            lines.append((f"{prefix}{key}", _text(value)))
    return lines


def _connection_text(c: dict) -> str:
    """One connection a run made or tried through the egress proxy (docs/network.md)."""
    cut = f" cut:{c['cut']}" if c.get("cut") else ""
    # Transparent connections: how the name was learnt and where the program itself was connecting.
    via = f" via:{c['via']} to:{c.get('original_address')}" if c.get("via") else ""
    return (f"{c.get('decision', ''):<8} {c.get('destination') or '-'}:{c.get('port')} ({c.get('address') or '-'}) "
            f"{c.get('rule')} in={c.get('bytes_in')} out={c.get('bytes_out')}{cut}{via}")


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
    lines = _show_lines(view)
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_stop(args) -> int:
    if bool(args.run_id) == bool(args.principal):
        print("sandboxctl stop: give a RUN_ID or --principal NAME (not both)", file=sys.stderr)
        return 2
    with _client(args) as client:
        try:
            if args.run_id:
                res = client.stop_run(args.run_id, args.reason or "")
            else:
                res = client.stop_principal(args.principal, args.reason or "")
        except SandboxdError as e:
            if e.code == "NOT_FOUND":
                print(f"sandboxctl: {e.message}", file=sys.stderr)
                return 1
            print(f"sandboxctl: {e.code.lower()}: {e.message}", file=sys.stderr)
            return EXIT_REFUSED
    print(res.message)
    return 0 if res.runs_stopped or res.sessions_closed else 1


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


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    # allow_abbrev off: "runs list --agent" must not be read as an abbreviation of --agent-name.
    p = argparse.ArgumentParser(prog="sandboxctl", allow_abbrev=False, epilog=EXIT_STATUS,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Run scripts in sandboxd: one-shot runs, run records, and sessions "
                                            "(sandboxes kept for many calls: session, exec, code, cp).")
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
    r = sub.add_parser("run", help="run a script (FILE, or - for stdin) and stream its output", epilog=EXIT_STATUS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--runner", help="runner name (default: from the file extension, else python)")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="wall-clock limit (default: the runner's; may be raised up to the runner's and your policy's maximum)")
    r.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 128MiB (default: the runner's; may be raised up to the runner's and your policy's maximum)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    r.add_argument("file", metavar="FILE|-", help="the script, or - to read it from stdin")
    # A default makes argparse treat the optional args as optional in its "required" message, too.
    r.add_argument("args", nargs="*", default=[], help="arguments passed to the script (after --)")
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
    st = sub.add_parser("stop", help="stop a run, or everything a principal runs (admins: anyone's; others: "
                                     "their own); stopped runs end as cancelled, naming who stopped them")
    st.add_argument("run_id", nargs="?", metavar="RUN_ID")
    st.add_argument("--principal", metavar="NAME", help="stop every run and session of this principal")
    st.add_argument("--reason", default="", help="recorded with the stop and shown in the runs' messages")
    st.set_defaults(fn=cmd_stop)
    ls = sub.add_parser("runners", help="list runners and their limits")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_runners)
    from . import sessions   # imports this module: registered here, not at import time
    sessions.add_parsers(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    # argparse cannot take options between `exec SESSION` and `-- ARGV` (its positionals are matched in one go),
    # so exec's command is split off at the first -- before parsing.
    if "--" in argv and "exec" in argv[:argv.index("--")]:
        args = p.parse_args(argv[:argv.index("--")])
        if args.cmd == "exec":
            args.argv = [*args.argv, *argv[argv.index("--") + 1:]]
            return args.fn(args)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
