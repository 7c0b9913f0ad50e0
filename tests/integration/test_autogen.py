"""AutoGen's CodeExecutorAgent running its code blocks in sandboxd, driven by AutoGen's own replayed model client
(ReplayChatCompletionClient: no network, no LLM): state kept across blocks and runs, a shell block, a timeout, a
cancellation through a CancellationToken."""
from __future__ import annotations

import asyncio
import time
from importlib.metadata import version

import pytest

pytest.importorskip("autogen_agentchat", reason="autogen is part of the dev install (make install)")
from autogen_agentchat.agents import CodeExecutorAgent  # noqa: E402
from autogen_agentchat.messages import CodeExecutionEvent  # noqa: E402
from autogen_core import CancellationToken  # noqa: E402
from autogen_core.code_executor import CodeBlock, CodeExecutor  # noqa: E402
from autogen_ext.models.replay import ReplayChatCompletionClient  # noqa: E402

from sandboxd.client import FileError, SandboxdError  # noqa: E402
from sandboxd.integrations.autogen import SandboxdCodeExecutor  # noqa: E402

# CodeExecutorAgent warns when it has no approval function; here the sandbox is the point.
pytestmark = pytest.mark.filterwarnings("ignore:No approval function")


async def _run(agent, task: str, token: CancellationToken | None = None):
    """agent.run_stream: the code execution results (run() keeps only the final response) and the final text."""
    items = [item async for item in agent.run_stream(task=task, cancellation_token=token)]
    return [m.result for m in items if isinstance(m, CodeExecutionEvent)], items[-1].messages[-1].content


