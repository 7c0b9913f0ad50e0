"""The OpenAI Agents adapter's buffer for an open process: bounded, and honest about what it dropped."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("agents.sandbox", reason="openai-agents is part of the dev install (make install)")
from sandboxd.client import Output, Result  # noqa: E402
from sandboxd.integrations import openai_agents  # noqa: E402


class _Events:
    """Stands in for an AsyncProcess's event stream (the part of it the buffer reads)."""

    def __init__(self, events):
        self.events = events

    async def __aiter__(self):
        for event in self.events:
            yield event

    def cancel(self) -> None:
        pass


def _result(outcome: str, exit_code: int = 0, signal: int = 0, message: str = "") -> Result:
    return Result("c", outcome, exit_code, signal, 0, 0, 0, 0, 0, False, False, message)


def _drain(events, buffer: int = openai_agents.PTY_BUFFER):
    async def main():
        entry = openai_agents._PtyProcess(_Events(events), tty=True)
        await entry.pump
        return await entry.collect(250, None), entry.exit_code
    saved, openai_agents.PTY_BUFFER = openai_agents.PTY_BUFFER, buffer
    try:
        return asyncio.run(main())
    finally:
        openai_agents.PTY_BUFFER = saved


def test_unread_output_past_the_bound_is_dropped_oldest_first_and_said():
    (output, _, closed), code = _drain([Output("stdout", b"a" * 60), Output("stdout", b"b" * 60),
                                        _result("exited", 4)], buffer=100)
    assert output == b"[... 20 bytes of output dropped ...]\n" + b"a" * 40 + b"b" * 60
    assert closed and code == 4


@pytest.mark.parametrize("result, code, said", [
    (_result("signaled", signal=15), 143, None),
    (_result("timeout", message="wall time 2s"), 124, b"[sandboxd: timeout: wall time 2s]"),
    (_result("memory_limit", signal=9), 137, b"[sandboxd: memory_limit"),
])
def test_an_end_other_than_exit_has_the_shells_number(result, code, said):
    (output, _, closed), got = _drain([Output("stdout", b"x"), result])
    assert closed and got == code
    assert (said in output) if said else output == b"x"


def test_a_stream_that_ends_without_a_result_is_125():
    (output, _, closed), code = _drain([Output("stdout", b"x")])
    assert closed and code == 125 and output.startswith(b"x\n[sandboxd: the call ended without a result]")
