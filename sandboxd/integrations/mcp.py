"""sandboxd as an MCP server (the official `mcp` SDK, 2.x): `sandboxd mcp` on stdio or streamable HTTP.

The server is a client of the daemon like any other (sandboxd.aio), so every tool call is authenticated as the
process that runs the server (its unix peer credentials, or --token) and recorded with the agent claims
agent_name="mcp" and the SDK's version. It holds no state of its own: a session lives in the daemon and is
named by the session_id a tool call passes, so clients that open a new MCP connection per call (e.g.
langchain-mcp-adapters) still reach it, and two MCP servers of the same principal share sessions.

Output chunks go to the caller as progress notifications while a call runs (progress: the bytes so far;
message: the chunk's text), when the request carried a progress token. What the code did is the result, never
a tool error; the daemon's refusals (policy, unknown runner or session, bad limits) and invalid arguments are
tool errors (isError) with the daemon's status and message, so the model can read them and go on.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import importlib.metadata
from typing import Any, Callable

import jsonschema
import mcp_types as types
from mcp.server.lowlevel import Server

from .. import __version__
from ..aio import AsyncClient
from ..client import CodeError, CodeResult, Output, Result, RichResult, SandboxdError

MCP_VERSION = importlib.metadata.version("mcp")
TEXT_LIMIT = 64 << 10     # characters of stdout/stderr repeated in the text content (structuredContent has all)

_SESSION_ID = {"type": "string", "minLength": 1, "description": "a session from create_session"}
_TIMEOUT = {"type": "number", "exclusiveMinimum": 0,
            "description": "wall-clock limit in seconds (default: the runner's)"}

_RUN_OUTPUT = {
    "type": "object",
    "properties": {
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "exit_code": {"type": ["integer", "null"]},
        "outcome": {"type": "string", "description": "exited, signaled, timeout, memory_limit, output_limit, "
                                                    "cancelled, rejected, setup_failed, interrupted"},
        "results": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "string"}},
                    "description": "MIME bundles of a cell's value and display() calls (text/plain always)"},
        "error": {"type": ["object", "null"],
                  "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                                 "traceback": {"type": "array", "items": {"type": "string"}}}},
    },
    "required": ["stdout", "stderr", "exit_code", "outcome", "results", "error"],
}

_SESSION_OUTPUT = {
    "type": "object",
    "properties": {"session_id": {"type": "string"}, "runner": {"type": "string"}, "state": {"type": "string"},
                   "expires_at": {"type": "number"}, "end_reason": {"type": "string"}},
    "required": ["session_id", "runner", "state"],
}


def _tool(name: str, description: str, properties: dict, required: list[str], annotations: types.ToolAnnotations,
          output: dict | None = None) -> types.Tool:
    return types.Tool(name=name, description=description, annotations=annotations, output_schema=output,
                      input_schema={"type": "object", "properties": properties, "required": required,
                                    "additionalProperties": False})


# Hints: nothing here reaches the outside world (a sandbox has no network unless a policy gives it one); code
# may change a session's workspace, so running it is not read-only.
TOOLS = [
    _tool("run_code", "Run code. Without session_id: in a fresh sandbox, discarded afterwards (language names "
          "a sandboxd runner: python, bash, sh, node...). With session_id: python runs in the session's "
          "kernel, whose variables and imports persist between calls; bash and sh run as a command there.",
          {"code": {"type": "string", "description": "the program or cell"},
           "language": {"type": "string", "default": "python", "minLength": 1},
           "session_id": _SESSION_ID, "timeout": _TIMEOUT}, ["code"],
          types.ToolAnnotations(title="Run code in a sandbox", read_only_hint=False, destructive_hint=True,
                                idempotent_hint=False, open_world_hint=False), _RUN_OUTPUT),
    _tool("execute", "Run a shell command line (sh -c). Without session_id: in a fresh sandbox; with one: in "
          "that session's workspace (/work), where files persist between calls.",
          {"command": {"type": "string", "minLength": 1}, "session_id": _SESSION_ID, "timeout": _TIMEOUT},
          ["command"],
          types.ToolAnnotations(title="Run a shell command in a sandbox", read_only_hint=False,
                                destructive_hint=True, idempotent_hint=False, open_world_hint=False), _RUN_OUTPUT),
    _tool("create_session", "Create a session: one sandbox kept for many calls, with a workspace (/work) and a "
          "Python kernel that persist until close_session or the idle timeout.",
          {"runner": {"type": "string", "default": "python", "minLength": 1},
           "idle_timeout": {"type": "number", "exclusiveMinimum": 0,
                            "description": "seconds without a call before the session closes"}}, [],
          types.ToolAnnotations(title="Create a sandbox session", read_only_hint=False, destructive_hint=False,
                                idempotent_hint=False, open_world_hint=False), _SESSION_OUTPUT),
    _tool("close_session", "Close a session: its processes, kernels and workspace are gone.",
          {"session_id": _SESSION_ID}, ["session_id"],
          types.ToolAnnotations(title="Close a sandbox session", read_only_hint=False, destructive_hint=True,
                                idempotent_hint=True, open_world_hint=False), _SESSION_OUTPUT),
    _tool("write_file", "Write a file in a session's workspace (paths relative to /work), creating parent "
          "directories and replacing what was there.",
          {"session_id": _SESSION_ID, "path": {"type": "string", "minLength": 1}, "content": {"type": "string"},
           "encoding": {"type": "string", "enum": ["utf-8", "base64"], "default": "utf-8"}},
          ["session_id", "path", "content"],
          types.ToolAnnotations(title="Write a file in a session", read_only_hint=False, destructive_hint=True,
                                idempotent_hint=True, open_world_hint=False),
          {"type": "object", "properties": {"path": {"type": "string"}, "size": {"type": "integer"},
                                            "sha256": {"type": "string"}}, "required": ["path", "size"]}),
    _tool("read_file", "Read a file from a session's workspace: its text, or base64 when it is not UTF-8.",
          {"session_id": _SESSION_ID, "path": {"type": "string", "minLength": 1}}, ["session_id", "path"],
          types.ToolAnnotations(title="Read a file in a session", read_only_hint=True, destructive_hint=False,
                                idempotent_hint=True, open_world_hint=False),
          {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                                            "encoding": {"type": "string", "enum": ["utf-8", "base64"]},
                                            "size": {"type": "integer"}},
           "required": ["path", "content", "encoding", "size"]}),
    _tool("list_files", "List a directory of a session's workspace, depth levels down.",
          {"session_id": _SESSION_ID, "path": {"type": "string", "default": "."},
           "depth": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1}}, ["session_id"],
          types.ToolAnnotations(title="List files in a session", read_only_hint=True, destructive_hint=False,
                                idempotent_hint=True, open_world_hint=False),
          {"type": "object", "properties": {"files": {"type": "array", "items": {
              "type": "object", "properties": {"name": {"type": "string"}, "path": {"type": "string"},
                                               "type": {"type": "string"}, "size": {"type": "integer"},
                                               "mode": {"type": "integer"}, "mtime": {"type": "number"}}}}},
           "required": ["files"]}),
]
_BY_NAME = {t.name: t for t in TOOLS}
_SHELLS = ("bash", "sh")


class ToolError(Exception):
    """A call the server cannot serve: reported to the model as a tool error, never raised to the transport."""


class SandboxdMCP:
    """The MCP server object: `.server` is the SDK's lowlevel Server, to run on any transport.

    `client_factory` makes the sandboxd.aio.AsyncClient the tools use (default: $SANDBOXD_TARGET, $SANDBOXD_TOKEN,
    with the MCP agent claims); it is called once per event loop, since a grpc.aio channel belongs to the loop
    that created it."""

    def __init__(self, client_factory: Callable[[], AsyncClient] | None = None, *, default_runner: str = "python"):
        self._factory = client_factory or (lambda: AsyncClient(agent_name="mcp", agent_version=MCP_VERSION))
        self._clients: dict[asyncio.AbstractEventLoop, AsyncClient] = {}
        self.default_runner = default_runner
        self.server = Server("sandboxd", version=__version__, instructions=(
            "Runs code in isolated Linux sandboxes. Use create_session for state that persists between calls "
            "(files, a Python kernel) and pass its session_id; close_session when done."),
            on_list_tools=self._list_tools, on_call_tool=self._call_tool)

    def client(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = self._factory()
        return self._clients[loop]

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.close()

    async def _list_tools(self, ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=TOOLS)

    async def _call_tool(self, ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool, args = _BY_NAME.get(params.name), dict(params.arguments or {})
        try:
            if tool is None:
                raise ToolError(f"unknown tool {params.name!r}")
            try:
                jsonschema.validate(args, tool.input_schema)
            except jsonschema.ValidationError as e:
                raise ToolError(f"invalid arguments: {e.message}") from None
            return await getattr(self, f"_tool_{tool.name}")(ctx, **args)
        except ToolError as e:
            return _error(str(e), params.name)
        except SandboxdError as e:
            return _error(f"sandboxd refused the call: {e.code}: {e.message}", params.name, e.code)

    # ---- tools -----------------------------------------------------------------------------------------------

    async def _tool_run_code(self, ctx, code: str, language: str = "python", session_id: str = "",
                             timeout: float = 0) -> types.CallToolResult:
        if not session_id:
            return await self._one_shot(ctx, code, language, timeout)
        if language in _SHELLS:
            return await self._in_session(ctx, session_id, [language, "-c", code], timeout)
        if language not in ("python", "python3"):
            raise ToolError(f"language {language!r}: a session runs python in its kernel, or bash and sh as "
                            f"commands; run other languages without session_id")
        session = await self.client().attach(session_id)
        progress = _Progress(ctx)
        run = _Collected()
        async for event in session.run_code_stream(code, timeout=timeout):
            if isinstance(event, Output):
                await progress.chunk(event)
            run.add(event)
        return run.result()

    async def _tool_execute(self, ctx, command: str, session_id: str = "", timeout: float = 0):
        if not session_id:
            return await self._one_shot(ctx, command, "sh", timeout)
        return await self._in_session(ctx, session_id, command, timeout)

    async def _tool_create_session(self, ctx, runner: str = "", idle_timeout: float = 0):
        session = await self.client().session(runner or self.default_runner, idle_timeout=idle_timeout)
        return _session_result(await session.info(), f"created session {session.id}")

    async def _tool_close_session(self, ctx, session_id: str):
        info = await self.client().close_session(session_id)
        return _session_result(info, f"closed session {session_id}")

    async def _tool_write_file(self, ctx, session_id: str, path: str, content: str, encoding: str = "utf-8"):
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
        except ValueError as e:
            raise ToolError(f"content: not base64: {e}") from None
        result = await (await self.client().attach(session_id)).write(path, data)
        return _ok(f"wrote {len(data)} bytes to {path}", {"path": path, "size": result.size or len(data),
                                                          "sha256": result.sha256})

    async def _tool_read_file(self, ctx, session_id: str, path: str):
        data = await (await self.client().attach(session_id)).read(path)
        try:
            content, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            content, encoding = base64.b64encode(data).decode(), "base64"
        text = content if encoding == "utf-8" else f"{path}: {len(data)} bytes of binary data (base64):\n{content}"
        return _ok(text, {"path": path, "content": content, "encoding": encoding, "size": len(data)})

    async def _tool_list_files(self, ctx, session_id: str, path: str = ".", depth: int = 1):
        files = await (await self.client().attach(session_id)).list(path, depth)
        entries = [{"name": f.name, "path": f.path, "type": f.type, "size": f.size, "mode": f.mode,
                    "mtime": f.mtime} for f in files]
        text = "\n".join(f"{f.type:9} {f.size:>10} {f.path}" for f in files) or f"{path}: empty"
        return _ok(text, {"files": entries})

    # ---- the two ways code runs ------------------------------------------------------------------------------

    async def _one_shot(self, ctx, code: str, runner: str, timeout: float) -> types.CallToolResult:
        progress, run = _Progress(ctx), _Collected()
        async for event in self.client().execute(code, runner, wall_time=timeout):
            if isinstance(event, Output):
                await progress.chunk(event)
            run.add(event)
        return run.result()

    async def _in_session(self, ctx, session_id: str, cmd, timeout: float) -> types.CallToolResult:
        session = await self.client().attach(session_id)
        progress, run = _Progress(ctx), _Collected()
        async with await session.start(cmd, timeout=timeout, stdin=b"", close_stdin=True) as process:
            async for event in process:
                if isinstance(event, Output):
                    await progress.chunk(event)
                run.add(event)
        return run.result()


class _Progress:
    """Output chunks as progress notifications: progress counts the bytes so far, the message is the text."""

    def __init__(self, ctx):
        self.ctx, self.total = ctx, 0

    async def chunk(self, event: Output) -> None:
        self.total += len(event.data)
        await self.ctx.session.report_progress(self.total, None, event.data.decode("utf-8", "replace"))


class _Collected:
    """The events of one call, folded into the tool result's structured content."""

    def __init__(self):
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.results: list[dict] = []
        self.error: dict | None = None
        self.end: Result | CodeResult | None = None

    def add(self, event) -> None:
        if isinstance(event, Output):
            self.out[event.stream] += event.data
        elif isinstance(event, RichResult):
            self.results.append(dict(event.data))
        elif isinstance(event, CodeError):
            self.error = {"name": event.name, "value": event.value, "traceback": list(event.traceback)}
        elif isinstance(event, (Result, CodeResult)):
            self.end = event

    def result(self) -> types.CallToolResult:
        end = self.end
        if end is None:
            raise ToolError("the daemon ended the call without a result")
        if isinstance(end, Result):
            exit_code = end.exit_code if end.outcome == "exited" else None
        else:   # a cell: 0 when it ran to its end, 1 when it raised (as `sandboxctl code` exits)
            exit_code = (1 if self.error else 0) if end.outcome == "exited" else None
        if end.outcome != "exited" and self.error is None:
            self.error = {"name": end.outcome, "value": end.message, "traceback": []}
        data = {"stdout": self.out["stdout"].decode("utf-8", "replace"),
                "stderr": self.out["stderr"].decode("utf-8", "replace"),
                "exit_code": exit_code, "outcome": end.outcome, "results": self.results, "error": self.error}
        return _ok(_run_text(data), data)


