"""A deep agent whose shell and files are a sandboxd session, driven offline by a scripted chat model.

    .venv/bin/python examples/agents/deepagents_example.py [--target unix:///run/sandboxd/sandboxd.sock]

The "model" is langchain_core's GenericFakeChatModel replaying three turns: an `execute` tool call, a
`write_file` tool call, then a final answer. No network, no LLM: swap in a real chat model and nothing else
changes. What the sandbox did is printed from the agent's tool messages and read back from the session.
"""
from __future__ import annotations

import argparse

from deepagents import create_deep_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage

from sandboxd.integrations.deepagents import SandboxdBackend


class ScriptedModel(GenericFakeChatModel):
    """GenericFakeChatModel with tool binding: deep agents bind their tools to the model; the script already
    says which to call."""

    def bind_tools(self, tools, **kwargs):
        return self


def script() -> list[AIMessage]:
    return [
        AIMessage("", tool_calls=[{"id": "call-1", "name": "execute",
                                   "args": {"command": "python -c 'import sys; print(sum(range(10)), sys.version_info[:2])'"
                                                       " && id -u && echo to-stderr >&2"}}]),
        AIMessage("", tool_calls=[{"id": "call-2", "name": "write_file",
                                   "args": {"file_path": "/work/report.txt", "content": "sum is 45\n"}}]),
        AIMessage("The sum is 45; the report is in /work/report.txt."),
    ]


def run(target: str | None = None, runner: str = "python") -> dict:
    """Run the agent once and return what happened (the test of this example checks it)."""
    with SandboxdBackend(runner=runner, target=target) as backend:
        agent = create_deep_agent(model=ScriptedModel(messages=iter(script())), backend=backend)
        state = agent.invoke({"messages": [{"role": "user", "content": "Add 0..9 and write a report."}]})
        tools = [m for m in state["messages"] if isinstance(m, ToolMessage)]
        return {"session": backend.id, "tool_messages": [(m.name, m.content) for m in tools],
                "report": backend.session.read("/work/report.txt").decode(),
                "answer": state["messages"][-1].content}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="sandboxd's address (default $SANDBOXD_TARGET or the standard socket)")
    parser.add_argument("--runner", default="python")
    args = parser.parse_args()
    out = run(args.target, args.runner)
    print(f"sandboxd session {out['session']}")
    for name, content in out["tool_messages"]:
        print(f"--- tool {name}:\n{content}")
    print(f"--- /work/report.txt read back from the session:\n{out['report']}", end="")
    print(f"--- agent's answer: {out['answer']}")


if __name__ == "__main__":
    main()
