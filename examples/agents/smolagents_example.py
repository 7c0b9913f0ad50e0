"""A smolagents CodeAgent whose code runs in a sandboxd session's Python kernel, driven offline by a scripted
model.

    .venv/bin/python examples/agents/smolagents_example.py [--target unix:///run/sandboxd/sandboxd.sock]

The "model" replays five steps: define a variable, write a line with a syntax error (the agent sees the error
and goes on), call a tool on the variable from the first step, make a PIL image, and give the final answer.
No network, no LLM: swap in a real smolagents model and nothing else changes. It needs the python-data runner
(`make image-data`): smolagents' final_answer tool imports numpy and PIL.
"""
from __future__ import annotations

import argparse

from smolagents import CodeAgent, tool
from smolagents.memory import ActionStep
from smolagents.models import ChatMessage, MessageRole, Model

from sandboxd.integrations.smolagents import SandboxdExecutor

STEPS = [
    "Thought: keep a number for later.\n<code>\nx = 21\nprint('x is', x)\n</code>",
    "Thought: a typo.\n<code>\ny = (x +\n</code>",
    "Thought: double it with the tool.\n<code>\ndoubled = double(x)\nprint('doubled', doubled)\n</code>",
    "Thought: draw it.\n<code>\nfrom PIL import Image\nImage.new('RGB', (doubled, 2), 'red')\n</code>",
    "Thought: done.\n<code>\nfinal_answer(f'the answer is {doubled}')\n</code>",
]


class ScriptedModel(Model):
    """A smolagents Model that answers each call with the next canned message."""

    def __init__(self, replies: list[str]):
        super().__init__(model_id="scripted")
        self.replies = list(replies)

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        return ChatMessage(role=MessageRole.ASSISTANT, content=self.replies.pop(0))


@tool
def double(n: int) -> int:
    """Doubles a number.

    Args:
        n: the number to double.
    """
    return 2 * n


def run(target: str | None = None, runner: str = "python-data") -> dict:
    """Run the agent once and return what happened (the test of this example checks it)."""
    with SandboxdExecutor(runner=runner, target=target) as executor:
        agent = CodeAgent(tools=[double], model=ScriptedModel(STEPS), executor=executor, max_steps=len(STEPS),
                          verbosity_level=0)
        answer = agent.run("Double 21, draw it, and tell me the result.")
        steps = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
        return {"session": executor.session.id, "answer": answer,
                "steps": [{"code": s.code_action, "observations": s.observations,
                           "error": str(s.error) if s.error else None, "output": s.action_output} for s in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="sandboxd's address (default $SANDBOXD_TARGET or the standard socket)")
    parser.add_argument("--runner", default="python-data")
    args = parser.parse_args()
    out = run(args.target, args.runner)
    print(f"sandboxd session {out['session']}")
    for i, step in enumerate(out["steps"], 1):
        print(f"--- step {i}: {step['code']!r}")
        if step["observations"]:
            print(step["observations"].rstrip())
        if step["error"]:
            print(f"error: {step['error'].strip().splitlines()[-1]}")
        if step["output"] is not None:
            print(f"output: {step['output']!r}")
    print(f"--- agent's answer: {out['answer']}")


if __name__ == "__main__":
    main()
