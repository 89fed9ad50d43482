"""Read a study's output directory back (the layout :mod:`signalprop.lab.runner` writes).

Its own module so that the report (:mod:`signalprop.lab.report`) and the runner each import the
readers without importing one another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from signalprop.lab.base import Conclusion, read_json


def load_study(workdir: str | Path) -> dict[str, Any]:
    """Read a study directory back (meta, config, conclusion, figure paths) for the report."""
    workdir = Path(workdir)
    meta = read_json(workdir / "meta.json")
    d: dict[str, Any] = {"meta": meta, "dir": workdir}
    d["config"] = read_json(workdir / "config.json") if (workdir / "config.json").exists() else {}
    cpath = workdir / "conclusion.json"
    d["conclusion"] = Conclusion.from_dict(read_json(cpath)) if cpath.exists() else None
    d["figures"] = [workdir / f for f in meta.get("figures", []) if (workdir / f).exists()]
    return d


def is_study_dir(path: Path) -> bool:
    """Whether ``path`` holds a study's output (it has a ``meta.json``)."""
    return (path / "meta.json").exists()
