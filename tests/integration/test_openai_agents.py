"""The OpenAI Agents SDK's SandboxAgent running its tools in sandboxd, driven by the SDK's own ScriptedModel."""
from __future__ import annotations

import asyncio
import io

import pytest

pytest.importorskip("agents.sandbox", reason="openai-agents is part of the dev install (make install)")
from agents import RunConfig, Runner, set_tracing_disabled  # noqa: E402
from agents.sandbox import Manifest, SandboxAgent, SandboxRunConfig  # noqa: E402
from openai.types.responses import ResponseCustomToolCall  # noqa: E402
from agents.testing import ScriptedModel, assistant_message, function_call  # noqa: E402

from sandboxd.integrations.openai_agents import AGENTS_VERSION, SandboxdSandboxClient  # noqa: E402

set_tracing_disabled(True)     # offline: no trace export
PATCH = "*** Begin Patch\n*** Add File: notes/plan.txt\n+step one\n+step two\n*** End Patch\n"


def _outputs(result) -> list[str]:
    return [str(item.output) for item in result.new_items if getattr(item, "type", "") == "tool_call_output_item"]


def test_a_sandbox_agent_execs_writes_and_reads_in_sandboxd(daemon):
    model = ScriptedModel([
        [function_call("exec_command", {"cmd": "echo $((6 * 7)) > answer.txt; cat answer.txt; pwd"}, call_id="c1")],
        [ResponseCustomToolCall(type="custom_tool_call", id="c2", call_id="c2", name="apply_patch", input=PATCH)],
        [function_call("exec_command", {"cmd": "wc -l notes/plan.txt; hostname; id -u"}, call_id="c3")],
        [assistant_message("done")],
    ])

    async def main():
        client = SandboxdSandboxClient(target=daemon.target)
        session = await client.create(manifest=Manifest())
        async with session:
            agent = SandboxAgent(name="worker", model=model, instructions="work in the sandbox")
            result = await Runner.run(agent, "go", run_config=RunConfig(
                sandbox=SandboxRunConfig(session=session)))
            written = (await session.read("notes/plan.txt")).read()
            await session.write("direct.bin", io.BytesIO(b"\x00\xff"))
            direct = await session.exec("od -An -tx1 direct.bin")
            sid = session._inner.state.sandboxd_session_id
        return result, written, direct, sid
    result, written, direct, sid = asyncio.run(main())
    outputs = _outputs(result)
    assert "42" in outputs[0] and "/work" in outputs[0], outputs
    assert "notes/plan.txt" in outputs[2] and "\nsandbox\n" in outputs[2], outputs   # sandboxd's hostname
    assert outputs[2].rstrip().splitlines()[-1] != "0", "the command ran as the session's own uid, not root"
    assert written.rstrip(b"\n") == b"step one\nstep two"
    assert direct.stdout.split() == [b"00", b"ff"]
    assert result.final_output == "done"
    with daemon.client() as c:
        info = c.list_sessions(include_closed=True)
        mine = [s for s in info if s.session_id == sid]
    assert mine and mine[0].state == "closed", "leaving the block closed the sandboxd session"
    assert mine[0].agent_name == "openai-agents" and mine[0].agent_version == AGENTS_VERSION


def test_resume_from_saved_state_reattaches_then_restores(daemon):
    async def main():
        client = SandboxdSandboxClient(target=daemon.target)
        session = await client.create(manifest=Manifest())
        await session.start()
        await session.exec("echo kept > state.txt")
        payload = client.serialize_session_state(session._inner.state)
        tar = (await session.persist_workspace()).read()

        other = SandboxdSandboxClient(target=daemon.target)      # another process, from the saved payload
        resumed = await other.resume(other.deserialize_session_state(dict(payload)))
        await resumed.start()
        same = await resumed.exec("cat state.txt")
        same_id = resumed._inner.state.sandboxd_session_id == session._inner.state.sandboxd_session_id
        await client.delete(session)                             # the sandboxd session ends

        again = await other.resume(other.deserialize_session_state(dict(payload)))
        await again.start()
        fresh = await again.exec("cat state.txt")
        await again.hydrate_workspace(io.BytesIO(tar))
        restored = await again.exec("cat state.txt")
        new_id = again._inner.state.sandboxd_session_id
        await other.delete(again)
        return same, same_id, fresh, restored, new_id, payload
    same, same_id, fresh, restored, new_id, payload = asyncio.run(main())
    assert same.stdout == b"kept\n" and same_id
    assert fresh.exit_code != 0, "a replacement session starts empty"
    assert restored.stdout == b"kept\n"
    assert new_id != payload["sandboxd_session_id"]
    assert "token" not in str(payload).lower()
