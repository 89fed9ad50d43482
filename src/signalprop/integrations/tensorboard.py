"""TensorBoard export: a :class:`~signalprop.record.Record` as scalars and histograms, after the
fact (:func:`write_record`, also ``record.to_tensorboard(logdir)``) or live while a probe records
(:class:`TensorBoardWriter`, a probe ``on_record`` listener).

Needs the ``[tensorboard]`` extra (``pip install tensorboard``); events are written with
``torch.utils.tensorboard.SummaryWriter`` and read back by TensorBoard's own
``EventAccumulator`` (:func:`load_scalars`).

What is written at each recorded step (``prefix`` defaults to ``"signalprop"``):

| tag | kind | meaning |
| --- | --- | --- |
| ``<prefix>/<metric>/<layer>`` | scalar | every recorded value of every layer (NaN/Inf written as is) |
| ``<prefix>/<metric>`` | scalar | whole-model values (``loss``, ``grad_norm_total``) |
| ``<prefix>/nonfinite_layers/<metric>`` | scalar | layers whose ``metric`` is NaN/Inf at this step (0 when healthy): non-finite values are counted, never silently dropped |
| ``<prefix>/depth/log10_grad_norm`` | histogram | log10 of the norm of dL/dW over all parameters: the spread of gradient scales across depth (vanishing gradients span many decades) |
| ``<prefix>/depth/log10_out_grad_norm`` | histogram | the same for the norm of dL/dh at every module output |
| ``<prefix>/depth_excluded/<name>`` | scalar | layers a depth histogram left out because the norm was 0, NaN or Inf |
| ``<prefix>/out_dist/<layer>`` | histogram | the layer's output between its 5th and 95th percentile; the buckets are the recorded percentiles (mass 10/35/35/10 %) |

Tags keep the layer's qualified module name (``layers.3.weight``), so TensorBoard's tag filter
(``grad_norm/layers\\.1\\b``) selects a layer or a metric across layers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from signalprop.record import MODEL, Record

#: Default first component of every tag.
DEFAULT_PREFIX = "signalprop"

_PCT = re.compile(r"^out_p(\d+)$")


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer imports the tensorboard package
        raise ImportError(
            "TensorBoard export needs the 'tensorboard' package: pip install 'signalprop[tensorboard]'"
        ) from e
    return SummaryWriter


def scalar_tag(metric: str, layer: str, prefix: str = DEFAULT_PREFIX) -> str:
    """TensorBoard tag of one value: ``<prefix>/<metric>/<layer>``, or ``<prefix>/<metric>`` for
    the whole-model pseudo-layer :data:`~signalprop.record.MODEL`."""
    if layer == MODEL:
        return f"{prefix}/{metric}"
    return f"{prefix}/{metric}/{layer}"


def percentile_histogram(
    metrics: Mapping[str, float],
) -> tuple[float, float, list[float], list[float]] | None:
    """A TensorBoard raw histogram of the central mass of a layer's output from its percentiles.

    The recorded percentiles q_1 < ... < q_k (``out_p05`` ... ``out_p95``) with values v_i bound
    buckets (v_{i-1}, v_i] holding q_i - q_{i-1} percent of the values. TensorBoard's bucket i
    covers (limit_{i-1}, limit_i] and bucket 0 extends to the left of limit_0, so bucket 0 is
    given zero count and the histogram spans exactly [v_1, v_k]: the middle q_k - q_1 percent
    (90 % with the default percentiles); the tails beyond are unknown and not invented.
    Buckets of zero width (equal percentiles, e.g. a dead ReLU layer at 0) are merged.

    Args:
        metrics: One layer's ``{metric: value}``; only ``out_pNN`` keys are read.

    Returns:
        ``(min, max, bucket_limits, bucket_counts)`` in percent of the values, or ``None`` when
        fewer than two finite percentiles were recorded.
    """
    pts = sorted(
        (float(m.group(1)), float(v))
        for k, v in metrics.items()
        if (m := _PCT.match(k)) is not None and math.isfinite(v)
    )
    if len(pts) < 2:
        return None
    limits = [pts[0][1]]
    counts = [0.0]
    for (q0, _), (q1, v1) in zip(pts[:-1], pts[1:], strict=True):
        mass = q1 - q0
        if v1 <= limits[-1]:
            # a zero-width bucket (percentiles are monotone, so only equality reaches here)
            counts[-1] += mass
        else:
            limits.append(v1)
            counts.append(mass)
    return limits[0], limits[-1], limits, counts


class TensorBoardWriter:
    """Writes signalprop measurements as TensorBoard events; usable live as a probe listener.

    Example::

        from signalprop.integrations.tensorboard import TensorBoardWriter
        with TensorBoardWriter("runs/exp1") as tb:
            probe = signalprop.Probe(model, optimizer=opt, schedule=10, on_record=[tb])
            with probe:
                ...  # train
        # tensorboard --logdir runs

    Args:
        logdir: Folder for the event file (created). Ignored when ``writer`` is given.
        writer: An existing ``SummaryWriter`` to write into (e.g. Lightning's
            ``TensorBoardLogger.experiment``); it is flushed but not closed by :meth:`close`.
        metrics: Only these metric names (``None``: all). Whole-model scalars are filtered too.
        scalars: Write one scalar per layer and metric (see the module docstring for tags).
        histograms: Write the depth histograms of log10 gradient norms and each layer's
            percentile histogram.
        prefix: First component of every tag.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None = None,
        *,
        writer: Any | None = None,
        metrics: Iterable[str] | None = None,
        scalars: bool = True,
        histograms: bool = True,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if isinstance(metrics, str):
            raise TypeError(f"metrics must be a list of metric names, not the string {metrics!r}")
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix must be a non-empty tag component, got {prefix!r}")
        self.metrics = None if metrics is None else frozenset(metrics)
        self.scalars = bool(scalars)
        self.histograms = bool(histograms)
        self.prefix = prefix.strip("/")
        if writer is not None:
            self.writer = writer
            self._owns_writer = False
            self.logdir = Path(writer.log_dir) if getattr(writer, "log_dir", None) else None
        else:
            if logdir is None:
                raise ValueError("TensorBoardWriter needs a logdir or an existing writer")
            self.logdir = Path(logdir)
            self.logdir.mkdir(parents=True, exist_ok=True)
            self.writer = _summary_writer_class()(log_dir=str(self.logdir))
            self._owns_writer = True
        self.steps_written = 0

    # a probe calls listeners as f(step, values)
    def __call__(self, step: int, values: Mapping[str, Mapping[str, float]]) -> None:
        self.write_step(step, values)

    def _keep(self, metric: str) -> bool:
        return self.metrics is None or metric in self.metrics

    def write_step(self, step: int, values: Mapping[str, Mapping[str, float]]) -> None:
        """Write one step's ``values[layer][metric]``."""
        step = int(step)
        w, p = self.writer, self.prefix
        nonfinite: dict[str, int] = {}
        for layer, d in values.items():
            for metric, v in d.items():
                if not self._keep(metric):
                    continue
                v = float(v)
                bad = not math.isfinite(v)
                nonfinite[metric] = nonfinite.get(metric, 0) + bad
                if self.scalars:
                    w.add_scalar(scalar_tag(metric, layer, p), v, step)
        if self.scalars:
            for metric, n in sorted(nonfinite.items()):
                w.add_scalar(f"{p}/nonfinite_layers/{metric}", float(n), step)
        if self.histograms:
            self._depth_histogram(step, values, "grad_norm")
            self._depth_histogram(step, values, "out_grad_norm")
            if self.metrics is None or any(_PCT.match(m) for m in self.metrics):
                for layer, d in values.items():
                    if layer == MODEL:
                        continue
                    h = percentile_histogram(
                        {k: v for k, v in d.items() if self._keep(k)}
                    )
                    if h is None:
                        continue
                    lo, hi, limits, counts = h
                    mids = _bucket_mids(lo, limits)
                    num = float(sum(counts))
                    w.add_histogram_raw(
                        f"{p}/out_dist/{layer}",
                        min=lo,
                        max=hi,
                        num=num,
                        sum=float(np.dot(mids, counts)),
                        sum_squares=float(np.dot(np.square(mids), counts)),
                        bucket_limits=limits,
                        bucket_counts=counts,
                        global_step=step,
                    )
        self.steps_written += 1

    def _depth_histogram(
        self, step: int, values: Mapping[str, Mapping[str, float]], metric: str
    ) -> None:
        if not self._keep(metric):
            return
        vals = [float(d[metric]) for layer, d in values.items() if layer != MODEL and metric in d]
        if not vals:
            return
        arr = np.asarray(vals, dtype=np.float64)
        ok = np.isfinite(arr) & (arr > 0)
        name = f"log10_{metric}"
        # the histogram can only hold finite logs; the rest is counted beside it
        self.writer.add_scalar(
            f"{self.prefix}/depth_excluded/{name}", float((~ok).sum()), step
        )
        if ok.any():
            self.writer.add_histogram(f"{self.prefix}/depth/{name}", np.log10(arr[ok]), step)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        """Write a text summary (e.g. the record's metadata) under ``<prefix>/<tag>``."""
        self.writer.add_text(f"{self.prefix}/{tag}", text, step)

    def flush(self) -> None:
        """Push pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush, and close the writer when this object created it."""
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardWriter({str(self.logdir)!r}, steps_written={self.steps_written})"


