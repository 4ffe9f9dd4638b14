"""quiver's Python SDK: decorators that declare models and expectations.

A model is a plain function from tables to a table::

    import quiver

    @quiver.model(materialize=True)
    @quiver.python("3.11", pip={"pandas": "2.2"})
    def usd_by_country(data=quiver.Model("euro_selection")):
        return data.to_pandas().groupby("country", as_index=False)["usd"].sum()

The decorators only attach metadata (``fn.__quiver__``) and return the function unchanged, so
a model can be called directly in a test. This package imports nothing heavy: discovery
(``python -m quiver.discover``) runs in any Python, without pyarrow.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Sequence, Union

__all__ = ["Model", "model", "python", "resources", "expectation"]

_ATTR = "__quiver__"


def _meta(fn: Callable) -> Dict[str, Any]:
    if not callable(fn):
        raise TypeError(f"quiver decorators apply to functions, not {type(fn).__name__}")
    meta = getattr(fn, _ATTR, None)
    if meta is None:
        meta = {}
        setattr(fn, _ATTR, meta)
    return meta


class Model:
    """A parent table, used as a parameter's default: ``data=quiver.Model("trips")``.

    ``columns`` keeps only those columns; ``filter`` keeps only the rows that match, in the
    scan filter language: ``col op literal`` (``= != <> < <= > >=``) and ``col IN (...)``,
    joined by ``AND``. Both are applied before the function is called, without copying more
    than the filter needs. The table the function receives is read-only.
    """

    def __init__(self, name: str, columns: Optional[Sequence[str]] = None, filter: Optional[str] = None):
        if not isinstance(name, str) or not name:
            raise TypeError("quiver.Model needs the parent's name as a non-empty string")
        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise TypeError("quiver.Model columns must be a list of column names")
            columns = list(columns)
        if filter is not None and not isinstance(filter, str):
            raise TypeError("quiver.Model filter must be a string such as \"country IN ('IT', 'FR')\"")
        self.name = name
        self.columns = columns
        self.filter = filter

    def __repr__(self) -> str:
        return f"quiver.Model({self.name!r}, columns={self.columns!r}, filter={self.filter!r})"


def model(materialize: bool = False, name: Optional[str] = None, internet_access: bool = False):
    """Declares a function as a model: a node of the DAG whose output is a table.

    ``materialize=True`` writes the table to the warehouse after the run; ``name`` names the
    node (the function's name by default); ``internet_access=True`` is the only way to lift
    the sandbox's network denial for this model.
    """

    def deco(fn):
        m = _meta(fn)
        m["kind"] = "model"
        m["materialize"] = bool(materialize)
        m["name"] = name
        m["internet_access"] = bool(internet_access)
        return fn

    return deco


def expectation(name: Optional[str] = None):
    """Declares a function as an expectation: it takes tables and returns a bool; ``False``
    fails the run before anything is published."""

    def deco(fn):
        m = _meta(fn)
        m["kind"] = "expectation"
        m["name"] = name
        return fn

    return deco


def python(version: str, pip: Optional[Dict[str, str]] = None):
    """Declares the environment: a Python version (``"3.11"``) and pip packages as
    ``{name: version}`` (a bare version means ``==``; any PEP 440 specifier works)."""
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise ValueError(f"quiver.python version must look like \"3.11\", not {version!r}")
    pip = dict(pip or {})
    for k, v in pip.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("quiver.python pip must map package names to version strings")

    def deco(fn):
        _meta(fn)["env"] = {"python": version, "pip": pip}
        return fn

    return deco


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(v: Union[int, str]) -> int:
    """Bytes in ``v``: an int, or a string like ``"2GB"``, ``"512MiB"``, ``"1.5G"``."""
    if isinstance(v, bool):
        raise TypeError("memory must be a size such as \"2GB\" or a number of bytes")
    if isinstance(v, int):
        if v <= 0:
            raise ValueError("memory must be positive")
        return v
    if not isinstance(v, str):
        raise TypeError("memory must be a size such as \"2GB\" or a number of bytes")
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", v)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {v!r} (use e.g. \"2GB\", \"512MiB\" or bytes)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError("memory must be positive")
    return n


def resources(memory: Union[int, str, None] = None, cpus: Optional[float] = None, timeout: Optional[float] = None):
    """Limits of the function's sandbox: ``memory`` (bytes or ``"2GB"``), ``cpus`` (a share,
    1.0 = one core) and ``timeout`` (wall-clock seconds)."""
    mem = None if memory is None else parse_memory(memory)
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0):
        raise ValueError("cpus must be a positive number")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError("timeout must be a positive number of seconds")

    def deco(fn):
        _meta(fn)["resources"] = {
            "memory": mem,
            "cpus": None if cpus is None else float(cpus),
            "timeout_s": None if timeout is None else float(timeout),
        }
        return fn

    return deco
