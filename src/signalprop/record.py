"""Step-keyed measurements: the one serialisable object that probes, the batched engine,
the diagnosis, the reports and the integrations share.

A :class:`Record` holds ``value[step][layer][metric]`` plus an ordered description of the layers.
Layers are named by their qualified module name (``"layers.3"``) or, for parameters, by the
parameter's qualified name (``"layers.3.weight"``). Whole-model scalars (loss, total gradient norm)
live under the pseudo-layer :data:`MODEL`.

Metric names (a contract: reports, JSON and the tidy table use them):

| metric | meaning |
| --- | --- |
| `out_mean`, `out_std` | mean / std of a module's output over batch and units |
| `out_p05` ... `out_p95` | percentiles 5, 15, 50, 85, 95 of the output |
| `out_nonfinite` | number of NaN/Inf entries in the output |
| `saturated_frac` | activations: fraction of entries with abs(phi'(z)) below the threshold |
| `dead_frac` | rectifiers: fraction of units inactive for the whole batch |
| `off_frac` | rectifiers: fraction of entries <= 0 (units off per example, averaged over examples and units) |
| `out_grad_norm` | norm of dL/dh, h the module's output |
| `out_grad_nonfinite` | NaN/Inf entries in dL/dh |
| `grad_norm` | parameters: norm of dL/dW |
| `grad_nonfinite` | parameters: NaN/Inf entries in dL/dW |
| `weight_norm` | parameters: norm of W |
| `update_ratio` | parameters: norm(W_after - W_before) / norm(W_before) over one optimiser step |
| `loss` | MODEL: the training loss |
| `grad_norm_total` | MODEL: global gradient norm over all parameters |
| `grad_norm_total_clipped` | MODEL: the same after gradient clipping (Lightning callback) |
| `out_grad_norm_t<t>` | recurrent layers: norm of dL/dh_t at time step t (total, through time) |
| `gate_<g>_saturated_frac` | LSTM gates i, f, o / GRU gates z, r: fraction saturated |
| `gate_<g>_mean` | the same gates' mean value (a forget gate near 0 forgets at every step) |
| `in_grad_norm` | blocks: norm of dL/dx at the block's input (the residual stream) |
| `skipped_step` | MODEL: 1 when the step was skipped (GradScaler found inf/NaN gradients) |
| `loss_scale` | MODEL: the GradScaler's loss scale (divided out of every gradient norm) |
| `lr` | MODEL: the learning rate of the first parameter group |
| `accuracy` | MODEL: training accuracy when known |
| `input_mean`, `input_std`, `input_absmax` | MODEL: statistics of the model's input batch |

JSON and non-finite numbers (the one policy of every JSON signalprop writes: records, reports,
findings, trial tables, study results, the CLI's ``--json``): JSON has no NaN or infinity, and a
NaN gradient norm means something else than an infinite one, so they are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the JSON stays valid and nothing is lost), by
:func:`json_number` / :func:`to_jsonable`, and read back by :func:`from_jsonable`. A value that
does not exist (a diverged run's final loss) is ``null``, which readers also take as NaN.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from signalprop._optional import require

#: Pseudo-layer name for whole-model scalars.
MODEL = "__model__"

FORMAT_VERSION = 1

#: Largest decompressed size :meth:`Record.load` accepts (records are a few MB; a gzip bomb of
#: 0.4 MB would otherwise expand to GBs). Override with ``$SIGNALPROP_MAX_RECORD_BYTES``.
MAX_RECORD_BYTES = 512 * 2**20


def max_record_bytes() -> int:
    """The decompression limit in bytes (``$SIGNALPROP_MAX_RECORD_BYTES`` or the default)."""
    raw = os.environ.get("SIGNALPROP_MAX_RECORD_BYTES")
    try:
        return int(raw) if raw else MAX_RECORD_BYTES
    except ValueError:
        raise ValueError(
            f"$SIGNALPROP_MAX_RECORD_BYTES must be an integer, got {raw!r}") from None


def gunzip_limited(raw: bytes, limit: int, what: str = "data") -> bytes:
    """Decompress gzip ``raw`` but refuse more than ``limit`` bytes of output.

    Raises:
        ValueError: the output would exceed ``limit`` (a likely decompression bomb).
        EOFError, zlib.error: truncated or corrupt data.
    """
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = d.decompress(raw, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError(
            f"{what} decompresses to more than {limit} bytes (limit "
            "$SIGNALPROP_MAX_RECORD_BYTES); refusing it as a likely decompression bomb")
    if not d.eof:
        raise EOFError("compressed data ends before the end-of-stream marker")
    return out


#: Prefix of the per-time-step gradient metrics of recurrent layers (``out_grad_norm_t12``).
TIME_PREFIX = "out_grad_norm_t"


@dataclass
class LayerInfo:
    """Static description of one recorded layer or parameter.

    Attributes:
        name: Qualified module or parameter name.
        type: Module class name (``"Linear"``, ``"Sigmoid"``) or ``"Parameter"``.
        role: ``"module"`` or ``"param"``.
        depth: Position in forward-execution order (params inherit their module's depth).
        activation: Canonical activation kind (``"sigmoid"``, ``"relu"`` ...) or ``None``.
        module: For params: the owning module's name.
        shape: Output shape (modules, without batch) or parameter shape.
        site: Call index of a module's call site (0: its first call in a forward pass; a module
            called again gets one entry per call, named ``"act#2"``, ``"act#3"`` ...).
        on_path: Whether the entry is placed on the signal path; ``False`` for parameters used
            outside any recorded module call whose place could not be determined.
        placement: How a parameter's place was found, when not from its own module's call.
        time_steps: Recurrent layers: number of time steps with ||dL/dh_t|| recorded
            (metrics ``out_grad_norm_t0``, ``out_grad_norm_t1``, ...).
        unchecked: Why a statistic of this layer could not be measured, when one could not.
        residual: Blocks: the block adds its input to its output (a skip connection).
        norm_placement: Residual blocks: ``"pre"`` (x + f(norm(x))) or ``"post"``
            (norm(x + f(x))) layer/batch normalisation.
    """

    name: str
    type: str
    role: str = "module"
    depth: int = 0
    activation: str | None = None
    module: str | None = None
    shape: list[int] | None = None
    site: int = 0
    on_path: bool = True
    placement: str | None = None
    time_steps: int | None = None
    unchecked: str | None = None
    residual: bool | None = None
    norm_placement: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


#: The strings that stand for the floats JSON cannot write (see the module docstring).
NONFINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_number(v: Any) -> Any:
    """One number as JSON writes it: non-finite floats as ``"NaN"``/``"Infinity"``/``"-Infinity"``.

    Bools and ints stay as they are; numpy scalars and one-element tensors become floats; a value
    that is not a number is returned unchanged.

    >>> json_number(float("nan")), json_number(float("-inf")), json_number(2), json_number(0.5)
    ('NaN', '-Infinity', 2, 0.5)
    """
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if not isinstance(v, float):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return v
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def to_jsonable(obj: Any, *, strict: bool = True) -> Any:
    """Recursively convert to plain JSON types under the one NaN policy (:func:`json_number`).

    Mappings (keys as strings), lists and tuples recurse; numpy arrays and tensors become lists,
    their scalars numbers; paths become strings.

    Args:
        obj: What to convert.
        strict: Raise ``TypeError`` on a type JSON cannot hold; when false, objects with
            ``to_dict()`` are converted through it and anything else becomes ``str(obj)`` (for
            free-form metadata).

    >>> to_jsonable({"a": [1, float("inf")], "b": None})
    {'a': [1, 'Infinity'], 'b': None}
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, strict=strict) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return json_number(obj)
    if isinstance(obj, np.generic):
        return json_number(obj.item())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays, torch tensors
        return to_jsonable(obj.tolist(), strict=strict)
    if isinstance(obj, Path):
        return str(obj)
    if strict:
        raise TypeError(f"cannot write a {type(obj).__name__} as JSON")
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict(), strict=strict)
    return str(obj)


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the non-finite markers (recursive).

    >>> from_jsonable({"a": ["NaN", "Infinity", 1.0]})
    {'a': [nan, inf, 1.0]}
    """
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, str) and obj in NONFINITE:
        return NONFINITE[obj]
    return obj


_enc = json_number  # the record's values: one number each


def _dec(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        return NONFINITE[v] if v in NONFINITE else float(v)
    return float(v)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; results are meant to be shared like any other output
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass
class Record:
    """Step-keyed per-layer measurements.

    Attributes:
        layers: Ordered layer/parameter descriptions (forward order; params after their module).
        data: ``data[step][layer][metric] = value``.
        meta: Free-form JSON-serialisable metadata (model summary, optimiser, schedule ...).
    """

    layers: dict[str, LayerInfo] = field(default_factory=dict)
    data: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- writing ---------------------------------------------------------------------------
    def _add_flat(self, step: int, names: Sequence[tuple[str, str]], values: Sequence[float]) -> None:
        """Store ``values[i]`` as ``data[step][names[i][0]][names[i][1]]`` when :attr:`data` is
        next read (a probe's step adds ~500 values; building their dicts waits for a reader,
        off the training path). Readers see what :meth:`add_many` would have stored then."""
        flat = self.__dict__.get("_flat")
        if flat is None:  # (made without __init__)
            _get_data(self)
            flat = self.__dict__["_flat"]
        flat.append((int(step), names, values))

    def _realise(self) -> None:
        """Move the values stored by :meth:`_add_flat` into :attr:`data`, in order."""
        pending, self.__dict__["_flat"] = self.__dict__["_flat"], []
        data = self.__dict__["_data"]
        for step, names, values in pending:
            row = data.get(step)
            if row is None:
                row = data[step] = {}
            for (layer, metric), v in zip(names, values, strict=True):
                d = row.get(layer)
                if d is None:
                    d = row[layer] = {}
                d[metric] = v

    def add_layer(self, info: LayerInfo) -> None:
        """Declare a layer (first declaration wins; order of declaration is kept)."""
        self.layers.setdefault(info.name, info)

    def add(self, step: int, layer: str, metric: str, value: float) -> None:
        """Store one value."""
        self.data.setdefault(int(step), {}).setdefault(layer, {})[metric] = float(value)

    def add_many(self, step: int, values: Mapping[str, Mapping[str, float]]) -> None:
        """Store ``values[layer][metric]`` for one step."""
        row = self.data.setdefault(int(step), {})
        for layer, metrics in values.items():
            d = row.setdefault(layer, {})
            for m, v in metrics.items():
                d[m] = float(v)

    def add_scalar(self, step: int, metric: str, value: float) -> None:
        """Store a whole-model scalar (under :data:`MODEL`)."""
        self.add(step, MODEL, metric, value)

    # ---- reading ---------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        """Recorded steps, ascending."""
        return sorted(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __bool__(self) -> bool:  # an empty record is still a record
        return True

    def metrics(self) -> list[str]:
        """All metric names present anywhere in the record, sorted."""
        out: set[str] = set()
        for row in self.data.values():
            for d in row.values():
                out.update(d)
        return sorted(out)

    def has(self, metric: str) -> bool:
        """Whether ``metric`` was recorded at least once."""
        return any(metric in d for row in self.data.values() for d in row.values())

    def layer_names(
        self, role: str | None = None, metric: str | None = None, type_: str | None = None
    ) -> list[str]:
        """Layer names in forward order, optionally filtered by role, by having ``metric``,
        or by module type."""
        names = [
            n
            for n, info in self.layers.items()
            if (role is None or info.role == role) and (type_ is None or info.type == type_)
        ]
        if metric is not None:
            have = {
                layer for row in self.data.values() for layer, d in row.items() if metric in d
            }
            names = [n for n in names if n in have]
        return names

    def get(self, step: int, layer: str, metric: str, default: float = math.nan) -> float:
        """One value, or ``default`` when absent."""
        return self.data.get(step, {}).get(layer, {}).get(metric, default)

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps [S], values [S])`` of one metric of one layer, over the steps that have it."""
        steps, vals = [], []
        for s in self.steps:
            v = self.data[s].get(layer, {}).get(metric)
            if v is not None:
                steps.append(s)
                vals.append(v)
        return np.asarray(steps, dtype=np.int64), np.asarray(vals, dtype=np.float64)

    def scalar(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``series(MODEL, metric)``."""
        return self.series(MODEL, metric)

    def matrix(
        self, metric: str, layers: list[str] | None = None
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Metric as a step x layer matrix.

        Returns:
            ``(steps [S], layers [L], values [S, L])`` with NaN where a value is missing.
            Steps without any value of ``metric`` are dropped.
        """
        if layers is None:
            layers = self.layer_names(metric=metric)
        steps = [
            s for s in self.steps if any(metric in self.data[s].get(n, {}) for n in layers)
        ]
        out = np.full((len(steps), len(layers)), np.nan)
        for i, s in enumerate(steps):
            row = self.data[s]
            for j, n in enumerate(layers):
                v = row.get(n, {}).get(metric)
                if v is not None:
                    out[i, j] = v
        return np.asarray(steps, dtype=np.int64), list(layers), out

    def time_profile(self, layer: str, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(t [T], ||dL/dh_t|| [T])`` of a recurrent layer at ``step`` (default: the last step
        that has one); empty arrays when none was recorded."""
        steps = [step] if step is not None else self.steps[::-1]
        for s in steps:
            d = self.data.get(s, {}).get(layer, {})
            ts = sorted(int(m[len(TIME_PREFIX):]) for m in d if m.startswith(TIME_PREFIX))
            if ts:
                return (np.asarray(ts, dtype=np.int64),
                        np.asarray([d[f"{TIME_PREFIX}{t}"] for t in ts], dtype=np.float64))
        return np.zeros(0, dtype=np.int64), np.zeros(0)

    def at(self, step: int, metric: str) -> dict[str, float]:
        """``{layer: value}`` of one metric at one step."""
        return {
            n: d[metric] for n, d in self.data.get(step, {}).items() if metric in d
        }

    def merge(self, other: Record) -> None:
        """Add another record's layers and values into this one (other wins on conflicts)."""
        for info in other.layers.values():
            self.add_layer(info)
        for s, row in other.data.items():
            self.add_many(s, row)
        self.meta.update(other.meta)

    # ---- tidy table --------------------------------------------------------------------------
    def rows(self) -> Iterator[tuple[int, str, str, float]]:
        """Tidy rows ``(step, layer, metric, value)``: one per step x layer x metric."""
        order = {n: i for i, n in enumerate(self.layers)}
        for s in self.steps:
            row = self.data[s]
            for layer in sorted(row, key=lambda n: (order.get(n, len(order)), n)):
                for m, v in row[layer].items():
                    yield s, layer, m, v

    def to_dataframe(self) -> Any:
        """Tidy ``pandas.DataFrame`` with columns step, layer, metric, value, type, role, depth."""
        pd = require("pandas", "lab", "Record.to_dataframe")

        df = pd.DataFrame(list(self.rows()), columns=["step", "layer", "metric", "value"])
        info = {n: i for n, i in self.layers.items()}
        df["type"] = [info[n].type if n in info else "" for n in df["layer"]]
        df["role"] = [info[n].role if n in info else "model" for n in df["layer"]]
        df["depth"] = [info[n].depth if n in info else -1 for n in df["layer"]]
        return df

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the tidy table as CSV (atomically)."""
        atomic_write_text(path, self.to_dataframe().to_csv(index=False))

    def to_tensorboard(self, logdir: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write every value as TensorBoard scalars (see
        :func:`signalprop.integrations.tensorboard.write_record`)."""
        # lazy: layering, not cost. The record is the core type and the integration builds on it
        # (it imports Record); this convenience reaches up to it only when called.
        from signalprop.integrations.tensorboard import write_record

        return write_record(self, logdir, **kwargs)

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (non-finite numbers encoded as ``"NaN"``/``"Infinity"``)."""
        return {
            "format": "signalprop.record",
            "version": FORMAT_VERSION,
            # the one NaN policy covers meta too (a diverged run's loss, an unknown baseline)
            "meta": to_jsonable(self.meta, strict=False),
            "layers": [i.to_dict() for i in self.layers.values()],
            "data": {
                str(s): {
                    layer: {m: _enc(v) for m, v in d.items()} for layer, d in row.items()
                }
                for s, row in sorted(self.data.items())
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, Mapping) or d.get("format") != "signalprop.record":
            raise ValueError("not a signalprop record (missing format='signalprop.record')")
        version = d.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"record format version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"record format version {d.get('version')} is newer than this signalprop "
                f"({FORMAT_VERSION}); upgrade signalprop"
            )
        rec = cls(meta=dict(from_jsonable(d.get("meta", {}))))
        for info in d.get("layers", []):
            rec.add_layer(LayerInfo(**info))
        for s, row in d.get("data", {}).items():
            rec.data[int(s)] = {
                layer: {m: _dec(v) for m, v in metrics.items()} for layer, metrics in row.items()
            }
        return rec

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save atomically as JSON (gzip-compressed when the name ends in ``.gz``)."""
        path = Path(path)
        data = self.to_json().encode("utf-8")
        if path.suffix == ".gz":
            data = gzip.compress(data, mtime=0)
        atomic_write_bytes(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], max_bytes: int | None = None) -> Record:
        """Load a record written by :meth:`save`.

        Args:
            path: The file (``.json`` or gzip-compressed).
            max_bytes: Refuse records larger than this once decompressed (default
                :func:`max_record_bytes`).

        Raises:
            FileNotFoundError: no such file.
            ValueError: ``corrupt or truncated record: PATH (...)``, a format version newer than
                this signalprop, or a file over the size limit.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no record at {path}")
        return cls.from_bytes(path.read_bytes(), str(path), max_bytes)

    @classmethod
    def from_bytes(cls, raw: bytes, name: str = "<bytes>", max_bytes: int | None = None
                   ) -> Record:
        """A record from the bytes of a file written by :meth:`save` (see :meth:`load`)."""
        limit = max_record_bytes() if max_bytes is None else max_bytes
        try:
            if raw[:2] == b"\x1f\x8b":
                raw = gunzip_limited(raw, limit, f"record {name}")
            elif len(raw) > limit:
                raise ValueError(f"record {name} is larger than {limit} bytes")
            d = json.loads(raw.decode("utf-8"))
        except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError,
                json.JSONDecodeError) as e:
            raise ValueError(f"corrupt or truncated record: {name} ({type(e).__name__}: "
                             f"{e})") from None
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"corrupt or truncated record: {name} (bad structure: "
                             f"{type(e).__name__}: {e})") from None
        except ValueError as e:
            if "version" in str(e) or "not a signalprop record" in str(e):
                raise ValueError(f"{name}: {e}") from None
            raise ValueError(f"corrupt or truncated record: {name} ({e})") from None


def _get_data(self: Record) -> dict[int, dict[str, dict[str, float]]]:
    d = self.__dict__
    if "_data" not in d:  # (made without __init__: a pickle from before the property)
        _set_data(self, d.pop("data", {}))
    if d["_flat"]:
        self._realise()
    return d["_data"]


def _set_data(self: Record, value: dict[int, dict[str, dict[str, float]]]) -> None:
    self.__dict__["_data"] = value
    self.__dict__["_flat"] = []  # (values added by _add_flat, not yet in data)


# ``data`` is read through a property: values a probe added with ``_add_flat`` become dicts
# when someone reads them (the dataclass's __init__, __eq__ and __repr__ go through it too)
Record.data = property(_get_data, _set_data, doc="``data[step][layer][metric] = value``.")  # type: ignore[assignment]


def concat(records: Iterable[Record]) -> Record:
    """Merge several records into one (e.g. chunks written by different processes)."""
    out = Record()
    for r in records:
        out.merge(r)
    return out
