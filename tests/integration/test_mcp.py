"""`sandboxd mcp`: the MCP server against a real daemon, through the official SDK's own client.

Three ways in: the SDK's in-process client on the server object, a real `sandboxd mcp` subprocess on stdio,
and one on streamable HTTP (127.0.0.1, a free port, a bearer token). Sessions are kept across calls made on
separate connections, since clients such as langchain-mcp-adapters open one per call.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

mcp = pytest.importorskip("mcp", reason="the mcp extra is part of the dev install (make install)")
import httpx2  # noqa: E402  (the SDK's HTTP client)
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from sandboxd.aio import AsyncClient  # noqa: E402
from sandboxd.integrations.mcp import MCP_VERSION, SandboxdMCP  # noqa: E402

from conftest import ROOT  # noqa: E402

TOOL_NAMES = {"run_code", "execute", "create_session", "close_session", "write_file", "read_file", "list_files"}
PRINT_THREE = "import sys\nfor i in range(3):\n    print(i, flush=True)\nprint('oops', file=sys.stderr)\n"


def _app(daemon) -> SandboxdMCP:
    return SandboxdMCP(lambda: AsyncClient(daemon.target, agent_name="mcp", agent_version=MCP_VERSION))


async def _call(server, name: str, args: dict, progress: list | None = None):
    async def on_progress(value, total, message):
        progress.append((value, message))
    async with mcp.Client(server) as c:
        return await c.call_tool(name, args, progress_callback=on_progress if progress is not None else None)


def run(coro):
    return asyncio.run(coro)


# ---- in process --------------------------------------------------------------------------------------------

def test_tools_are_listed_with_exact_schemas_and_hints(daemon):
    async def main():
        async with mcp.Client(_app(daemon).server) as c:
            return (await c.list_tools()).tools
    tools = {t.name: t for t in run(main())}
    assert set(tools) == TOOL_NAMES
    schema = tools["run_code"].input_schema
    assert schema["required"] == ["code"] and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"code", "language", "session_id", "timeout"}
    assert set(tools["execute"].input_schema["properties"]) == {"command", "session_id", "timeout"}
    assert set(tools["run_code"].output_schema["required"]) == {"stdout", "stderr", "exit_code", "outcome",
                                                               "results", "error"}
    read_only = {n for n, t in tools.items() if t.annotations.read_only_hint}
    assert read_only == {"read_file", "list_files"}
    assert not any(t.annotations.open_world_hint for t in tools.values())
    assert tools["close_session"].annotations.destructive_hint and tools["close_session"].annotations.idempotent_hint


def test_run_code_one_shot_streams_progress_and_is_recorded_with_the_mcp_claims(daemon):
    progress: list = []
    r = run(_call(_app(daemon).server, "run_code", {"code": PRINT_THREE}, progress))
    assert not r.is_error
    s = r.structured_content
    assert (s["stdout"], s["stderr"], s["exit_code"], s["outcome"], s["error"]) == ("0\n1\n2\n", "oops\n", 0,
                                                                                     "exited", None)
    assert sorted("".join(m for _, m in progress)) == sorted("0\n1\n2\noops\n")   # every chunk, as progress
    assert [v for v, _ in progress] == sorted(v for v, _ in progress) and progress[-1][0] == len("0\n1\n2\noops\n")
    assert "0\n1\n2" in r.content[0].text
    with daemon.client() as c:
        runs, _ = c.list_runs(agent="mcp", limit=1)
    assert runs and runs[0]["agent"]["name"] == "mcp" and runs[0]["agent"]["version"] == MCP_VERSION


def test_execute_one_shot_and_its_exit_code_and_timeout(daemon):
    server = _app(daemon).server
    r = run(_call(server, "execute", {"command": "echo hi; exit 3"}))
    assert not r.is_error and r.structured_content["stdout"] == "hi\n" and r.structured_content["exit_code"] == 3
    r = run(_call(server, "run_code", {"code": "while True: pass", "timeout": 1}))
    assert not r.is_error, "what the code did is a result, not a tool error"
    assert r.structured_content["outcome"] == "timeout" and r.structured_content["exit_code"] is None
    assert r.structured_content["error"]["name"] == "timeout"


def test_a_session_is_kept_across_connections(daemon):
    server = _app(daemon).server
    created = run(_call(server, "create_session", {}))
    assert not created.is_error, created.content[0].text
    sid = created.structured_content["session_id"]
    try:
        assert not run(_call(server, "run_code", {"code": "x = 41", "session_id": sid})).is_error
        progress: list = []
        r = run(_call(server, "run_code", {"code": "print('p'); x + 1", "session_id": sid}, progress))
        assert r.structured_content["results"][0]["text/plain"] == "42" and r.structured_content["stdout"] == "p\n"
        assert "".join(m for _, m in progress) == "p\n"
        r = run(_call(server, "run_code", {"code": "1/0", "session_id": sid}))
        assert not r.is_error and r.structured_content["error"]["name"] == "ZeroDivisionError"
        assert r.structured_content["exit_code"] == 1

        w = run(_call(server, "write_file", {"session_id": sid, "path": "d/a.txt", "content": "one\ntwo\n"}))
        assert not w.is_error and w.structured_content["size"] == 8
        run(_call(server, "write_file", {"session_id": sid, "path": "b.bin", "content": "AP8=", "encoding": "base64"}))
        r = run(_call(server, "execute", {"command": "wc -l d/a.txt && cat b.bin | od -An -tx1", "session_id": sid}))
        assert r.structured_content["stdout"].split() == ["2", "d/a.txt", "00", "ff"]
        assert run(_call(server, "read_file", {"session_id": sid, "path": "d/a.txt"})).structured_content[
            "content"] == "one\ntwo\n"
        binary = run(_call(server, "read_file", {"session_id": sid, "path": "b.bin"})).structured_content
        assert (binary["encoding"], binary["content"]) == ("base64", "AP8=")
        files = run(_call(server, "list_files", {"session_id": sid, "depth": 2})).structured_content["files"]
        assert {(f["path"], f["type"]) for f in files} >= {("d", "directory"), ("d/a.txt", "file"), ("b.bin", "file")}
        r = run(_call(server, "run_code", {"code": "echo $0", "language": "sh", "session_id": sid}))
        assert r.structured_content["stdout"] == "sh\n"
        missing = run(_call(server, "read_file", {"session_id": sid, "path": "nope"}))
        assert missing.is_error and "not_found" in missing.content[0].text
    finally:
        closed = run(_call(server, "close_session", {"session_id": sid}))
    assert not closed.is_error and closed.structured_content["state"] == "closed"
    after = run(_call(server, "run_code", {"code": "x", "session_id": sid}))
    assert after.is_error and "NOT_FOUND" in after.content[0].text


def test_refusals_and_bad_arguments_are_tool_errors(daemon):
    server = _app(daemon).server
    r = run(_call(server, "run_code", {"code": "1", "language": "cobol"}))
    assert r.is_error and "cobol" in r.content[0].text and r.structured_content["outcome"] == "rejected"
    r = run(_call(server, "execute", {"command": "true", "timeout": -1}))
    assert r.is_error and "invalid arguments" in r.content[0].text
    r = run(_call(server, "read_file", {"session_id": "s-does-not-exist", "path": "a"}))
    assert r.is_error and "NOT_FOUND" in r.content[0].text
    r = run(_call(server, "run_code", {"code": "1", "sesion_id": "typo"}))
    assert r.is_error and "sesion_id" in r.content[0].text


def test_a_policy_that_allows_no_sessions_gives_a_tool_error(start_daemon):
    d = start_daemon("[sessions]\nmax_live = 0\n")
    server = _app(d).server
    r = run(_call(server, "create_session", {}))
    assert r.is_error and "refused" in r.content[0].text, r.content[0].text
    r = run(_call(server, "run_code", {"code": "print(2 + 2)"}))        # the server serves on
    assert not r.is_error and r.structured_content["stdout"] == "4\n"


# ---- real `sandboxd mcp` processes ---------------------------------------------------------------------------

def _stdio(daemon) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, cwd=str(ROOT),
                                 args=["-m", "sandboxd.cli.daemon", "mcp", "--target", daemon.target],
                                 env={**os.environ, "SANDBOXD_TOKEN": ""})


def test_stdio_subprocess(daemon):
    params = _stdio(daemon)

    async def main():
        progress: list = []
        async with mcp.Client(params) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            one_shot = await c.call_tool("run_code", {"code": PRINT_THREE},
                                         progress_callback=lambda v, t, m: _append(progress, m))
            sid = (await c.call_tool("create_session", {})).structured_content["session_id"]
            await c.call_tool("run_code", {"code": "state = 'kept'", "session_id": sid})
        async with mcp.Client(params) as c:      # another process, another connection: the same session
            kept = await c.call_tool("run_code", {"code": "state", "session_id": sid})
            await c.call_tool("close_session", {"session_id": sid})
        return names, one_shot, progress, kept
    names, one_shot, progress, kept = run(main())
    assert names == TOOL_NAMES
    assert one_shot.structured_content["stdout"] == "0\n1\n2\n" and "".join(progress).startswith("0\n")
    assert kept.structured_content["results"][0]["text/plain"] == "'kept'"


async def _append(progress: list, message):
    progress.append(message or "")


def test_stdio_subprocess_refusal_is_a_tool_error(start_daemon):
    d = start_daemon("[sessions]\nmax_live = 0\n")

    async def main():
        async with mcp.Client(_stdio(d)) as c:
            refused = await c.call_tool("create_session", {})
            still = await c.call_tool("execute", {"command": "echo up"})
        return refused, still
    refused, still = run(main())
    assert refused.is_error and still.structured_content["stdout"] == "up\n"


@pytest.fixture
def http_server(daemon, tmp_path):
    token = "t-" + os.urandom(16).hex()
    (tmp_path / "token").write_text(token + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "sandboxd.cli.daemon", "mcp", "--http", "127.0.0.1:0",
                             "--token-file", str(tmp_path / "token"), "--target", daemon.target],
                            cwd=str(ROOT), stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SANDBOXD_TOKEN": ""})
    try:
        line = proc.stderr.readline()
        assert "serving http://127.0.0.1:" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        yield line.split("serving ", 1)[1].strip(), token
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_http_subprocess(http_server):
    url, token = http_server

    def connect(with_token: str = token):
        return mcp.Client(streamable_http_client(url, http_client=httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {with_token}"}, timeout=60)))

    async def main():
        progress: list = []
        async with connect() as c:
            names = {t.name for t in (await c.list_tools()).tools}
            one_shot = await c.call_tool("execute", {"command": "for i in 1 2 3; do echo $i; done"},
                                         progress_callback=lambda v, t, m: _append(progress, m))
            sid = (await c.call_tool("create_session", {})).structured_content["session_id"]
            await c.call_tool("write_file", {"session_id": sid, "path": "n.txt", "content": "7"})
            await c.call_tool("run_code", {"code": "n = int(open('n.txt').read())", "session_id": sid})
        async with connect() as c:
            kept = await c.call_tool("run_code", {"code": "n * 6", "session_id": sid})
            refused = await c.call_tool("run_code", {"code": "1", "language": "cobol"})
            await c.call_tool("close_session", {"session_id": sid})
        async with httpx2.AsyncClient() as h:
            anonymous = await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            wrong = await h.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                 headers={"Authorization": "Bearer wrong"})
        return names, one_shot, progress, kept, refused, anonymous.status_code, wrong.status_code
    names, one_shot, progress, kept, refused, anonymous, wrong = run(main())
    assert names == TOOL_NAMES
    assert one_shot.structured_content["stdout"] == "1\n2\n3\n" and "".join(progress) == "1\n2\n3\n"
    assert kept.structured_content["results"][0]["text/plain"] == "42"
    assert refused.is_error
    assert anonymous == 401 and wrong == 401
