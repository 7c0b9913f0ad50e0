"""The OpenAI Agents SDK's SandboxAgent running its tools in sandboxd, driven by the SDK's own ScriptedModel."""
from __future__ import annotations

import asyncio
import io
import re

import pytest

pytest.importorskip("agents.sandbox", reason="openai-agents is part of the dev install (make install)")
from agents import RunConfig, RunHooks, Runner, set_tracing_disabled  # noqa: E402
from agents.sandbox import Manifest, SandboxAgent, SandboxRunConfig  # noqa: E402
from openai.types.responses import ResponseCustomToolCall  # noqa: E402
from agents.testing import ScriptedModel, assistant_message, function_call  # noqa: E402

from sandboxd.integrations.openai_agents import (AGENTS_VERSION, SandboxdSandboxClient,  # noqa: E402
                                                 SandboxdSandboxClientOptions)

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


class _Typist(RunHooks):
    """Plays the model's part at the terminal: the session id is the sandbox's to choose, so each write_stdin
    turn is scripted once the previous tool output has named it."""

    def __init__(self, model: ScriptedModel, keys: list[tuple[str, int]]):
        self.model, self.keys, self.outputs, self.process_id = model, keys, [], None

    async def on_tool_end(self, context, agent, tool, result) -> None:
        self.outputs.append(str(result))
        if m := re.search(r"Process running with session ID (\d+)", str(result)):
            self.process_id = int(m[1])
        if self.keys:
            chars, wait_ms = self.keys.pop(0)
            self.model.enqueue([function_call("write_stdin", {"session_id": self.process_id, "chars": chars,
                                                              "yield_time_ms": wait_ms},
                                              call_id=f"w{len(self.outputs)}")])
        else:
            self.model.enqueue([assistant_message("done")])


def test_a_sandbox_agent_drives_an_interactive_program_on_a_terminal(daemon):
    model = ScriptedModel([[function_call("exec_command", {"cmd": "python3 -q -i", "tty": True,
                                                           "yield_time_ms": 250}, call_id="c1")]])
    # The last keys end the program: its output up to its exit comes back whatever the timing was before.
    typist = _Typist(model, [("import os, sys\n", 250), ("print(6 * 7, os.isatty(0), os.getcwd())\n", 250),
                             ("raise SystemExit(3)\n", 30_000)])

    async def main():
        client = SandboxdSandboxClient(target=daemon.target)
        session = await client.create(manifest=Manifest(), options=SandboxdSandboxClientOptions(pty_timeout=120))
        async with session:
            agent = SandboxAgent(name="worker", model=model, instructions="work in the sandbox")
            result = await Runner.run(agent, "go", hooks=typist, run_config=RunConfig(
                sandbox=SandboxRunConfig(session=session)))
            left_open = dict(session._inner._pty)
        return result, left_open
    result, left_open = asyncio.run(main())
    assert [o.startswith("Chunk ID") for o in typist.outputs] == [True] * 4, typist.outputs
    assert "Process running with session ID" in typist.outputs[0], "the program outlived its first tool call"
    assert all("Process running" in o for o in typist.outputs[1:3]), typist.outputs
    screen = "".join(typist.outputs[1:])
    assert "42 True /work" in screen, "the typed line ran in the sandbox on a terminal and its output came back"
    assert "Process exited with code 3" in typist.outputs[3] and "session ID" not in typist.outputs[3]
    assert result.final_output == "done" and left_open == {}


def test_pty_session_methods_keep_processes_by_id_and_end_them(daemon):
    async def main():
        client = SandboxdSandboxClient(target=daemon.target)
        session = await client.create(manifest=Manifest(), options=SandboxdSandboxClientOptions(pty_timeout=120))
        await session.start()
        assert session.supports_pty()
        cat = await session.pty_exec_start("cat", tty=True, yield_time_s=0.25)
        sh = await session.pty_exec_start("sh", tty=True, yield_time_s=0.25)
        piped = await session.pty_exec_start("echo out; echo err >&2; exit 5", yield_time_s=30)
        assert cat.process_id and sh.process_id and cat.process_id != sh.process_id
        asked = await session.pty_write_stdin(session_id=sh.process_id, chars="stty size; tty\n")
        await session.pty_write_stdin(session_id=cat.process_id, chars="meow\n")
        ended = await session.pty_write_stdin(session_id=sh.process_id, chars="exit 7\n", yield_time_s=30)
        with pytest.raises(Exception, match="not found|PTY session"):
            await session.pty_write_stdin(session_id=sh.process_id, chars="")
        inner = session._inner
        open_ids = set(inner._pty)
        calls_open = (await inner._session.info()).active_calls
        await session.stop()                # the SDK's stop ends open processes before it snapshots
        for _ in range(600):                # the daemon ends the cancelled call on its own time
            if (await inner._session.info()).active_calls == 0:
                break
            await asyncio.sleep(0.05)
        calls_after = (await inner._session.info()).active_calls
        again = await session.pty_exec_start("sleep 100", tty=True, yield_time_s=0.25)
        await client.delete(session)
        return cat, piped, asked.output + ended.output, ended, open_ids, (calls_open, calls_after), again, inner
    cat, piped, screen, ended, open_ids, calls, again, inner = asyncio.run(main())
    assert piped.process_id is None and piped.exit_code == 5
    assert b"out" in piped.output and b"err" in piped.output, "stdout and stderr of a piped command both come back"
    assert ended.process_id is None and ended.exit_code == 7
    assert b"24 80" in screen and b"/pts/" in screen, screen
    assert open_ids == {cat.process_id}, "an exited process is forgotten, a running one kept"
    assert calls == (1, 0), "stopping the session ended the Exec call of the process still open"
    assert again.process_id is not None
    assert inner._pty == {} and inner._session is None, "deleting the session ended what was still open"
