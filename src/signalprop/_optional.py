"""Optional dependencies: import them where they are used, with one clear line when missing.

The core install (``pip install signalprop``) carries what the probe, diagnosis, doctor and
report need; the lab's data sets and tables need the ``[lab]`` extra, integrations their own.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming the extra that installs it.

    Args:
        module: Importable name (``"sklearn.datasets"``).
        extra: The signalprop extra that provides it (``"lab"``).
        what: What needs it, for the message (``"the digits data set"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(
            f"{what} needs the optional package {top!r}: pip install 'signalprop[{extra}]'"
        ) from e
