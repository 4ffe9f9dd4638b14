"""The function harness: runs one Python model or expectation for the agent.

Protocol (over a ``SOCK_SEQPACKET`` socket, quiver-shm's transport framing): the agent sends a
Request (JSON) and one SIPC table per entry of ``inputs``; the harness answers a Hello
(``{"started_ns": ...}``, CLOCK_MONOTONIC) as soon as it has the request, then a Reply:
``{"Table": {...}}`` followed by the output table, ``"Passed"`` for an expectation that held,
or ``{"Failed": {"user": bool, "message": str}}``.

Inputs arrive as ``pyarrow.Table``s over read-only mappings of the parents' sealed segments (no
copy); outputs leave by reference when their buffers lie in this process's arena, which
libquiver_preload.so (preloaded, with ``ARROW_DEFAULT_MEMORY_POOL=system``) serves large
allocations from. Once the output is sent the arena chunks it uses are sealed read-only:
callers of :func:`serve` must exit right after it returns (``os._exit``).

Cold start: ``python -m quiver._harness --fd N``. A zygote calls :func:`serve` in a forked
child instead.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

from . import _files, _native

READ_ONLY_HINT = (
    "quiver: inputs are read-only (they map the parent's table without a copy); "
    "make an explicit copy before changing data, e.g. df = data.to_pandas().copy() "
    "or arr = numpy.array(col, copy=True)"
)
_READ_ONLY_SIGNS = ("read-only", "readonly", "not writeable", "not writable", "writeable flag")


# Objects kept alive until exit once the output is sent (see _run).
_KEEP: list = []


class UserError(Exception):
    """A mistake in the user's code or declarations (reported with ``user: true``)."""


def serve(fd: int) -> int:
    """Runs one request on socket `fd`; returns the process's exit code (0 once a reply went
    out, also for user errors; 1 when the agent could not be answered)."""
    try:
        native = _native.Native()
    except Exception as e:  # noqa: BLE001 - nothing can be reported without the library
        print(f"quiver harness: {e}", file=sys.stderr)
        return 1
    why = native.arena_enable(0)
    if why:
        print(f"quiver harness: arena off, outputs will be copied: {why}", file=sys.stderr)
    try:
        req = json.loads(native.recv_json(fd))
        native.send_json(fd, json.dumps({"started_ns": time.monotonic_ns()}).encode())
    except Exception as e:  # noqa: BLE001
        print(f"quiver harness: no request: {e}", file=sys.stderr)
        return 1
    try:
        reply = _run(native, fd, req)
    except UserError as e:
        reply = {"Failed": {"user": True, "message": str(e)}}
    except Exception as e:  # noqa: BLE001 - the harness's own failure
        reply = {"Failed": {"user": False, "message": f"harness: {type(e).__name__}: {e}"}}
    if reply is None:
        return 0
    try:
        native.send_json(fd, json.dumps(reply).encode())
    except Exception as e:  # noqa: BLE001
        print(f"quiver harness: cannot reply: {e}", file=sys.stderr)
        return 1
    return 0


def _run(native, fd: int, req: dict):
    """Does the work; returns the reply to send, or None when the table reply went out."""
    task = req.get("task", {})
    if not isinstance(task, dict) or "Python" not in task:
        raise RuntimeError(f"not a Python task: {list(task) if isinstance(task, dict) else task!r}")
    task = task["Python"]
    import pyarrow as pa

    # pyarrow's default pool (mimalloc) bypasses malloc, so its buffers would miss the arena;
    # ARROW_DEFAULT_MEMORY_POOL=system says the same, but only before the pool is first used.
    pa.set_memory_pool(pa.system_memory_pool())
    names = list(req.get("inputs", []))
    tables = {}
    for name in names:
        tables[name] = native.recv_table(fd)
    fn = _load(task["module"], task["function"])
    kwargs = {}
    for p in task.get("params", []):
        if p["parent"] not in tables:
            raise RuntimeError(f"parameter {p['arg']} names parent {p['parent']!r}, which is not an input ({names})")
        kwargs[p["arg"]] = _prepare(tables[p["parent"]], p)
    del tables
    result = _call(fn, kwargs, task["module"])
    label = req.get("node") or task["function"]
    if task.get("expectation"):
        return _expectation(result, label)
    table = _to_arrow(result, label)
    # Sending seals the arena chunks the output lies in, and any other large block in them
    # turns read-only with it (a big bytes or tuple object included). From here on nothing may
    # write to such objects: no cyclic GC (it writes object headers) and no deallocation
    # (reference counts) until the process exits.
    gc.disable()
    _KEEP.extend([kwargs, result, table, fn])
    native.send_table(fd, table)
    return None


