"""Generated gRPC code for sandboxd.v1 (sandbox_pb2*.py) lands here at build time; never edit it."""
