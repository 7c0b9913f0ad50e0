"""Generate the gRPC stubs as part of every build, so generated code is never committed or hand-edited."""
import pathlib
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStubs(build_py):
    def run(self):
        subprocess.check_call([sys.executable, str(pathlib.Path(__file__).parent / "proto" / "generate.py")])
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