def _load(path: str, function: str):
    if not os.path.isabs(path):
        raise RuntimeError(f"module path {path!r} is not absolute")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"quiver_user_{abs(hash(path)):x}_{stem}"
    try:
        mod = _files.import_file(path, name)
    except _files.NotPython:
        raise UserError(f"cannot import {path}: not a Python file") from None
    except FileNotFoundError as e:
        raise UserError(f"cannot import {path}: {e}") from None
    except BaseException as e:  # noqa: BLE001 - user code at import time
        raise UserError(f"importing {path} failed:\n{_describe(e, folder)}") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise UserError(f"{path} defines no function {function!r}")
    return fn


def _lit(v: dict):
    (kind, value), = v.items()
    if kind not in ("Int", "Float", "Str", "Bool"):
        raise RuntimeError(f"unknown literal {kind}")
    return value


_OPS = {"Eq": "equal", "Ne": "not_equal", "Lt": "less", "Le": "less_equal", "Gt": "greater", "Ge": "greater_equal"}


def _prepare(table, p: dict):
    """The parent's table with the parameter's columns and filter applied: selecting columns
    copies nothing; the filter computes one mask and copies only the kept columns' rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parent = p["parent"]
    have = set(table.column_names)

    def col(name):
        if name not in have:
            raise UserError(f"{p['arg']}: {parent} has no column {name!r} (it has {', '.join(table.column_names)})")
        return table.column(name)

    mask = None
    for pred in p.get("filter") or []:
        (kind, body), = pred.items()
        c = col(body["column"])
        try:
            if kind == "Cmp":
                m = getattr(pc, _OPS[body["op"]])(c, pa.scalar(_lit(body["value"])))
            elif kind == "In":
                values = pa.array([_lit(v) for v in body["values"]])
                try:
                    values = values.cast(c.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    pass
                m = pc.is_in(c, value_set=values)
            else:
                raise RuntimeError(f"unknown predicate {kind}")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise UserError(f"{p['arg']}: filter on {body['column']} of {parent}: {e}") from None
        mask = m if mask is None else pc.and_kleene(mask, m)
    if p.get("columns") is not None:
        for name in p["columns"]:
            col(name)
        table = table.select(p["columns"])
    if mask is not None:
        table = table.filter(mask)
    return table


def _describe(e: BaseException, folder: str) -> str:
    """`Type: message` and the traceback frames in the user's folder."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(folder + os.sep)]
    lines = []
    if frames:
        lines.append("Traceback (user code):")
        lines.extend(s.rstrip("\n") for s in traceback.format_list(frames))
    msg = "".join(traceback.format_exception_only(type(e), e)).rstrip("\n")
    lines.append(msg)
    if any(s in str(e).lower() for s in _READ_ONLY_SIGNS):
        lines.append(READ_ONLY_HINT)
    return "\n".join(lines)


def _call(fn, kwargs: dict, module: str):
    me = os.getpid()
    try:
        result = fn(**kwargs)
    except BaseException as e:  # noqa: BLE001 - anything user code raises, SystemExit included
        _only_the_caller(me)
        raise UserError(_describe(e, os.path.dirname(module))) from None
    _only_the_caller(me)
    return result


def _only_the_caller(pid: int):
    """A process the function forked that returns (or raises) into the harness ends here: only
    the function's own process answers, or replies would interleave on the agent's socket."""
    if os.getpid() != pid:
        os._exit(0)


def _expectation(result, label: str) -> dict:
    if type(result).__module__ == "numpy" and type(result).__name__ in ("bool_", "bool"):
        result = bool(result)
    if not isinstance(result, bool):
        raise UserError(f"expectation {label} returned {type(result).__module__}.{type(result).__qualname__}, not a bool")
    if result:
        return "Passed"
    raise UserError(f"expectation {label} returned False")


def _to_arrow(result, label: str):
    import pyarrow as pa

    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    mod = type(result).__module__ or ""
    kind = type(result).__name__
    if mod.startswith("pandas") and kind == "DataFrame":
        try:
            return pa.Table.from_pandas(result, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise UserError(f"{label} returned a pandas DataFrame that Arrow cannot hold: {e}") from None
    if mod.startswith("polars") and kind == "DataFrame":
        return result.to_arrow()
    raise UserError(
        f"{label} returned {mod}.{type(result).__qualname__}; a model returns a pyarrow Table or "
        "RecordBatch, a pandas DataFrame or a polars DataFrame"
    )


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m quiver._harness", description="Run one quiver function request.")
    ap.add_argument("--fd", type=int, required=True, help="the agent's SOCK_SEQPACKET socket")
    args = ap.parse_args(argv)
    return serve(args.fd)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The output's arena chunks are sealed read-only: no interpreter teardown after this.
    os._exit(code)
