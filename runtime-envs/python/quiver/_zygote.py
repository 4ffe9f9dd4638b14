"""A zygote: a long-lived Python process in one environment, with the function harness and the
environment's packages already imported, that forks one sandboxed child per function call.

Protocol with the agent, over a ``SOCK_SEQPACKET`` socket (``--fd``), one packet per message:

* zygote -> agent, once its imports are done: ``{"ready": true, "pid": N, "import_ms": F}``
* agent -> zygote: ``{"conn": i, "log": j, "cgroups": [k, ...], "network": bool,
  "sandbox": {...}}`` with fds attached (SCM_RIGHTS); the numbers index those fds: the
  function's socket to the agent, its log file (stdout and stderr), the ``cgroup.procs`` files
  it joins. ``sandbox`` is a quiver-sandbox spec.
* zygote -> agent: ``{"pid": N}`` (the forked child) or ``{"error": "..."}``.

The child joins the cgroups, unshares its namespaces and joins the empty network namespace
(``--netns-fd``) unless the model has internet access, forks once more so that the function is
the first process of its pid namespace, confines itself (libquiver_sandbox.so) and runs
:func:`quiver._harness.serve`. The zygote exits when the agent closes the socket.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time

MAX_FDS = 64


def _preimport(names):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a package without an importable module of that name
            print(f"quiver zygote: not preimported: {name}: {type(e).__name__}: {e}", file=sys.stderr)


def _sandbox_lib(path: str):
    lib = ctypes.CDLL(path)
    lib.quiver_sandbox_enter_namespaces.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_size_t, ctypes.c_int]
    lib.quiver_sandbox_enter_namespaces.restype = ctypes.c_int
    lib.quiver_sandbox_confine.argtypes = [ctypes.c_char_p]
    lib.quiver_sandbox_confine.restype = ctypes.c_int
    lib.quiver_sandbox_last_error.argtypes = []
    lib.quiver_sandbox_last_error.restype = ctypes.c_char_p
    return lib


def _child(ctl: socket.socket, req: dict, fds: list, netns_fd: int, sb) -> None:
    """The forked child: never returns."""
    code = 121
    try:
        # The zygote's reaper must not take this process's own child's status.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctl.close()
        conn, log = fds[req["conn"]], fds[req["log"]]
        os.dup2(log, 1)
        os.dup2(log, 2)
        cg = [fds[i] for i in req.get("cgroups", [])]
        arr = (ctypes.c_int * max(len(cg), 1))(*cg)
        net = -1 if req.get("network") else netns_fd
        if sb.quiver_sandbox_enter_namespaces(arr, len(cg), net) != 0:
            raise OSError(f"entering namespaces: {sb.quiver_sandbox_last_error().decode()}")
        pid = os.fork()
        if pid:
            # The function is the first process of the new pid namespace; this one only
            # passes its status on.
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if 0 <= code < 256 else 128 + (-code & 0x7F))
        spec = dict(req["sandbox"])
        spec["keep_fds"] = [conn, 1, 2]
        if sb.quiver_sandbox_confine(json.dumps(spec).encode()) < 0:
            raise OSError(f"confining: {sb.quiver_sandbox_last_error().decode()}")
        os.environ.update({"HOME": "/tmp", "TMPDIR": "/tmp"})
        from . import _harness

        code = _harness.serve(conn)
    except BaseException as e:  # noqa: BLE001 - reported in the node's log, then exit
        print(f"quiver sandbox: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quiver._zygote", description=__doc__.splitlines()[0])
    ap.add_argument("--fd", type=int, required=True, help="the agent's SOCK_SEQPACKET socket")
    ap.add_argument("--netns-fd", type=int, default=-1, help="the empty network namespace to join")
    ap.add_argument("--sandbox-lib", required=True, help="path of libquiver_sandbox.so")
    ap.add_argument("--preimport", default="", help="comma-separated modules to import ahead")
    args = ap.parse_args(argv)
    ctl = socket.socket(fileno=args.fd)
    t0 = time.monotonic()
    sb = _sandbox_lib(args.sandbox_lib)
    from . import _harness, _native  # noqa: F401 - imported ahead for the children

    _preimport(["pyarrow", "pyarrow.compute"] + [m for m in args.preimport.split(",") if m])
    import_ms = (time.monotonic() - t0) * 1e3
    # Objects that exist now are never collected: the children's GC then leaves the pages
    # they share with the zygote untouched (no copy-on-write for the imported modules).
    gc.collect()
    gc.freeze()
    # Children are reaped as they exit, so no zombie waits for the next request.
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    ctl.send(json.dumps({"ready": True, "pid": os.getpid(), "import_ms": import_ms}).encode())
    while True:
        _reap()
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, MAX_FDS)
        except InterruptedError:
            continue
        except OSError as e:
            print(f"quiver zygote: control socket: {e}", file=sys.stderr)
            return 1
        if not msg:
            return 0
        try:
            req = json.loads(msg)
            for k in ["conn", "log"] + list(req.get("cgroups", [])):
                idx = req[k] if isinstance(k, str) else k
                if not isinstance(idx, int) or not 0 <= idx < len(fds):
                    raise ValueError(f"fd index {idx!r} out of range")
        except Exception as e:  # noqa: BLE001 - a bad request fails its call, not the zygote
            for f in fds:
                os.close(f)
            ctl.send(json.dumps({"error": f"bad fork request: {e}"}).encode())
            continue
        pid = os.fork()
        if pid == 0:
            _child(ctl, req, fds, args.netns_fd, sb)
        for f in fds:
            os.close(f)
        ctl.send(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    sys.exit(main())
