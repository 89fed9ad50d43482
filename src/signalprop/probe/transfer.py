"""How a recorded step's values reach the record: one flat vector per step, moved to the host
in one transfer (deferred and non-blocking on accelerators), then host-side fix-ups (NaN/Inf
counts, float32 norms that may have underflowed, idle clipping)."""

from __future__ import annotations

import math
from operator import itemgetter
from typing import Any

import torch

from signalprop import stats
from signalprop.probe import hooks
from signalprop.probe.sites import _Metrics, _Site
from signalprop.record import MODEL, Record

#: float32 norms below this (around the square root of the smallest normal float32) may have
#: lost precision or underflowed while squaring: re-checked in float64 on the host.
_RECHECK_BELOW = 1e-18


#: Values of recorded steps waiting on the device for their transfer hold at most about this
#: fraction of the parameters' bytes (the probe's memory target is 5% of model + optimiser).
QUEUE_FRACTION: float = 0.01


class Transfer:
    """Mixin of :class:`~signalprop.probe.core.Probe`: from device values to the record."""

    @property
    def record(self) -> Record:
        """The record, with every recorded step's values (reading it brings the values still
        on the device to the host: it may wait for the device)."""
        self.flush()
        return self._record

    @record.setter
    def record(self, value: Record) -> None:
        self.flush()
        self._record = value

    def flush(self, wait: bool = True) -> None:
        """Bring every value still on the device into the record.

        Args:
            wait: Wait for copies in flight (``False``: store only the copies that have
                landed; the training path never waits).
        """
        if wait:
            self._start_transfer()
        while self._inflight:
            host, event, entries = self._inflight[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self._inflight.pop(0)
            self._materialise(host, entries)
        if wait:
            self._flush_ratios()

    @property
    def _deferring(self) -> bool:
        return (self.flush_every > 1 and bool(self.optimizers) and not self.on_record
                and self.reducer is None)

    def _start_transfer(self) -> None:
        """One non-blocking copy of every queued value to pinned host memory."""
        if not self._queue:
            return
        entries, self._queue = self._queue, []
        self._queued_bytes = 0
        vecs = [e[3] for e in entries if e[3].numel()]
        vec = torch.cat(vecs) if vecs else torch.zeros(0, dtype=torch.float64)
        # only the sizes travel on: the device vectors are freed once the copy is queued
        # (stream-ordered, so the copy reads them first)
        entries = [(e[0], e[1], e[2], e[3].numel(), e[4], e[5]) for e in entries]
        if vec.device.type == "cuda":
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        elif vec.device.type == "cpu":
            host, event = vec, None
        else:  # other accelerators: a plain copy
            host, event = vec.cpu(), None
        self._inflight.append((host, event, entries))

    def _materialise(self, host: torch.Tensor, entries: list[Any]) -> None:
        flat = host.tolist()
        pos = 0
        for step, kind, names, n, uncounted, layout in entries:
            vals = flat[pos : pos + n]
            pos += n
            if layout is not None:  # host values in their places
                vals = _splice(layout, vals)
            if kind == "ratio":  # ||dW|| then ||W||: divided here
                vals = _ratios(vals[: len(names)], vals[len(names) :])
            plan = self._rows_plan(names) if kind == "pre" else None
            if plan is None or plan.deferred_healthy(vals):
                # (the dicts are built when the record is read; a healthy step's counts too)
                self._record._add_flat(step, names, vals)
                if plan is not None and plan.deferred_names:
                    self._record._add_flat(step, plan.deferred_names, plan.deferred_zeros)
                continue
            row = self._record.data.setdefault(int(step), {})
            for (layer, metric), v in zip(names, vals, strict=True):
                d = row.get(layer)
                if d is None:
                    d = row[layer] = {}
                d[metric] = v
            if kind == "pre":
                self._fix_deferred(row, uncounted)

    def _fix_deferred(self, row: dict[str, dict[str, float]], uncounted: bool) -> None:
        """Host-side fix-ups of a deferred step (its tensors are gone): clip bookkeeping, and
        NaN/Inf counts where the device did not take them (NaN: not counted)."""
        d = row.get(MODEL, {})
        a, b = d.get("grad_norm_total"), d.get("grad_norm_total_clipped")
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
            if abs(a - b) <= 1e-5 * max(abs(a), 1e-30):
                del d["grad_norm_total_clipped"]
        for d in row.values():
            n = d.get("out_grad_norm")
            if n is not None and not math.isfinite(n):
                hooks._COUNT_NONFINITE[0] = True
                if uncounted:
                    d["out_grad_nonfinite"] = math.nan
            m = d.get("out_mean")
            if m is not None and "out_nonfinite" not in d:  # exact mode: outputs are gone
                d["out_nonfinite"] = 0.0 if math.isfinite(m) else math.nan
            g = d.get("grad_norm")
            if g is not None and "grad_nonfinite" not in d:
                if math.isfinite(g):
                    d["grad_nonfinite"] = 0.0
                else:
                    hooks._COUNT_NONFINITE[0] = True
                    d["grad_nonfinite"] = math.nan

    def _flush_ratios(self) -> None:
        if self._ratios is not None:
            step, names, num, den = self._ratios
            self._ratios = None
            both = torch.cat([num, den]).tolist()  # (one read)
            self._store_ratios(step, names, _ratios(both[: len(num)], both[len(num) :]))

    def _store_ratios(self, step: int, names: _Metrics, vals: list[float]) -> None:
        self._record._add_flat(step, names, vals)  # (``(param, "update_ratio")`` names)

    def _enqueue(self, kind: str, values: list[Any], names: _Metrics,
                 uncounted: bool) -> None:
        """Queue a step's values on the device (``kind`` "ratio": ||dW|| and ||W|| of each
        name, divided when they land). Host values (lists) wait on the host in their places:
        each tensor call costs the training step ~5-10 us of host time."""
        parts = [_flat(v) for v in values if type(v) is not list]
        layout = None if len(parts) == len(values) else \
            [v if type(v) is list else v.numel() for v in values]
        if not values:
            return
        if not parts:
            vec = torch.zeros(0, dtype=torch.float64)
        elif all(p.is_cpu for p in parts):
            vec = torch.cat(parts).to(torch.float64)
        else:
            dev = next(p.device for p in parts if not p.is_cpu)
            vec = torch.cat([p if p.device == dev else p.to(dev, non_blocking=True)
                             for p in parts]).to(torch.float64)
        n = vec.numel() + (0 if layout is None else
                           sum(len(v) for v in layout if type(v) is list))
        if n != len(names) * (2 if kind == "ratio" else 1):  # a bug, never user error
            raise RuntimeError(f"probe bookkeeping mismatch: {n} values, {len(names)} names")
        self._queue.append((self.step_index, kind, names, vec, uncounted, layout))
        # (as the CUDA caching allocator counts it: blocks of 512 bytes)
        self._queued_bytes += -(-vec.numel() * vec.element_size() // 512) * 512

    @property
    def _queue_full(self) -> bool:
        """Whether the values waiting on the device have reached their memory budget
        (:data:`QUEUE_FRACTION` of the parameters' bytes): then they travel before
        ``flush_every`` recorded steps have gone by (a small model's values would otherwise
        be a large share of its memory)."""
        budget = self.__dict__.get("_queue_budget")
        if budget is None:
            budget = self._queue_budget = QUEUE_FRACTION * sum(
                p.numel() * p.element_size() for p in self._plist)
        return self._queued_bytes >= budget

    def _note_unchecked(self) -> None:
        """Write down, once per layer, which statistic could not be measured and why."""
        notes = self._record.meta.setdefault("unchecked", {})
        for j in self._used:
            s = self._sites[j]
            if s.unchecked and s.name not in notes:
                notes[s.name] = s.unchecked
                info = self._record.layers.get(s.name)
                if info is not None and info.unchecked is None:
                    info.unchecked = s.unchecked
        if not notes:
            del self._record.meta["unchecked"]

    def _drop_unchanged_clip(self) -> None:
        # the gradients were touched in place but their global norm did not change (unscale_
        # with nothing to clip, an idle clip_grad_norm_): nothing was clipped
        d = self._pending.get(MODEL, {}) if self._pending else {}
        a, b = d.get("grad_norm_total"), d.get("grad_norm_total_clipped")
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
            if abs(a - b) <= 1e-5 * max(abs(a), 1e-30):
                del d["grad_norm_total_clipped"]

    def _commit(self) -> None:
        if self._row is not None:  # (no listener: the record builds the dicts when read)
            names, flat, plan = self._row
            self._row = None
            rec, step = self._record, self.step_index
            rec._add_flat(step, names, flat)
            rec._add_flat(step, plan.count_names, plan.count_zeros)
            if self._pending:  # host additions (skipped_step)
                rec._add_flat(step, *_names_values(self._pending))
            self._pending = None
            return
        if self._pending is not None and self._deferring:
            # the step's row (host additions; its values follow when they land)
            self._record._add_flat(self.step_index, *_names_values(self._pending))
            self._pending = None
            return
        if self._pending is not None:
            if self.step_index not in self._record.data:
                # the step's fresh dicts become the record's row (no copy of ~10 values/layer)
                self._record.data[self.step_index] = self._pending
            else:
                self._record.add_many(self.step_index, self._pending)
            for fn in self.on_record:
                fn(self.step_index, self._pending)
        self._pending = None

    def _to_dict(self, values: list[Any], names: _Metrics) -> dict[str, dict[str, float]]:
        """The step's rows from its ``values`` (tensors, and lists of host floats) in ONE
        transfer. On a CPU step each tensor or NumPy call costs ~5 us amid the training
        step's memory traffic (several times its cost in a loop of its own), so the host side
        is plain Python on one list."""
        carried = self._ratios  # the previous recorded step's update ratios ride along
        self._ratios = None
        if carried is not None:
            values = [*values, carried[2], carried[3]]
        if all(type(v) is list or v.is_cpu for v in values):
            # the host is the device: no transfer, and each tensor's values read as they are
            # (one cat would cost more than the reads it saves)
            flat: list[float] = []
            for v in values:
                flat += v if type(v) is list else _host_list(v)
        else:
            flat = self._transfer(values)
        if carried is not None:
            n = len(carried[1])
            self._store_ratios(carried[0], carried[1], _ratios(flat[-2 * n : -n], flat[-n:]))
            del flat[-2 * n :]
        if self.reducer is not None:  # across ranks, before anything is recorded
            names, vec = self.reducer.reduce(names, torch.tensor(flat, dtype=torch.float64))
            flat = vec.tolist()
        if len(flat) != len(names):  # a bug, never user error
            raise RuntimeError(f"probe bookkeeping mismatch: {len(flat)} values, {len(names)} names")
        plan = self._rows_plan(names)
        # a healthy step (the usual case) gets its NaN/Inf counts (0) from the plan; any other
        # is fixed up value by value (_fix_nonfinite_counts)
        self._healthy = plan if plan.healthy(flat) else None
        if self._healthy is not None and not plan.clipped and not (
                self.on_record or self.reducer is not None or self._updates is None):
            # nobody needs this step's dicts now: they are built when the record is read
            # (_commit stores the flat values; pending() builds them if asked)
            self._row = (names, flat, plan)
            return {}
        return _rows(names, flat)

    def _lazy_rows(self) -> None:
        """Build the pending step's dicts from its flat values now (``pending()`` asked)."""
        if self._row is None:
            return
        names, flat, plan = self._row
        self._row = None
        extra, self._pending = self._pending or {}, _rows(names, flat)
        plan.fix_healthy(self._pending)
        for layer, d in extra.items():  # (host additions since: skipped_step)
            self._pending.setdefault(layer, {}).update(d)

    def _transfer(self, values: list[Any]) -> list[float]:
        """The values of an accelerator step in ONE transfer (its only host synchronisation)."""
        parts = [_flat(v) for v in values if type(v) is not list]
        dev = next(p.device for p in parts if not p.is_cpu)
        vec = torch.cat([p if p.device == dev else p.to(dev, non_blocking=True) for p in parts])
        flat = vec.to(torch.float64).cpu().tolist()
        return _splice(values, flat) if len(parts) != len(values) else flat

    def _rows_plan(self, names: _Metrics) -> _RowsPlan:
        """The plan for these names (made once per layer map and set of metrics)."""
        if len(self._site_names) != len(self._sites):
            self._site_names = {s.name: s for s in self._sites}
        key = (len(names), len(self._sites))
        plan = self._plans.get(key)
        if plan is None or plan.names != names:
            if len(self._plans) > 64:  # (names that keep changing: no unbounded cache)
                self._plans.clear()
            plan = self._plans[key] = _RowsPlan(list(names), self._site_names, self._param_of)
        return plan

    def _fix_nonfinite_counts(self) -> None:
        """Host-side fix-ups, right after the step's transfer (rare paths: healthy steps only
        scan). NaN/Inf entries are counted exactly (on the forward sample when the output was
        sampled, scaled to the output's size) where a norm or moment was non-finite; float32
        parameter norms (the CPU's) that may have under- or overflowed are redone in float64.
        Counts are recorded (as 0 or more) for every layer so a NaN is counted, never dropped.
        """
        pending = self._pending
        assert pending is not None
        uncounted, self._uncounted = self._uncounted, False
        healthy, self._healthy = self._healthy, None
        if healthy is not None:
            if self._row is None:  # (rows built later get them as they are built)
                healthy.fix_healthy(pending)
            return  # every count is 0, set by the plan (_RowsPlan.healthy)
        scale = pending.get(MODEL, {}).get("loss_scale", 1.0)  # on the host by now
        if len(self._site_names) != len(self._sites):
            self._site_names = {s.name: s for s in self._sites}
        pos, pidx = self._site_names, self._param_of
        refix = False
        isfinite, lo, inf = math.isfinite, _RECHECK_BELOW, math.inf
        for layer, d in pending.items():
            n = d.get("out_grad_norm")
            if n is not None and not isfinite(n):
                hooks._COUNT_NONFINITE[0] = True  # count from the next recorded step on
                if uncounted:
                    d["out_grad_nonfinite"] = math.nan  # not counted on this step
            if layer == MODEL:
                continue
            s = pos.get(layer)
            if s is not None:
                if "out_mean" in d:
                    d["out_nonfinite"] = (0.0 if isfinite(d["out_mean"]) and isfinite(d["out_std"])
                                          else _output_nonfinite(s, d))
                continue
            p = pidx.get(layer)
            if p is None:
                continue
            gn, wn = d.get("grad_norm"), d.get("weight_norm")
            if (gn is None or lo <= gn < inf) and (wn is None or lo <= wn < inf):
                if gn is not None:  # healthy (the usual case): nothing to count or redo
                    d["grad_nonfinite"] = 0.0
                continue
            refix = _fix_param(p, d, scale) or refix
        if refix and "grad_norm_total" in pending.get(MODEL, {}):
            tot = [pending[n]["grad_norm"] for n, _ in self.params
                   if "grad_norm" in pending.get(n, {})]
            pending[MODEL]["grad_norm_total"] = math.sqrt(math.fsum(v * v for v in tot))


def _flat(v: torch.Tensor) -> torch.Tensor:
    """``v`` as a flat tensor outside autograd (most values already are one: no new view)."""
    if v.requires_grad:
        return v.detach().reshape(-1)
    return v if v.dim() == 1 else v.reshape(-1)


def _rows(names: _Metrics, flat: list[float]) -> dict[str, dict[str, float]]:
    """``{layer: {metric: value}}`` of one step (layers and metrics in order of appearance)."""
    out: dict[str, dict[str, float]] = {}
    for (layer, metric), v in zip(names, flat, strict=True):
        d = out.get(layer)
        if d is None:
            d = out[layer] = {}
        d[metric] = v
    return out


def _host_list(v: torch.Tensor) -> list[float]:
    """The values of a CPU tensor as floats (what a float64 copy would hold)."""
    if not v.is_floating_point():
        v = v.double()  # (counts: floats in the record)
    if v.dim() == 1:
        return v.tolist()
    return [v.tolist()] if v.dim() == 0 else v.reshape(-1).tolist()


def _names_values(rows: dict[str, dict[str, float]]) -> tuple[_Metrics, list[float]]:
    pairs = [((layer, m), v) for layer, d in rows.items() for m, v in d.items()]
    return [n for n, _ in pairs], [v for _, v in pairs]


def _splice(values: list[Any], flat: list[float]) -> list[float]:
    """The values in order: the tensors' from ``flat``, the host lists' as they are
    (``values``: tensors, or their sizes, and lists)."""
    out: list[float] = []
    pos = 0
    for v in values:
        if type(v) is list:
            out += v
        else:
            n = v if type(v) is int else v.numel()
            out += flat[pos : pos + n]
            pos += n
    return out


def _ratios(num: list[float], den: list[float]) -> list[float]:
    """num / max(den, 1e-30), as the device would divide (a NaN stays NaN)."""
    return [a / (b if not b < 1e-30 else 1e-30) for a, b in zip(num, den, strict=True)]


def _getter(idx: list[int]) -> Any:
    """A function ``flat -> tuple`` of the values at ``idx`` (operator.itemgetter, always a
    tuple)."""
    if len(idx) > 1:
        return itemgetter(*idx)
    return (lambda flat: (flat[idx[0]],)) if idx else (lambda flat: ())


class _RowsPlan:
    """What :meth:`Transfer._fix_nonfinite_counts` needs to know of a step with these
    ``names``, worked out once per set of names: where the values are whose health it checks,
    and which rows get a NaN/Inf count of 0 on a healthy step (every output and parameter
    gradient norm, output mean and std finite, parameter norms in the range where float32 is
    exact: :data:`_RECHECK_BELOW`). Checked on the step's flat values with a few calls in C
    (sums and a min over tuples) rather than value by value; the counts are added to dicts
    built now (:meth:`fix_healthy`) or, as names and values, to those built when the record is
    read (:meth:`Transfer._commit`)."""

    __slots__ = ("names", "lo", "fin", "grad_rows", "out_rows", "count_names", "count_zeros",
                 "clipped", "dfin", "deferred_names", "deferred_zeros")

    def __init__(self, names: _Metrics, sites: dict[str, Any], params: dict[str, Any]) -> None:
        self.names = names
        lo: list[int] = []
        fin: list[int] = []
        grad_rows: dict[str, None] = {}  # (ordered sets)
        out_rows: dict[str, None] = {}
        for i, (layer, metric) in enumerate(names):
            if metric == "out_grad_norm":
                fin.append(i)
            if layer == MODEL:
                continue
            if layer in sites:
                if metric in ("out_mean", "out_std"):
                    fin.append(i)
                if metric == "out_mean":
                    out_rows[layer] = None
            elif layer in params and metric in ("grad_norm", "weight_norm"):
                lo.append(i)
                if metric == "grad_norm":
                    grad_rows[layer] = None
        self.lo, self.fin = _getter(lo), _getter(fin)
        self.grad_rows, self.out_rows = tuple(grad_rows), tuple(out_rows)
        # the counts fix_healthy sets, as (layer, metric) names and values
        self.count_names = [(layer, "out_nonfinite") for layer in self.out_rows] + \
            [(layer, "grad_nonfinite") for layer in self.grad_rows]
        self.count_zeros = [0.0] * len(self.count_names)
        # (an idle clip is dropped from the dicts: _drop_unchanged_clip)
        self.clipped = (MODEL, "grad_norm_total_clipped") in names
        # a deferred step (Transfer._fix_deferred): healthy when its output gradient norms,
        # output means and gradient norms are finite and nothing was clipped; then the rows
        # with a mean or a gradient norm and no count get a count of 0
        have = set(names)
        dfin = [i for i, (_, m) in enumerate(names)
                if m in ("out_grad_norm", "out_mean", "grad_norm")]
        self.dfin = _getter(dfin)
        self.deferred_names = [
            (layer, c) for layer, m in dict.fromkeys(names)
            for c in (("out_nonfinite",) if m == "out_mean" else
                      ("grad_nonfinite",) if m == "grad_norm" else ())
            if (layer, c) not in have]
        self.deferred_zeros = [0.0] * len(self.deferred_names)

    def healthy(self, flat: list[float]) -> bool:
        # (in C over tuples: a sum is finite only if every term is; min() then sees no NaN)
        lo, fin = self.lo(flat), self.fin(flat)
        return (not lo or (math.isfinite(sum(lo)) and min(lo) >= _RECHECK_BELOW)) and \
            (not fin or math.isfinite(sum(fin)))

    def deferred_healthy(self, flat: list[float]) -> bool:
        fin = self.dfin(flat)
        return not self.clipped and (not fin or math.isfinite(sum(fin)))

    def fix_healthy(self, rows: dict[str, dict[str, float]]) -> None:
        """The counts of a healthy step (as the value-by-value loop would set them)."""
        for layer in self.out_rows:
            rows[layer]["out_nonfinite"] = 0.0
        for layer in self.grad_rows:
            rows[layer]["grad_nonfinite"] = 0.0


def _output_nonfinite(s: _Site, d: dict[str, float]) -> float:
    """NaN/Inf entries of a site's output (counted on the sample, scaled to the output)."""
    bad = not (math.isfinite(d["out_mean"]) and math.isfinite(d["out_std"]))
    cnt = 0.0
    if bad and s.outs:
        t = s.outs[0]
        cnt = float(stats.nonfinite_count(t.reshape(1, -1))[0])
        if s.numel > t.numel():  # a sample: scaled to the whole output
            cnt = round(cnt * s.numel / t.numel())
    return cnt


def _fix_param(p: torch.Tensor, d: dict[str, float], scale: float) -> bool:
    """A parameter's NaN/Inf gradient count, and its float32 norms redone in float64 where
    they may have under- or overflowed. Returns whether the gradient norm changed."""
    refix = False
    if "grad_norm" in d:
        g = None if p.grad is None else stats.dense_values(p.grad)
        gn = d["grad_norm"]
        d["grad_nonfinite"] = (
            float(stats.nonfinite_count(g.unsqueeze(0))[0])
            if not math.isfinite(gn) and g is not None
            else 0.0
        )
        if (
            g is not None
            and g.is_floating_point()
            and g.dtype != torch.float64
            and not _RECHECK_BELOW <= gn < math.inf
        ):
            v = float(torch.linalg.vector_norm(g.double())) / scale
            if v != gn and not (math.isnan(v) and math.isnan(gn)):
                d["grad_norm"] = v
                refix = True
    wn = d.get("weight_norm")
    if wn is not None and not _RECHECK_BELOW <= wn < math.inf:
        w = p.detach()
        if w.is_floating_point() and w.dtype != torch.float64:
            d["weight_norm"] = float(torch.linalg.vector_norm(w.double()))
    return refix
