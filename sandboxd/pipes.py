"""Non-blocking pipe plumbing for the daemon's event loop: reading a call's output as it comes (and, once the
call's own process has exited, exactly what it left in the pipe), writing stdin without blocking the loop, and
reading length-prefixed frames from a sandbox with bounds.

Runs in the daemon. Everything read here comes from a sandbox and is untrusted: sizes are bounded, nothing is
interpreted beyond the framing.
"""
from __future__ import annotations

import asyncio
import errno
import os
import struct

CHUNK = 64 << 10
PAUSE_AT = 4 << 20        # bytes queued by a reader before it stops reading (the writer then blocks on its pipe)
FRAME_MAX = (256 << 10) + 4096


class PipeReader:
    """Calls `on_data(bytes)` for each chunk read and `on_eof()` once. `drain()` reads, without waiting, whatever
    is in the pipe now: after a process has exited, everything it wrote is there."""

    def __init__(self, fd: int, on_data, on_eof=lambda: None):
        self.fd, self.on_data, self.on_eof = fd, on_data, on_eof
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.paused = False
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        try:
            data = os.read(self.fd, CHUNK)
        except BlockingIOError:
            return False
        except OSError as e:   # EIO: a terminal's other side is closed
            data = b"" if e.errno in (errno.EIO, errno.EBADF) else b""
        if not data:
            self.close()
            return False
        self.on_data(data)
        return True

    def drain(self, limit: int = 1 << 30) -> None:
        got = 0
        while not self.closed and got < limit:
            before = got
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            got += len(data)
            self.on_data(data)
            if got == before:
                return

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.loop.remove_reader(self.fd)

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.loop.add_reader(self.fd, self._ready)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.paused:
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.on_eof()


async def write_all(fd: int, data: bytes) -> None:
    """Write everything to a non-blocking fd, waiting for room without blocking the loop. Raises OSError
    (EPIPE: the reader is gone)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        fut = loop.create_future()
        loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_writer(fd)


class FrameReader:
    """Frames (kind byte, 4-byte big-endian length, payload) from a pipe, as files.py writes them."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False
        self.loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n and not self.eof:
            try:
                data = os.read(self.fd, max(CHUNK, n - len(self.buf)))
            except BlockingIOError:
                fut = self.loop.create_future()
                self.loop.add_reader(self.fd, lambda: fut.done() or fut.set_result(None))
                try:
                    await fut
                finally:
                    self.loop.remove_reader(self.fd)
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
            self.buf += data
        return len(self.buf) >= n

    async def read(self) -> tuple[bytes, bytes] | None:
        """(kind, payload), or None at the end. A frame over the bound ends the stream (ValueError)."""
        if not await self._fill(5):
            return None
        kind, size = bytes(self.buf[:1]), struct.unpack(">I", self.buf[1:5])[0]
        if size > FRAME_MAX:
            raise ValueError(f"a frame of {size} bytes from the sandbox is over the bound")
        if not await self._fill(5 + size):
            return None
        payload = bytes(self.buf[5:5 + size])
        del self.buf[:5 + size]
        return kind, payload

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload
