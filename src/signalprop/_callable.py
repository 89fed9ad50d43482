"""Let a sub-module also be called as the function it is named after.

``signalprop.trial``, ``signalprop.sweep``, ``signalprop.doctor`` and ``signalprop.probe`` are
both public functions and modules. Python binds a sub-module onto its parent package as soon as it
is imported, which would shadow the lazily exported function; making the module object callable
keeps ``signalprop.trial(...)`` working whatever was imported first.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_module_callable(module_name: str, attr: str) -> None:
    """Make ``sys.modules[module_name](...)`` call ``module.<attr>(...)``."""
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            fn: Callable[..., Any] = getattr(self, attr)
            return fn(*args, **kwargs)

    _CallableModule.__name__ = f"CallableModule[{module_name}]"
    module.__class__ = _CallableModule
