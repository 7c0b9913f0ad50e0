"""smolagents on sandboxd: a CodeAgent with SandboxdExecutor driven by a scripted model through several steps
(state kept across steps, a tool call, a SyntaxError reported back, an image result, final_answer), and the
executor's own contract. Real daemon, real kernel; the python-data image for numpy and Pillow."""
from __future__ import annotations

import importlib.util
import pathlib
from importlib.metadata import version

import pytest

pytest.importorskip("smolagents", reason="the smolagents extra is not installed (make install installs it)")

import PIL.Image  # noqa: E402
from smolagents.utils import AgentError  # noqa: E402

from sandboxd.client import SandboxdError  # noqa: E402
from sandboxd.integrations.smolagents import SandboxdExecutor  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "agents" / "smolagents_example.py"


@pytest.fixture
def data_runner(sandbox):
    info = {r.name: r for r in sandbox.runners()}.get("python-data")
    if info is None or not info.available:
        pytest.skip("the python-data image is not built (make image-data): smolagents' final_answer imports "
                    f"numpy and PIL ({info.unavailable_reason if info else 'no python-data runner'})")
    return "python-data"


def load_example():
    spec = importlib.util.spec_from_file_location("smolagents_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_agent_with_a_scripted_model(daemon, sandbox, data_runner):
    out = load_example().run(daemon.target, data_runner)
    first, typo, tool_call, image, final = out["steps"]
    assert "x is 21" in first["observations"] and first["error"] is None
    assert typo["error"] and "SyntaxError" in typo["error"] and "was never closed" in typo["error"]
    assert "doubled 42" in tool_call["observations"]            # x from step 1, double() sent as a tool
    assert isinstance(image["output"], PIL.Image.Image)         # image/png from the kernel, as a PIL image
    assert image["output"].size == (42, 2) and image["output"].convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert final["output"] == out["answer"] == "the answer is 42"
    with pytest.raises(SandboxdError):                          # the executor closed the session it made
        sandbox.attach(out["session"])


def test_executor_contract(daemon, sandbox, data_runner):
    with SandboxdExecutor(runner=data_runner, target=daemon.target) as ex:
        info = ex.session.info()
        assert (info.agent_name, info.agent_version, info.runner) == ("smolagents", version("smolagents"),
                                                                      data_runner)
        uid = ex.run_code_raise_errors("import os\nos.getuid()").output
        assert daemon.uid_start <= int(uid) < daemon.uid_start + daemon.uid_count     # the sandbox's own uid
        with pytest.raises(AgentError) as e:
            ex.run_code_raise_errors("def f():\n    return 1 / 0\nf()")
        assert "ZeroDivisionError" in str(e.value) and "return 1 / 0" in str(e.value)
        ex.send_variables({"given": {"a": [1, 2]}})
        assert ex.run_code_raise_errors("given['a'][1]").output == "2"
        ex.install_packages(["numpy", "PIL", "numpy.linalg", "*"])       # all there: nothing to install
        with pytest.raises(AgentError, match="could not install no_such_pkg_sandboxd"):
            ex.install_packages(["no_such_pkg_sandboxd"])                # no pip, no network: a clear error
        with SandboxdExecutor(target=daemon.target, session_id=ex.session.id, context="other") as attached:
            assert attached.run_code_raise_errors("'given' in globals()").output == "False"   # its own context
        assert ex.run_code_raise_errors("given['a'][0]").output == "1"   # the attached executor left it open


def test_runner_without_numpy_or_pil_names_the_runner_to_use(daemon, sandbox):
    """The host image's python has no Pillow: sending smolagents' final_answer tool says what to do."""
    from smolagents.default_tools import FinalAnswerTool
    with SandboxdExecutor(runner="python", target=daemon.target) as ex:
        with pytest.raises(AgentError) as e:
            ex.send_tools({"final_answer": FinalAnswerTool()})
        assert "has no PIL" in str(e.value) and "runner='python-data'" in str(e.value)
