"""Load a user's callable from ``path/to/file.py:name`` or ``package.module:name``.

Used by the CLI (``signalprop doctor file.py:factory``, ``signalprop theory critical --activation
module:function``). Nothing is ``eval``-ed: the target is imported like any module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any


def load_module_file(path: Path, what: str = "module") -> ModuleType:
    """Import a ``.py`` file as a fresh module (its folder is importable while it loads).

    Raises:
        FileNotFoundError: the file does not exist (``"<what> file ... does not exist"``).
        ValueError: the file fails to import (the exception's type and message are quoted).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    modname = f"_signalprop_user_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    return module


def load_callable(target: str, what: str = "function") -> Any:
    """Import ``path/to/file.py:name`` or ``package.module:name`` (``name`` may be dotted).

    Args:
        target: The import target.
        what: What the callable is, for error messages (``"factory"``, ``"activation"``).

    Raises:
        FileNotFoundError: a ``.py`` path that does not exist.
        ValueError: malformed target, import failure, or no such attribute (the callables the
            module defines are listed).
        TypeError: the attribute is not callable.
    """
    mod_s, sep, attr = target.rpartition(":")
    if not sep or not mod_s or not attr or not all(a.isidentifier() for a in attr.split(".")):
        raise ValueError(f"expected path/to/file.py:{what} or module:{what}, got {target!r}")
    if mod_s.endswith(".py"):
        module = load_module_file(Path(mod_s), what)
    else:
        if not all(p.isidentifier() for p in mod_s.split(".")):
            raise ValueError(f"{mod_s!r} is not a module path (package.module) or a .py file")
        added = "" not in sys.path and "." not in sys.path
        if added:
            sys.path.insert(0, "")  # let `module:name` find modules in the current directory
        try:
            module = importlib.import_module(mod_s)
        except ImportError as e:
            raise ValueError(f"cannot import module {mod_s!r}: {e}") from e
        finally:
            if added:
                sys.path.remove("")
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_")
                and getattr(v, "__module__", None) == module.__name__
            )
            raise ValueError(
                f"{mod_s!r} has no {what} {attr!r}; callables defined there: "
                f"{', '.join(defined) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{attr!r} in {mod_s!r} is not callable")
    return obj
