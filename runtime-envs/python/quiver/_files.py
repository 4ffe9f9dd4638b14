"""Importing a user's ``.py`` file by path, shared by discovery and the harness."""

from __future__ import annotations

import importlib.util
import sys


class NotPython(Exception):
    """The path cannot be loaded as a Python module."""


def import_file(path: str, name: str):
    """Imports the file at ``path`` as module ``name`` (registered in ``sys.modules``).

    Raises :class:`NotPython` when the path is no Python file; whatever the module's own code
    raises at import time propagates unchanged, for the caller to report.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NotPython(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
