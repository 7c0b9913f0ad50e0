"""sandboxd's MCP server driven by the MCP SDK's own client, offline: no model, the calls an agent would make.

    sudo .venv/bin/sandboxd serve &          # a daemon (or SANDBOXD_TARGET=unix:///path/to/its.sock)
    .venv/bin/python examples/agents/mcp_client.py

It starts `sandboxd mcp` on stdio as a subprocess (as Claude Desktop or Cursor would), lists the tools, runs a
one-shot script with its output streamed as progress notifications, then keeps state in a session across two
separate MCP connections, and prints what the sandbox did.
"""
import asyncio
import os
import sys

from mcp import Client, StdioServerParameters

# The SDK starts stdio servers with a minimal environment: pass on where the daemon is.
SERVER = StdioServerParameters(command=sys.executable, args=["-m", "sandboxd.cli.daemon", "mcp"],
                               env={k: v for k, v in os.environ.items() if k.startswith(("SANDBOXD_", "PATH"))})


async def progress(value, total, message):
    print(f"  progress {value:>4}: {message!r}")


async def main():
    async with Client(SERVER) as c:
        print("tools:", ", ".join(t.name for t in (await c.list_tools()).tools))
        r = await c.call_tool("run_code", {"code": "for i in range(3): print('line', i, flush=True)"},
                              progress_callback=progress)
        print("one-shot:", r.structured_content["outcome"], repr(r.structured_content["stdout"]))
        session_id = (await c.call_tool("create_session", {})).structured_content["session_id"]
        await c.call_tool("write_file", {"session_id": session_id, "path": "data.csv", "content": "a,b\n1,2\n3,4\n"})
        await c.call_tool("run_code", {"session_id": session_id,
                                       "code": "import csv; rows = list(csv.reader(open('data.csv')))"})
    async with Client(SERVER) as c:                       # a new connection finds the same session by its id
        r = await c.call_tool("run_code", {"session_id": session_id, "code": "len(rows)"})
        print("rows, from the kernel kept between connections:", r.structured_content["results"][0]["text/plain"])
        r = await c.call_tool("execute", {"session_id": session_id, "command": "wc -l data.csv"})
        print("execute:", r.structured_content["stdout"].strip())
        r = await c.call_tool("run_code", {"code": "1", "language": "cobol"})
        print("a refused call is a tool error:", r.is_error, "-", r.content[0].text)
        await c.call_tool("close_session", {"session_id": session_id})


if __name__ == "__main__":
    asyncio.run(main())