def _run_text(d: dict) -> str:
    parts = [f"outcome: {d['outcome']}" + (f", exit code {d['exit_code']}" if d["exit_code"] is not None else "")]
    for stream in ("stdout", "stderr"):
        if d[stream]:
            text = d[stream]
            cut = f"\n[... {len(text) - TEXT_LIMIT} more characters]" if len(text) > TEXT_LIMIT else ""
            parts.append(f"{stream}:\n{text[:TEXT_LIMIT]}{cut}")
    parts += [f"result:\n{r.get('text/plain', '')}" for r in d["results"]]
    if d["error"]:
        e = d["error"]
        parts.append("error: " + ("\n".join(e["traceback"]) or f"{e['name']}: {e['value']}"))
    return "\n".join(parts)


def _session_result(info, text: str) -> types.CallToolResult:
    return _ok(text, {"session_id": info.session_id, "runner": info.runner, "state": info.state,
                      "expires_at": info.expires_at, "end_reason": info.end_reason})


def _ok(text: str, data: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], structured_content=data)


def _error(message: str, tool: str, code: str = "") -> types.CallToolResult:
    """A tool error; run tools keep their output shape so a client validating it still can."""
    data = None
    if tool in ("run_code", "execute"):
        data = {"stdout": "", "stderr": "", "exit_code": None, "outcome": "rejected", "results": [],
                "error": {"name": code or "ToolError", "value": message, "traceback": []}}
    return types.CallToolResult(content=[types.TextContent(text=message)], structured_content=data, is_error=True)


# ---- transports ------------------------------------------------------------------------------------------------

async def serve_stdio(app: SandboxdMCP) -> None:
    from mcp.server.stdio import stdio_server
    try:
        async with stdio_server() as (read, write):
            await app.server.run(read, write, app.server.create_initialization_options())
    finally:
        await app.aclose()


def bearer_guard(asgi_app, token: str):
    """Requests without `Authorization: Bearer <token>` get 401 before they reach the MCP app."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"a bearer token is required\n"})
                return
        await asgi_app(scope, receive, send)
    return guarded


async def serve_http(app: SandboxdMCP, host: str, port: int, token: str, ready: Callable[[str], None] = print):
    """Streamable HTTP at http://HOST:PORT/mcp, every request checked against the bearer token."""
    import uvicorn
    starlette_app = app.server.streamable_http_app(host=host)
    config = uvicorn.Config(bearer_guard(starlette_app, token), host=host, port=port, log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)

    serving = asyncio.ensure_future(server.serve())
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            ready(f"http://{f'[{host}]' if ':' in host else host}:{port}/mcp")
        await serving
    finally:
        await app.aclose()
