"""smolagents executor: a CodeAgent's code runs in a sandboxd session's Python kernel.

    from smolagents import CodeAgent
    from sandboxd.integrations.smolagents import SandboxdExecutor

    with SandboxdExecutor(runner="python-data") as executor:
        agent = CodeAgent(tools=[...], model=..., executor=executor)
        agent.run("...")

`SandboxdExecutor` is smolagents' `RemotePythonExecutor`, as its E2B executor is: tools and variables are sent
by the base class as code run in the kernel, final_answer is the patched tool raising FinalAnswerException (its
value is the serialized answer), any other error raises AgentError with the kernel's traceback, and an image
result (image/png or image/jpeg) comes back as a PIL image. Every step runs in one kernel context of the
session, so variables, imports and files persist between steps. The client presents agent_name "smolagents"
and the installed smolagents version.
"""
from __future__ import annotations

import base64
import io
import json
import re
from importlib.metadata import version as _version
from typing import Any

import PIL.Image
from smolagents.local_python_executor import CodeOutput
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.utils import AgentError

from sandboxd.client import Client, Session

__all__ = ["SandboxdExecutor", "DATA_RUNNER"]

AGENT_NAME = "smolagents"
# The runner whose image has numpy and Pillow, which smolagents' own final_answer tool imports.
DATA_RUNNER = "python-data"
# pip names of the packages smolagents asks for, as the module an import statement names.
_MODULE_OF = {"pillow": "PIL", "scikit-learn": "sklearn", "beautifulsoup4": "bs4", "pyyaml": "yaml"}


class SandboxdExecutor(RemotePythonExecutor):
    """A RemotePythonExecutor over a sandboxd session's kernel.

    additional_imports: modules the agent may import (CodeAgent's additional_authorized_imports); those the image
        lacks are installed with `python3 -m pip install` in the session, which needs a runner whose image has pip
        and a policy that gives the session network. "*" and names already importable install nothing.
    runner: the runner of a session this executor creates (default python-data: numpy, pandas, Pillow...).
    client / target / token / client_options: as sandboxd.client.Client; a client made here presents
        agent_name "smolagents" and the smolagents version.
    session_id: run in an existing session (this executor then leaves it open); a session it created is closed by
        cleanup() (CodeAgent.cleanup() calls it) or the `with` block.
    context: the kernel context of the session the steps run in.
    timeout: the per-step wall-time limit in seconds (0: the runner's default).
    """

    def __init__(self, additional_imports: list[str] = (), logger: AgentLogger | None = None,
                 allow_pickle: bool = False, *, runner: str = DATA_RUNNER, client: Client | None = None,
                 target: str | None = None, token: str | None = None, session_id: str | None = None,
                 context: str = "default", timeout: float = 0, client_options: dict[str, Any] | None = None,
                 **session_options: Any):
        super().__init__(list(additional_imports), logger or AgentLogger(level=LogLevel.INFO), allow_pickle)
        self.runner, self.context, self.timeout = runner, context, timeout
        self._own_client = client is None
        self.client = client or Client(target, token=token, agent_name=AGENT_NAME,
                                       agent_version=_version("smolagents"), **(client_options or {}))
        self._own_session = session_id is None
        self.session: Session | None = None
        try:
            self.session = (self.client.session(runner, **session_options) if session_id is None
                            else self.client.attach(session_id))
            self.runner = self.session.info().runner
            self.installed_packages = self.install_packages(self.additional_imports)
        except BaseException:
            self.cleanup()
            raise
        self.logger.log(f"sandboxd session {self.session.id} (runner {self.runner}) is running", level=LogLevel.INFO)

    def __enter__(self) -> "SandboxdExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Close the session if this executor created it, and the client if it made it."""
        try:
            if self._own_session and self.session is not None:
                self.session.close()
        finally:
            if self._own_client:
                self.client.close()

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        run = self.session.run_code(code, context=self.context, timeout=self.timeout)
        logs = run.stdout + run.stderr
        if run.error is not None:
            if run.error.name == self.FINAL_ANSWER_EXCEPTION:
                return CodeOutput(output=self._deserialize_final_answer(run.error.value, self.allow_pickle),
                                  logs=logs, is_final_answer=True)
            traceback = "\n".join(run.error.traceback) or f"{run.error.name}: {run.error.value}"
            raise AgentError(f"{logs}\nExecuting code yielded an error:\n{run.error.name}\n{run.error.value}\n"
                             f"{traceback}", self.logger)
        if run.outcome != "exited":   # timeout, memory_limit, a kernel that died: sandboxd's words for it
            raise AgentError(f"{logs}\nExecuting code yielded an error:\n{run.outcome}: {run.message}", self.logger)
        if run.kernel_restarted:
            logs = f"[the kernel was restarted before this step: earlier variables are gone]\n{logs}"
        for bundle, kind in zip(run.results, run.result_kinds or ("execute_result",) * len(run.results)):
            if kind != "execute_result":
                continue
            for mime in ("image/png", "image/jpeg"):
                if mime in bundle:
                    data = bundle[mime]
                    raw = base64.b64decode(data) if isinstance(data, str) else data
                    return CodeOutput(output=PIL.Image.open(io.BytesIO(raw)), logs=logs, is_final_answer=False)
            for mime in ("application/json", "text/html", "text/markdown", "image/svg+xml", "text/latex",
                         "text/plain"):
                if mime in bundle:
                    return CodeOutput(output=bundle[mime], logs=logs, is_final_answer=False)
        return CodeOutput(output=None, logs=logs, is_final_answer=False)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Make the packages importable: those the image has already need nothing; the others are installed with
        pip through an Exec in the session. numpy and Pillow (smolagents' final_answer imports them) are never
        installed: a runner without them is the wrong runner, and the error says which one to use."""
        wanted = {pkg: _MODULE_OF.get(pkg.lower(), re.split(r"[.\[<>=!~ ]", pkg, maxsplit=1)[0])
                  for pkg in additional_imports if pkg and pkg != "*" and not pkg.startswith("*")}
        if not wanted:
            return list(additional_imports)
        probe = self.session.run_code(
            "import importlib.util as _u, json as _j\n"
            f"print(_j.dumps([_m for _m in {sorted(set(wanted.values()))!r} if _u.find_spec(_m) is None]))",
            context=self.context)
        try:   # what the sandbox prints is data, never code
            missing_modules = set(json.loads(probe.stdout.strip().splitlines()[-1])) & set(wanted.values())
        except (ValueError, IndexError, TypeError):
            raise AgentError(f"could not check the modules of sandboxd runner {self.runner!r}: "
                             f"{probe.error or probe.message or probe.stdout[-300:]}", self.logger) from None
        core = sorted(missing_modules & {"numpy", "PIL"})
        if core:
            raise AgentError(f"sandboxd runner {self.runner!r} has no {' or '.join(core)}, which smolagents' "
                             f"final_answer tool imports: use runner={DATA_RUNNER!r} (its image has numpy and "
                             f"Pillow) or a runner of your own whose image has them", self.logger)
        missing = sorted(pkg for pkg, module in wanted.items() if module in missing_modules)
        if missing:
            r = self.session.exec(["python3", "-m", "pip", "install", "--user", "--no-input", *missing])
            self.logger.log(r.text + r.stderr.decode(errors="replace"))
            if not r.ok:
                raise AgentError(f"could not install {', '.join(missing)} in sandboxd session {self.session.id} "
                                 f"(pip exited with {r.exit_code}; a session has no network unless its policy "
                                 f"allows it): {r.stderr.decode(errors='replace')[-500:]}", self.logger)
        return list(additional_imports)