def _bucket_mids(lo: float, limits: list[float]) -> np.ndarray:
    left = np.asarray([lo, *limits[:-1]], dtype=np.float64)
    return (left + np.asarray(limits, dtype=np.float64)) / 2


def write_record(
    record: Record,
    logdir: str | os.PathLike[str],
    *,
    metrics: Iterable[str] | None = None,
    scalars: bool = True,
    histograms: bool = True,
    prefix: str = DEFAULT_PREFIX,
) -> Path:
    """Write every recorded step of ``record`` as TensorBoard events in ``logdir``.

    The record's metadata is written as a text summary (``<prefix>/meta``). See the module
    docstring for the tags. Equivalent to ``record.to_tensorboard(logdir, ...)``.

    Args:
        record: The measurements.
        logdir: Output folder (created); one new event file per call.
        metrics: Only these metric names (``None``: all).
        scalars: Write per-layer scalars and non-finite counts.
        histograms: Write depth and percentile histograms.
        prefix: First component of every tag.

    Returns:
        The log folder.
    """
    if not isinstance(record, Record):
        raise TypeError(f"write_record needs a signalprop Record, got {type(record).__name__}")
    with TensorBoardWriter(
        logdir, metrics=metrics, scalars=scalars, histograms=histograms, prefix=prefix
    ) as tb:
        if record.meta:
            tb.write_text("meta", "```\n" + json.dumps(record.meta, indent=2, default=str) + "\n```")
        for s in record.steps:
            tb.write_step(s, record.data[s])
    return Path(logdir)


def load_scalars(logdir: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every scalar in ``logdir`` back with TensorBoard's own ``EventAccumulator``.

    Returns:
        ``{tag: (steps [S], values [S])}`` (float64 values; NaN/Inf kept).
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise ImportError(
            "reading TensorBoard events needs the 'tensorboard' package: "
            "pip install 'signalprop[tensorboard]'"
        ) from e
    path = Path(logdir)
    if not path.exists():
        raise FileNotFoundError(f"no TensorBoard log folder at {path}")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = (
            np.asarray([e.step for e in events], dtype=np.int64),
            np.asarray([e.value for e in events], dtype=np.float64),
        )
    return out
