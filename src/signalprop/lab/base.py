"""The shape every study shares, the conclusion type, and small helpers for caching results.

A study is a module with:

- ``NAME``, ``TITLE``, ``QUESTION`` (what people ask), ``CLAIM`` (the textbook answer it tests),
  ``SETUP`` (one paragraph: what is trained/measured), ``REFERENCES`` (list of strings);
- ``get_config(quick: bool) -> dict``: a JSON-serialisable configuration (``quick`` shrinks it);
- ``run(config, workdir) -> dict``: the measurements (JSON-serialisable). Parts that take time are
  cached under ``workdir/cache`` (:func:`cached`) so that an interrupted run resumes;
- ``conclude(data) -> Conclusion``: a verdict *computed from the measurements*;
- ``figures(data, workdir) -> list[Path]``: PNG files written under ``workdir/figures``.

Verdicts: ``supports`` (the measurements agree with the claim), ``contradicts`` (they disagree;
the sentence says so), ``inconclusive`` (too close to call, or not enough data).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the one JSON encoder and NaN policy (see signalprop.record); re-exported, the lab's names
from signalprop._format import fmt_number
from signalprop.record import atomic_write_text
from signalprop.record import from_jsonable as from_jsonable
from signalprop.record import to_jsonable as to_jsonable

SUPPORTS = "supports"
CONTRADICTS = "contradicts"
INCONCLUSIVE = "inconclusive"
VERDICTS = (SUPPORTS, CONTRADICTS, INCONCLUSIVE)


@dataclass
class Conclusion:
    """What a study's measurements say about its claim.

    Attributes:
        claim: The textbook claim under test (one sentence).
        sentence: The finding, written from the numbers (mentions the contradiction when there
            is one).
        verdict: One of :data:`VERDICTS`.
        numbers: The measured values the sentence quotes, by name.
        details: Optional further sentences (one per sub-claim).
    """

    claim: str
    sentence: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "sentence": self.sentence,
            "verdict": self.verdict,
            "numbers": to_jsonable(self.numbers),
            "details": list(self.details),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conclusion:
        return cls(
            claim=d["claim"],
            sentence=d["sentence"],
            verdict=d["verdict"],
            numbers=dict(d.get("numbers", {})),
            details=list(d.get("details", [])),
        )


def conclusion(
    claim: str,
    sentence: str,
    verdict: str,
    numbers: dict[str, Any] | None = None,
    details: list[str] | None = None,
) -> Conclusion:
    """Build a :class:`Conclusion`, making sure a contradicting one says so in its sentence."""
    if verdict == CONTRADICTS and "contradict" not in sentence.lower():
        sentence = "The measurements contradict the claim: " + sentence
    return Conclusion(claim, sentence, verdict, dict(numbers or {}), list(details or []))


def combine_verdicts(verdicts: list[str]) -> str:
    """Overall verdict of several sub-claims: any contradiction wins, then all-support, else
    inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if CONTRADICTS in verdicts:
        return CONTRADICTS
    if all(v == SUPPORTS for v in verdicts):
        return SUPPORTS
    return INCONCLUSIVE


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON written by :func:`write_json` (restores non-finite floats)."""
    return from_jsonable(json.loads(Path(path).read_text(encoding="utf-8")))


def config_hash(config: Any) -> str:
    """A short content hash of a JSON-serialisable configuration (key order does not matter)."""
    raw = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def _cache_path(workdir: str | Path, key: Any, tag: str) -> tuple[Path, Any]:
    """Where ``key``'s result is stored, and the key as stored (run keys left out)."""
    if isinstance(key, dict):  # how a study is executed does not change its parts' results
        key = {k: v for k, v in key.items() if k not in ("executor", "workers")}
    return Path(workdir) / "cache" / f"{tag}-{config_hash(key)}.json", key


_MISSING = object()


