"""A SandboxAgent of the OpenAI Agents SDK whose tools run in sandboxd, offline with the SDK's ScriptedModel.

    sudo .venv/bin/sandboxd serve &          # a daemon (or SANDBOXD_TARGET=unix:///path/to/its.sock)
    .venv/bin/python examples/agents/openai_agents.py

The scripted "model" asks for a shell command and a file; the script prints each tool output, reads the file
back through the sandbox session, and saves the session state the way a run would to resume it later.
"""
import asyncio

from agents import RunConfig, Runner, set_tracing_disabled
from agents.sandbox import Manifest, SandboxAgent, SandboxRunConfig
from agents.testing import ScriptedModel, assistant_message, function_call
from openai.types.responses import ResponseCustomToolCall

from sandboxd.integrations.openai_agents import SandboxdSandboxClient

PATCH = "*** Begin Patch\n*** Add File: report.md\n+# Report\n+all good\n*** End Patch\n"


async def main():
    set_tracing_disabled(True)
    model = ScriptedModel([
        [function_call("exec_command", {"cmd": "python3 -c 'print(sum(range(10)))'; id -u; pwd"}, call_id="c1")],
        [ResponseCustomToolCall(type="custom_tool_call", id="c2", call_id="c2", name="apply_patch", input=PATCH)],
        [assistant_message("The sum is 45; report.md is written.")],
    ])
    client = SandboxdSandboxClient()                       # $SANDBOXD_TARGET, else the standard socket
    session = await client.create(manifest=Manifest())
    async with session:                                    # leaving the block closes the sandboxd session
        agent = SandboxAgent(name="analyst", model=model, instructions="Use the sandbox.")
        result = await Runner.run(agent, "add 0..9 and write a report",
                                  run_config=RunConfig(sandbox=SandboxRunConfig(session=session)))
        for item in result.new_items:
            if item.type == "tool_call_output_item":
                print("tool output:\n ", str(item.output).replace("\n", "\n  "))
        print("report.md in the sandbox:", (await session.read("report.md")).read())
        state = client.serialize_session_state(session._inner.state)
        print("saved state names sandboxd session", state["sandboxd_session_id"])
        print("final output:", result.final_output)


if __name__ == "__main__":
    asyncio.run(main())
