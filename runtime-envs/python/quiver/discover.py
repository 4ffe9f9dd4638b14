"""``python -m quiver.discover PROJECT_DIR``: lists the project's Python models as JSON.

Imports each top-level ``*.py`` file of the folder (in name order) and prints one JSON list of
``{name, module, function, env: {python, pip}, params: [{arg, parent, columns, filter}],
materialize, expectation, internet_access, resources: {memory, cpus, timeout_s}}``. Functions
without ``@quiver.model`` or ``@quiver.expectation`` are ignored. A file that fails to import,
or a model whose declaration is wrong, exits with code 1 and names the file and line on
stderr. Nothing here needs pyarrow.
"""

from __future__ import annotations

import inspect
import json
import linecache
import os
import sys
import traceback

from . import Model, _files

_ATTR = "__quiver__"


class DiscoverError(Exception):
    """A project file that cannot be imported or declares a model wrongly."""


def _where(e: BaseException, path: str) -> str:
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
        return f"{path}:{e.lineno}"
    line = None
    for f in traceback.extract_tb(e.__traceback__):
        if os.path.abspath(f.filename) == path:
            line = f.lineno
    return f"{path}:{line}" if line else path


def _import(path: str, index: int):
    name = f"quiver_discover_{index}_{os.path.splitext(os.path.basename(path))[0]}"
    try:
        mod = _files.import_file(path, name)
    except _files.NotPython as e:
        raise DiscoverError(str(e)) from None
    except BaseException as e:  # noqa: BLE001 - user code at import time
        msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
        raise DiscoverError(f"{_where(e, path)}: {msg}") from None
    return mod


def _default_env() -> dict:
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "pip": {}}


def _def_line(fn, path: str):
    """The line of the function's `def` (co_firstlineno is its first decorator's)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    line = code.co_firstlineno
    for n in range(line, line + 50):
        text = linecache.getline(path, n).lstrip()
        if text.startswith(("def ", "async def ")):
            return n
    return line


def _describe(fn, path: str) -> dict:
    meta = getattr(fn, _ATTR)
    line = _def_line(fn, path)
    at = f"{path}:{line}" if line else path
    params = []
    for p in inspect.signature(fn).parameters.values():
        if not isinstance(p.default, Model):
            raise DiscoverError(
                f"{at}: parameter {p.name!r} of {fn.__name__} needs a parent as its default, "
                f"e.g. {p.name}=quiver.Model(\"parent\")"
            )
        m = p.default
        params.append({"arg": p.name, "parent": m.name, "columns": m.columns, "filter": m.filter})
    res = meta.get("resources") or {}
    return {
        "name": meta.get("name") or fn.__name__,
        "module": path,
        "function": fn.__name__,
        "env": meta.get("env") or _default_env(),
        "params": params,
        "materialize": bool(meta.get("materialize", False)),
        "expectation": meta.get("kind") == "expectation",
        "internet_access": bool(meta.get("internet_access", False)),
        "resources": {
            "memory": res.get("memory"),
            "cpus": res.get("cpus"),
            "timeout_s": res.get("timeout_s"),
        },
    }


def discover(project: str) -> list:
    """The models and expectations of the project folder (raises DiscoverError)."""
    project = os.path.abspath(project)
    if not os.path.isdir(project):
        raise DiscoverError(f"{project}: not a folder")
    if project not in sys.path:
        sys.path.insert(0, project)
    out = []
    names = {}
    files = sorted(f for f in os.listdir(project) if f.endswith(".py") and not f.startswith("."))
    for i, f in enumerate(files):
        path = os.path.join(project, f)
        if not os.path.isfile(path):
            continue
        mod = _import(path, i)
        for attr, fn in sorted(vars(mod).items()):
            meta = getattr(fn, _ATTR, None) if callable(fn) else None
            if not isinstance(meta, dict) or meta.get("kind") not in ("model", "expectation"):
                continue
            # A model imported from another file belongs to that file.
            if getattr(fn, "__module__", None) != mod.__name__:
                continue
            d = _describe(fn, path)
            if d["name"] in names:
                raise DiscoverError(f"{path}: model {d['name']!r} is also defined in {names[d['name']]}")
            names[d["name"]] = path
            out.append(d)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m quiver.discover PROJECT_DIR", file=sys.stderr)
        return 2
    try:
        models = discover(argv[0])
    except DiscoverError as e:
        print(f"quiver discover: {e}", file=sys.stderr)
        return 1
    json.dump(models, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
