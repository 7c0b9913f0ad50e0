"""An AutoGen CodeExecutorAgent whose code blocks run in sandboxd, offline with AutoGen's ReplayChatCompletionClient.

    sudo .venv/bin/sandboxd serve &          # a daemon (or SANDBOXD_TARGET=unix:///path/to/its.sock)
    .venv/bin/python examples/agents/autogen_example.py

The replayed "model" writes a python block and a shell block, then, in a second task, a block that uses the first
one's variable (the kernel keeps it); a block that runs too long is stopped by its timeout, and one is cancelled
through AutoGen's CancellationToken. The script prints what the sandbox did.
"""
import asyncio
import warnings

from autogen_agentchat.agents import CodeExecutorAgent
from autogen_agentchat.messages import CodeExecutionEvent
from autogen_core import CancellationToken
from autogen_core.code_executor import CodeBlock
from autogen_ext.models.replay import ReplayChatCompletionClient

from sandboxd.integrations.autogen import SandboxdCodeExecutor

warnings.filterwarnings("ignore", message="No approval function")   # the sandbox is the oversight here


async def run(agent, task: str) -> None:
    async for item in agent.run_stream(task=task):
        if isinstance(item, CodeExecutionEvent):
            r = item.result
            print(f"[{task}] exit code {r.exit_code} ({r.outcome}), sandboxd calls {r.call_ids}:")
            print("  " + r.output.rstrip().replace("\n", "\n  "))


async def main():
    model = ReplayChatCompletionClient([
        "```python\ntotal = sum(range(10))\nprint('total', total)\n```\n"
        "```sh\necho \"$(hostname) uid=$(id -u) cwd=$(pwd)\" | tee where.txt\n```\n",
        "total is 45.",
        "```python\nprint(total * 2, open('where.txt').read().split()[0])\n```\n",
        "done.",
    ])
    # $SANDBOXD_TARGET, else the standard socket; each block may run 5 seconds.
    async with SandboxdCodeExecutor(runner="python", timeout=5) as executor:
        print("sandboxd session", executor.session.id)
        agent = CodeExecutorAgent("coder", model_client=model, code_executor=executor)
        await run(agent, "add 0..9")
        await run(agent, "double it")

        r = await executor.execute_code_blocks([CodeBlock("import time\ntime.sleep(60)", "python")],
                                               CancellationToken())
        print(f"a 60s sleep with timeout=5: exit code {r.exit_code}, outcome {r.outcome}")

        token = CancellationToken()
        task = asyncio.ensure_future(executor.execute_code_blocks([CodeBlock("sleep 60", "sh")], token))
        asyncio.get_running_loop().call_later(1, token.cancel)
        try:
            await task
        except asyncio.CancelledError:
            print("a 60s shell block cancelled through its CancellationToken: the daemon killed it")


if __name__ == "__main__":
    asyncio.run(main())