def _load(path: Path, key: Any) -> Any:
    """The stored value of ``key`` at ``path``, or ``_MISSING``."""
    if path.exists():
        try:
            stored = read_json(path)
            if stored.get("key") == from_jsonable(to_jsonable(key)):
                return stored["value"]
        except (ValueError, KeyError, AttributeError):
            pass  # a corrupt or foreign file: recompute
    return _MISSING


def _store(path: Path, key: Any, value: Any) -> Any:
    """Store ``value`` atomically and return it as it reads back (JSON types)."""
    write_json(path, {"key": key, "value": value})
    return from_jsonable(to_jsonable(value))


def cached(workdir: str | Path, key: Any, fn: Callable[[], Any], *, tag: str = "part") -> Any:
    """Return the cached result of ``fn()`` for ``key``, computing and storing it when absent.

    The result is stored atomically as ``workdir/cache/<tag>-<hash(key)>.json``, so a study killed
    in the middle restarts from the parts it had finished. ``key`` must be JSON-serialisable and
    describe everything the result depends on.
    """
    path, key = _cache_path(workdir, key, tag)
    value = _load(path, key)
    return _store(path, key, fn()) if value is _MISSING else value


@dataclass(frozen=True)
class Cell:
    """One independent, cached part of a study: ``fn(*args)``, stored under ``key`` (see
    :func:`cached`).

    ``fn`` is a module-level function and ``args`` plain values, so that a worker process can
    run the cell (they are pickled); the cell seeds everything it draws from, so its result does
    not depend on which process runs it or on the cells run before it.
    """

    key: Any
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    tag: str = "part"


def _cell_task(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    import torch

    torch.set_num_threads(1)  # one single-threaded worker per core (as the sweep's workers)
    return fn(*args)


def cached_cells(workdir: str | Path, cells: Sequence[Cell], *, workers: int = 1) -> list[Any]:
    """The results of ``cells``, in order, each cached as :func:`cached` would.

    With ``workers > 1`` the cells not cached yet run in that many worker processes
    (:func:`signalprop._lifeline.worker_pool`, one torch thread each); each result is stored
    as soon as it arrives, so an interrupted study keeps its finished cells and a rerun computes
    only the others. The results are those of the serial path (``workers=1``), bit for bit,
    since each cell seeds its own random state.
    """
    if int(workers) <= 1:
        return [cached(workdir, c.key, functools.partial(c.fn, *c.args), tag=c.tag)
                for c in cells]
    where = [_cache_path(workdir, c.key, c.tag) for c in cells]
    out = [_load(path, key) for path, key in where]
    todo = [i for i, v in enumerate(out) if v is _MISSING]
    if len(todo) == 1:
        i = todo[0]
        out[i] = _store(*where[i], cells[i].fn(*cells[i].args))
    elif todo:
        from concurrent.futures import as_completed

        from signalprop._lifeline import worker_pool

        with worker_pool(min(int(workers), len(todo))) as pool:
            futs = {pool.submit(_cell_task, cells[i].fn, cells[i].args): i for i in todo}
            for f in as_completed(futs):
                i = futs[f]
                out[i] = _store(*where[i], f.result())
    return out


def finite_or_nan(x: float) -> float:
    """``float(x)`` with non-finite values mapped to NaN (for summaries)."""
    x = float(x)
    return x if math.isfinite(x) else math.nan


def fmt(x: float, digits: int = 3) -> str:
    """Format a number for a conclusion sentence: 3 significant digits, scientific when tiny/huge
    (:func:`signalprop._format.fmt_number`)."""
    return fmt_number(float(x) if x is not None else None, digits)


def pct(x: float) -> str:
    """A fraction as a percentage string (``0.123`` -> ``"12.3%"``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * float(x):.1f}%"


def capped_loss(loss: float | None, failed: bool, chance: float) -> float:
    """A run's final loss as a score: a failed run (diverged, no or a non-finite loss) and a
    loss worse than chance count at the chance level, so a rate or measure where seeds diverge
    is never preferred to one where they train."""
    if failed or loss is None or not math.isfinite(float(loss)):
        return chance
    return min(float(loss), chance)
