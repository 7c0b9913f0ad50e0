"""Generate the Python gRPC stubs from proto/ into sandboxd/v1/. Called by setup.py and `make proto`."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.check_call(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", *protos],
        cwd=ROOT,
    )


if __name__ == "__main__":
    main()