async def _until(predicate, timeout: float = 20.0) -> bool:
    """Wait for a state (not a timing): a file the sandbox writes, a record the daemon finishes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def _exists(session, path: str) -> bool:
    try:
        await session.stat(path)
        return True
    except FileError:
        return False


def _records(daemon, session_id: str) -> list[dict]:
    with daemon.client() as c:
        runs, _ = c.list_runs(limit=200)
    return [r for r in runs if r.get("session_id") == session_id]


def test_a_code_executor_agent_keeps_state_across_blocks_and_runs(daemon):
    model = ReplayChatCompletionClient([
        "Computing:\n```python\nx = 6 * 7\nprint('x is', x)\n```\nand in the shell:\n"
        "```sh\necho \"from sh $x\" > from_sh.txt; pwd; hostname; id -u\n```\n",
        "x is 42.",
        "```python\nprint(x + 1, open('from_sh.txt').read().strip())\nx / 0\n```\n",
        "It raised.",
    ])

    async def main():
        async with SandboxdCodeExecutor(target=daemon.target) as executor:
            agent = CodeExecutorAgent("coder", model_client=model, code_executor=executor)
            first = await _run(agent, "compute x")
            second = await _run(agent, "use x")
            return first, second, executor.session.id
    ([r1], text1), ([r2], text2), sid = asyncio.run(main())
    assert r1.exit_code == 0 and r1.outcome == "exited", r1
    lines = r1.output.splitlines()
    assert lines[0] == "x is 42" and lines[1] == "/work" and lines[2] == "sandbox", r1.output
    assert lines[3] != "0", "the shell block ran as the session's own uid, not root"
    assert len(r1.call_ids) == 2, "one kernel cell and one Exec"
    # The second run sees the first run's variable and the shell block's file; the exception is reported back.
    assert r2.exit_code == 1 and "\n43 from sh\nTraceback" in r2.output, r2.output   # the agent's framing
    assert "ZeroDivisionError" in r2.output and "\x1b[" not in r2.output, r2.output
    assert (text1, text2) == ("x is 42.", "It raised."), "the replayed model reflected on each result"
    with daemon.client() as c:
        info = next(s for s in c.list_sessions(include_closed=True) if s.session_id == sid)
    assert info.state == "closed", "leaving the block closed the session the executor created"
    assert info.agent_name == "autogen" and info.agent_version == version("autogen-core")
    kinds = sorted(r["kind"] for r in _records(daemon, sid) if r.get("kind") in ("code", "exec"))
    assert kinds == ["code", "code", "exec"], kinds
    assert not daemon.wait_no_leftovers()


def test_the_executor_contract(daemon):
    assert issubclass(SandboxdCodeExecutor, CodeExecutor)

    async def main():
        executor = SandboxdCodeExecutor(target=daemon.target, memory=256 << 20)
        with pytest.raises(ValueError, match="not started"):
            await executor.execute_code_blocks([CodeBlock("1", "python")], CancellationToken())
        await executor.start()
        try:
            token = CancellationToken()
            run = executor.execute_code_blocks
            r = await run([CodeBlock("import os\nv = 'kept'\nos.getcwd()", "python"),
                           CodeBlock("echo $0 $((1 + 1))", "bash"), CodeBlock("exit 3", "shell"),
                           CodeBlock("echo never", "sh")], token)
            assert (r.exit_code, r.output) == (3, "'/work'\nbash 2\n"), r   # stops at the first failing block
            assert (await run([CodeBlock("print(v)", "py")], token)).output == "kept\n"
            r = await run([CodeBlock("# filename: tools/hello.py\nprint('hi from a file')", "python"),
                           CodeBlock("python3 tools/hello.py", "sh")], token)
            assert r.output == "hi from a file\nhi from a file\n" and r.code_file == "/work/tools/hello.py", r
            r = await run([CodeBlock("# filename: ../../etc/x.py\n1", "python")], token)
            assert r.exit_code == 1 and "Could not save '../../etc/x.py'" in r.output, r
            r = await run([CodeBlock("console.log(1)", "javascript")], token)
            assert r.exit_code == 1 and "Unsupported language 'javascript'" in r.output, r
            r = await run([CodeBlock("kill -KILL $$", "sh")], token)
            assert (r.exit_code, r.outcome) == (137, "signaled"), r
            await executor.restart()       # a fresh python context; the workspace stays
            r = await run([CodeBlock("print(v)", "python")], token)
            assert r.exit_code == 1 and "NameError" in r.output, r
            assert (await run([CodeBlock("cat tools/hello.py", "sh")], token)).exit_code == 0
            # As an AutoGen component: the configuration holds the runner, limits and target, never a client.
            config = executor.dump_component()
            assert config.provider == "sandboxd.integrations.autogen.SandboxdCodeExecutor"
            assert config.config["session_options"] == {"memory": 256 << 20}
            again = SandboxdCodeExecutor.load_component(config)
            assert isinstance(again, SandboxdCodeExecutor) and again.timeout == executor.timeout
            # Attached to an existing session: runs there, and stop() leaves it open.
            async with SandboxdCodeExecutor(target=daemon.target, session_id=executor.session.id) as attached:
                out = await attached.execute_code_blocks([CodeBlock("head -1 tools/hello.py", "sh")], token)
                assert out.output == "# filename: tools/hello.py\n", out
            assert (await executor.session.info()).state != "closed"
            sid = executor.session.id
        finally:
            await executor.stop()
        with pytest.raises(SandboxdError, match="NOT_FOUND.*closed"):   # stop() closed the session it made
            async with SandboxdCodeExecutor(target=daemon.target, session_id=sid):
                pass
    asyncio.run(main())
    assert not daemon.wait_no_leftovers()


def test_a_block_past_its_timeout_is_stopped_and_reported_as_autogen_does(daemon):
    async def main():
        async with SandboxdCodeExecutor(target=daemon.target, timeout=1) as executor:
            token = CancellationToken()
            r = await executor.execute_code_blocks(
                [CodeBlock("y = 5\nimport time\nprint('sleeping', flush=True)\ntime.sleep(120)", "python")], token)
            assert (r.exit_code, r.outcome) == (124, "timeout"), r
            assert r.output.startswith("sleeping\n") and "\nTimeout: " in r.output, r.output
            assert (await executor.execute_code_blocks([CodeBlock("print(y)", "python")], token)).output == "5\n"
            r = await executor.execute_code_blocks([CodeBlock("sleep 120 & sleep 121; echo never", "sh")], token)
            assert (r.exit_code, r.outcome) == (124, "timeout") and "never" not in r.output, r
            ps = await executor.session.exec("ps -eo args 2>/dev/null || cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
            assert "sleep 12" not in ps.text, ps.text   # the command's whole process group was killed
            return executor.session.id
    sid = asyncio.run(main())
    outcomes = sorted(r["outcome"] for r in _records(daemon, sid) if r.get("kind") in ("code", "exec")
                      and r["outcome"] == "timeout")
    assert outcomes == ["timeout", "timeout"], _records(daemon, sid)
    assert not daemon.wait_no_leftovers()


def test_a_cancellation_token_interrupts_the_cell_and_kills_the_command(daemon):
    """Cancelled while running (the sandbox has said so by writing a file): execute_code_blocks raises
    CancelledError, the cell is interrupted (the kernel and its state live on) and the command's processes are
    killed. (wait_for only bounds a hang if the token were ignored.)"""
    model = ReplayChatCompletionClient([
        "```python\nz = 'before'\nopen('cell-started', 'w').close()\nimport time\ntime.sleep(300)\n"
        "z = 'after'\n```\n",
    ])

    async def main():
        async with SandboxdCodeExecutor(target=daemon.target) as executor:
            session = executor.session
            agent = CodeExecutorAgent("coder", model_client=model, code_executor=executor)
            token = CancellationToken()
            run = asyncio.ensure_future(_run(agent, "sleep", token))
            assert await _until(lambda: _exists(session, "cell-started")), "the cell never started"
            token.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(run, 120)
            r = await executor.execute_code_blocks([CodeBlock("print(z)", "python")], CancellationToken())
            assert (r.exit_code, r.output) == (0, "before\n"), r   # interrupted mid-cell; the kernel lived on

            token = CancellationToken()
            block = CodeBlock("touch cmd-started; sleep 301; touch cmd-finished", "sh")
            task = asyncio.ensure_future(executor.execute_code_blocks([block], token))
            assert await _until(lambda: _exists(session, "cmd-started")), "the command never started"
            token.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 120)

            async def no_sleep():
                ps = await session.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
                return "sleep 301" not in ps.text
            assert await _until(no_sleep), "the cancelled command's process is still running"
            assert not await _exists(session, "cmd-finished")
    asyncio.run(main())
    assert not daemon.wait_no_leftovers()


def test_a_cancelled_call_is_recorded(daemon):
    async def main():
        async with SandboxdCodeExecutor(target=daemon.target) as executor:
            token = CancellationToken()
            task = asyncio.ensure_future(executor.execute_code_blocks(
                [CodeBlock("touch started; sleep 302", "sh")], token))
            assert await _until(lambda: _exists(executor.session, "started"))
            token.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 120)
            return executor.session.id
    sid = asyncio.run(main())
    assert [r["outcome"] for r in _records(daemon, sid) if r.get("kind") == "exec"] == ["cancelled"]
