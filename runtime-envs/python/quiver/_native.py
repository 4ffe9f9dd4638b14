"""ctypes bindings to libquiver_preload.so, the harness's C ABI.

The library is found, in order: ``QUIVER_PRELOAD`` (a path); the entry of ``LD_PRELOAD`` that
names it (function processes have it preloaded, so this is the copy already in the process);
``libquiver_preload.so`` beside this file (where an installation puts it, next to the package).
"""

from __future__ import annotations

import ctypes
import os

LIB_NAME = "libquiver_preload.so"


class NativeError(RuntimeError):
    """A failure reported by libquiver_preload (transport, SIPC validation, writing)."""


class ArrowArrayStream(ctypes.Structure):
    """The Arrow C stream interface's struct; filled and released by its producer."""

    _fields_ = [
        ("get_schema", ctypes.c_void_p),
        ("get_next", ctypes.c_void_p),
        ("get_last_error", ctypes.c_void_p),
        ("release", ctypes.c_void_p),
        ("private_data", ctypes.c_void_p),
    ]


def library_path() -> str:
    """Where libquiver_preload.so is (see the module docstring)."""
    p = os.environ.get("QUIVER_PRELOAD")
    if p:
        return p
    for entry in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if os.path.basename(entry) == LIB_NAME:
            return entry
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)


class Native:
    """The loaded library."""

    def __init__(self, path: str | None = None):
        path = path or library_path()
        if not os.path.exists(path):
            raise NativeError(f"{LIB_NAME} not found at {path} (set QUIVER_PRELOAD)")
        lib = ctypes.CDLL(path)
        lib.quiver_arena_enable.argtypes = [ctypes.c_size_t]
        lib.quiver_arena_enable.restype = ctypes.c_int
        lib.quiver_last_error.argtypes = []
        lib.quiver_last_error.restype = ctypes.c_char_p
        lib.quiver_recv_json.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
        lib.quiver_recv_json.restype = ctypes.c_int
        lib.quiver_free.argtypes = [ctypes.c_void_p]
        lib.quiver_free.restype = None
        lib.quiver_send_json.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.quiver_send_json.restype = ctypes.c_int
        lib.quiver_recv_table.argtypes = [ctypes.c_int, ctypes.POINTER(ArrowArrayStream)]
        lib.quiver_recv_table.restype = ctypes.c_int
        lib.quiver_send_table.argtypes = [ctypes.c_int, ctypes.POINTER(ArrowArrayStream),
                                          ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
        lib.quiver_send_table.restype = ctypes.c_int
        self.lib = lib
        self.path = path

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = self.lib.quiver_last_error() or b""
            raise NativeError(f"{what}: {msg.decode('utf-8', 'replace')}")

    def arena_enable(self, threshold: int = 0) -> str | None:
        """Turns the arena on; returns why not when the library is not the allocator."""
        if self.lib.quiver_arena_enable(threshold) != 0:
            return (self.lib.quiver_last_error() or b"").decode("utf-8", "replace")
        return None

    def recv_json(self, fd: int) -> bytes:
        buf = ctypes.c_void_p()
        n = ctypes.c_size_t()
        self._check(self.lib.quiver_recv_json(fd, ctypes.byref(buf), ctypes.byref(n)), "receiving a message")
        try:
            return ctypes.string_at(buf.value, n.value) if n.value else b""
        finally:
            self.lib.quiver_free(buf)

    def send_json(self, fd: int, data: bytes) -> None:
        self._check(self.lib.quiver_send_json(fd, data, len(data)), "sending a message")

    def recv_table(self, fd: int):
        """The next table on the socket, as a pyarrow.Table over the sender's mappings."""
        import pyarrow as pa

        stream = ArrowArrayStream()
        self._check(self.lib.quiver_recv_table(fd, ctypes.byref(stream)), "receiving an input table")
        reader = pa.RecordBatchReader._import_from_c(ctypes.addressof(stream))
        return reader.read_all()

    def send_table(self, fd: int, table) -> tuple[int, int]:
        """Sends the reply and `table`; returns (bytes referenced, bytes copied)."""
        stream = ArrowArrayStream()
        table.to_reader()._export_to_c(ctypes.addressof(stream))
        ref = ctypes.c_uint64()
        cop = ctypes.c_uint64()
        rc = self.lib.quiver_send_table(fd, ctypes.byref(stream), ctypes.byref(ref), ctypes.byref(cop))
        self._check(rc, "sending the output table")
        return ref.value, cop.value
