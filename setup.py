"""Generate the gRPC stubs as part of every build, so generated code is never committed or hand-edited, and
ship the runner and image definitions inside the package (sandboxd/data/), so an installed wheel can start."""
import pathlib
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent
# The definitions only: a built image's rootfs/ is huge, machine-specific and never part of the package (a runner
# whose image is not built is listed as unavailable).
DATA = ["runners/*.toml", "images/*/image.toml"]


class BuildPyWithStubs(build_py):
    def run(self):
        subprocess.check_call([sys.executable, str(ROOT / "proto" / "generate.py")])
        super().run()
        if self.editable_mode:  # an editable install reads runners/ and images/ from the source tree
            return
        data = pathlib.Path(self.build_lib) / "sandboxd" / "data"
        shutil.rmtree(data, ignore_errors=True)
        for pattern in DATA:
            for src in sorted(ROOT.glob(pattern)):
                dest = data / src.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)


setup(cmdclass={"build_py": BuildPyWithStubs})
