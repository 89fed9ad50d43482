"""The probe: hooks on a model's modules and optimiser that record the forward and backward
signal per layer, per step, into a :class:`~signalprop.record.Record`.

Cost model (measured; see benchmarks/probe_overhead.py and the shared performance notes): on a
GPU a small training step is bound by kernel launches and host synchronisation, on a CPU by
per-operation dispatch; memory is bound by what the probe keeps alive while autograd holds the
activations. So:

- Unrecorded steps run with no module hooks at all (PyTorch's fast call path) and no host read.
- On a recorded step each watched module's forward hook copies a fixed strided *sample* of at
  most ``max_forward_samples`` values of its output (one small copy: outputs that autograd would
  free are not kept alive) and, for rectifiers, which units were active anywhere in the batch.
  The gradient hook reduces dL/dh to its norm at once and keeps no tensor.
- At the end of the step every statistic is computed in bulk (samples of all layers stacked:
  one launch per metric family; parameter and gradient norms in one ``torch._foreach_norm``)
  into device tensors; nothing is read on the host there.
- Values reach the host in a *flush*: every ``flush_every`` recorded steps, when the record is
  read, and at :meth:`Probe.detach`. On an accelerator a flush is one non-blocking copy into
  pinned host memory; its values are read once the copy has landed (at the next flush, or when
  the record is accessed), so the training loop never waits for the device. ``flush_every=1``
  (the CPU default) reads each recorded step's values right away, which is also when rare fix-ups
  need the step's tensors (float32 norms below 1e-18 recomputed in float64, exact NaN/Inf counts).
- Update ratios come from the optimiser's own update where it has a closed form (SGD, Adam,
  AdamW; see :mod:`signalprop.probe.update`), else from a copy of the weights taken on recorded
  steps only.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from signalprop import stats
from signalprop.probe.modules import activation_kind, watched_modules
from signalprop.probe.schedule import Schedule, as_schedule
from signalprop.probe.update import UpdateNorms, device_norms, host_tensor
from signalprop.record import MODEL, LayerInfo, Record

_Metrics = list[tuple[str, str]]  # (layer, metric) names matching a flat value vector

#: Accelerator default of ``flush_every``: recorded steps whose statistics wait on the device.
FLUSH_EVERY_ACCELERATOR: int = 16


class _Entry:
    """Values of one recorded step (``kind`` "pre": everything but update ratios; "post": the
    update ratios) waiting to reach the host."""

    __slots__ = ("step", "kind", "parts", "names", "host", "ograd_counted", "grad_counted")

    def __init__(self, step: int, kind: str) -> None:
        self.step, self.kind = step, kind
        self.parts: list[torch.Tensor] = []
        self.names: list[_Metrics] = []  # cached chunks of (layer, metric) labels
        self.host: dict[tuple[str, str], float] = {}  # values already on the host (floats)
        self.ograd_counted = True
        self.grad_counted = True


class Probe:
    """Records per-layer forward/backward statistics of ``model`` on a schedule.

    Usage with an optimiser (steps are finalised by optimiser hooks)::

        probe = Probe(model, optimizer=opt)
        with probe:
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                probe.log(loss=loss)
                opt.step()
        record = probe.record

    Without an optimiser, call :meth:`step` after ``backward()`` (no update ratios then).

    Args:
        model: Any ``nn.Module`` with parameters.
        optimizer: Optional ``torch.optim.Optimizer``; enables update/weight ratios and automatic
            stepping through its step pre/post hooks.
        schedule: Which steps to record: a callable ``step -> bool``, an int ``n`` (every n
            steps) or a list of steps. Default: every step.
        forward: Record output statistics (mean, std, percentiles, saturated/dead fractions).
        backward: Record ||dL/dh|| of every watched module's output.
        weights: Record parameter gradient norms, weight norms and update ratios.
        percentiles: Percentiles of each output (in percent).
        max_percentile_samples: Percentiles are estimated from a strided subsample of at most
            this many of the forward sample's values (``None``: all of them).
        max_forward_samples: Moments, percentiles, saturated fractions and NaN/Inf counts of
            an output are computed on a fixed strided sample of at most this many of its values
            (default :data:`signalprop.stats.MAX_FORWARD_SAMPLES`; ``None``: the whole output,
            kept alive until the end of the step). Dead fractions always use the whole batch.
        saturation_ratio: A unit counts as saturated when |phi'| < ratio * max|phi'|.
        modules: Optional filter ``(name, module) -> bool`` on the watched modules.
        record: An existing record to append to.
        on_record: Callables ``f(step, values)`` invoked after each recorded step with that
            step's ``values[layer][metric]`` (live writers: TensorBoard, Lightning loggers).
            With listeners, every recorded step is flushed to the host when it ends.
        flush_every: Recorded steps whose statistics stay on the device before one transfer
            to the host (``None``: 1 when the model is on the CPU, else
            :data:`FLUSH_EVERY_ACCELERATOR`). Reading :attr:`record` always flushes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        schedule: Schedule | int | Iterable[int] | None = None,
        forward: bool = True,
        backward: bool = True,
        weights: bool = True,
        percentiles: tuple[float, ...] = stats.PERCENTILES,
        max_percentile_samples: int | None = stats.MAX_PERCENTILE_SAMPLES,
        max_forward_samples: int | None = stats.MAX_FORWARD_SAMPLES,
        saturation_ratio: float = stats.SATURATION_DERIVATIVE_RATIO,
        modules: Callable[[str, nn.Module], bool] | None = None,
        record: Record | None = None,
        on_record: Callable[[int, dict[str, dict[str, float]]], None]
        | Iterable[Callable[[int, dict[str, dict[str, float]]], None]]
        | None = None,
        flush_every: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs a torch.nn.Module, got {type(model).__name__}")
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                f"model {type(model).__name__} has no trainable parameters: there are no "
                "gradients to measure"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if flush_every is not None and (isinstance(flush_every, bool) or int(flush_every) < 1):
            raise ValueError(f"flush_every must be an int >= 1 or None, got {flush_every!r}")
        if max_forward_samples is not None and int(max_forward_samples) < 1:
            raise ValueError(f"max_forward_samples must be >= 1 or None, got {max_forward_samples}")
        self.model = model
        self.optimizer = optimizer
        self.schedule = as_schedule(schedule)
        self.forward, self.backward, self.weights = forward, backward, weights
        self.percentiles = tuple(float(q) for q in percentiles)
        self.max_percentile_samples = max_percentile_samples
        self.max_forward_samples = max_forward_samples
        self.saturation_ratio = float(saturation_ratio)
        self._record = record if record is not None else Record()
        dev = self.params[0][1].device
        self._device = dev
        self.flush_every = (
            int(flush_every)
            if flush_every is not None
            else (1 if dev.type == "cpu" else FLUSH_EVERY_ACCELERATOR)
        )
        self.step_index = 0
        if on_record is None:
            self.on_record: list[Callable[[int, dict[str, dict[str, float]]], None]] = []
        elif callable(on_record):
            self.on_record = [on_record]
        else:
            self.on_record = list(on_record)

        mods = watched_modules(model)
        if modules is not None:
            mods = [(n, m) for n, m in mods if modules(n, m)]
        self._mods = mods
        self._kinds = [activation_kind(m) for _, m in mods]
        self._needs_input = [
            k is not None and k in stats.SATURATING and not stats.SATURATING[k][0]
            for k in self._kinds
        ]
        self._rectifier = [k in stats.RECTIFIERS for k in self._kinds]
        self._handles: list[Any] = []
        self._fwd_handles: list[Any] = []
        self._active = False
        n = len(mods)
        # per module, for the current step: forward samples (and of the input where the
        # saturation test needs it), values seen, active units (rectifiers), exact NaN/Inf
        # counts (only in careful mode), and per backward call ||dL/dh|| (+ NaN/Inf count)
        self._samples: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._in_samples: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._numel: list[int] = [0] * n
        self._alive: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._out_bad: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._ograds: list[list[tuple[Any, Any]]] = [[] for _ in range(n)]
        # exact NaN/Inf counts on the hot path cost launches every healthy step would pay; they
        # are switched on ("careful") once a non-finite value has been seen on the host
        self._careful = False
        self._order: list[int] = []  # module indices in first-firing order
        self._fired: set[int] = set()
        self._scalars: dict[str, Any] = {}
        self._snapshot: list[torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] | None = None
        self._pending_weight_norms: torch.Tensor | None = None
        self._pre_done = False
        self._skip_ratios = False
        self._inputs: list[torch.Tensor] = []
        self._layers_declared = False
        self._name_cache: dict[Any, _Metrics] = {}
        self._layouts: dict[tuple[int, ...], tuple[int, torch.Tensor, list[Any]]] = {}
        self._stride_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._queue: list[_Entry] = []  # computed on the device, not yet sent to the host
        self._inflight: list[tuple[torch.Tensor, Any, list[_Entry]]] = []  # being copied
        self._recorded_since_flush = 0
        self._updates: UpdateNorms | None = None
        self._record.meta.setdefault("model", type(model).__name__)
        self._record.meta.setdefault("num_parameters", sum(p.numel() for _, p in self.params))
        self._record.meta.setdefault("schedule", str(self.schedule))
        self._record.meta.setdefault("percentiles", list(self.percentiles))
        self._record.meta.setdefault("saturation_ratio", self.saturation_ratio)

    # ---- the record -----------------------------------------------------------------------------
    @property
    def record(self) -> Record:
        """The record, with every recorded step flushed to it (this waits for the device)."""
        self.flush(wait=True)
        return self._record

    @record.setter
    def record(self, value: Record) -> None:
        self.flush(wait=True)
        self._record = value

    def flush(self, wait: bool = True) -> None:
        """Send the statistics still on the device to the host and store them in the record.

        Args:
            wait: Wait for copies in flight (``False``: store only those already landed; used
                on the training path, where the probe never waits for the device).
        """
        if self._queue:
            entries, self._queue = self._queue, []
            self._recorded_since_flush = 0
            parts = [p.reshape(-1) for e in entries for p in e.parts]
            if parts:
                dev = self._device
                flat = torch.cat(
                    [p if p.device == dev else p.to(dev, non_blocking=True) for p in parts]
                ).to(torch.float64)
            else:
                flat = torch.zeros(0, dtype=torch.float64)
            if flat.device.type == "cuda":
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._inflight.append((host, event, entries))
            elif flat.device.type == "cpu":
                self._inflight.append((flat, None, entries))
            else:  # other accelerators: a plain copy
                self._inflight.append((flat.to("cpu"), None, entries))
        while self._inflight:
            host, event, entries = self._inflight[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._inflight.pop(0)
            self._store(host, entries)

    def _store(self, host: torch.Tensor, entries: list[_Entry]) -> None:
        layouts = [self._layout(e.names) for e in entries]
        total = 0
        perms = []
        for e, layout in zip(entries, layouts, strict=True):
            n = layout[0]
            if sum(p.numel() for p in e.parts) != n:  # a bug, never user error
                raise RuntimeError(
                    f"probe bookkeeping mismatch: {sum(p.numel() for p in e.parts)} values, "
                    f"{n} names"
                )
            perms.append(layout[1] + total if total else layout[1])
            total += n
        perm = perms[0] if len(perms) == 1 else torch.cat(perms) if perms else None
        flat = host[perm].tolist() if perm is not None else []  # the flush's one read
        pos = 0
        for e, layout in zip(entries, layouts, strict=True):
            vals = flat[pos : pos + layout[0]]  # grouped by layer
            pos += layout[0]
            row = self._record.data.setdefault(int(e.step), {})
            for layer, a, b, metrics in layout[2]:
                d = row.get(layer)
                if d is None:
                    row[layer] = dict(zip(metrics, vals[a:b], strict=True))
                else:
                    d.update(zip(metrics, vals[a:b], strict=True))
            for (layer, metric), v in e.host.items():
                row.setdefault(layer, {})[metric] = float(v)
            e.parts = []
            if e.kind == "pre":
                self._check_pre(e, row)
            else:
                for fn in self.on_record:
                    fn(e.step, row)

    def _layout(self, chunks: list[_Metrics]) -> tuple[int, torch.Tensor, list[Any]]:
        """For a step's label chunks: the number of values, the permutation that groups them
        by layer, and per layer (name, start, stop, metric names). Cached: steps repeat."""
        key = tuple(map(id, chunks))
        hit = self._layouts.get(key)
        if hit is not None:
            return hit
        names = [nm for c in chunks for nm in c]
        by_layer: dict[str, list[int]] = {}
        for j, (layer, _) in enumerate(names):
            by_layer.setdefault(layer, []).append(j)
        perm: list[int] = []
        groups = []
        for layer, js in by_layer.items():
            groups.append((layer, len(perm), len(perm) + len(js), [names[j][1] for j in js]))
            perm += js
        hit = (len(names), torch.tensor(perm, dtype=torch.long), groups)
        self._layouts[key] = hit
        return hit

    def _check_pre(self, e: _Entry, row: dict[str, dict[str, float]]) -> None:
        """Host-side fix-ups of a step's values (rare paths; healthy steps only scan)."""
        alive = e.step == self.step_index and self._pre_done  # the step's tensors still exist
        bad = False
        if not e.ograd_counted:
            for d in row.values():
                n = d.get("out_grad_norm")
                if n is not None and not math.isfinite(n):
                    d["out_grad_nonfinite"] = math.nan  # not counted on this step (see README)
                    bad = True
        for d in row.values():
            m = d.get("out_mean")
            if m is not None and not (math.isfinite(m) and math.isfinite(d["out_std"])):
                bad = True
        params = dict(self.params)
        fixed = False
        for name, p in self.params:
            d = row.get(name)
            if d is None:
                continue
            gn = d.get("grad_norm")
            if gn is not None and not (_RECHECK_BELOW <= gn < math.inf) and alive:
                g = p.grad
                if g is not None and g.is_floating_point() and g.dtype != torch.float64:
                    d["grad_norm"] = float(torch.linalg.vector_norm(g.double()))
                    fixed = True
            wn = d.get("weight_norm")
            if wn is not None and not (_RECHECK_BELOW <= wn < math.inf) and alive:
                w = p.detach()
                if w.is_floating_point() and w.dtype != torch.float64:
                    d["weight_norm"] = float(torch.linalg.vector_norm(w.double()))
            gn = d.get("grad_norm")
            if gn is not None and not math.isfinite(gn):
                bad = True
                if not e.grad_counted:
                    g = params[name].grad if alive else None
                    d["grad_nonfinite"] = (
                        float(stats.nonfinite_count(g.unsqueeze(0))[0]) if g is not None else math.nan
                    )
        if fixed and MODEL in row and "grad_norm_total" in row[MODEL]:
            tot = [row[n]["grad_norm"] for n, _ in self.params if "grad_norm" in row.get(n, {})]
            row[MODEL]["grad_norm_total"] = math.sqrt(math.fsum(v * v for v in tot))
        if bad:
            self._careful = True

    # ---- life cycle ----------------------------------------------------------------------------
    def attach(self) -> Probe:
        """Register hooks (idempotent). Returns ``self``."""
        if self._handles:
            return self
        ref = weakref.ref(self)
        self._ref = ref
        # optimiser hooks live as long as the probe is attached; forward hooks only while a
        # recorded step is in progress: a module with any hook leaves PyTorch's fast call path,
        # so unrecorded steps would otherwise pay for hooks that do nothing
        self._handles.append(_Sentinel())
        if self.optimizer is not None:
            self._handles.append(
                self.optimizer.register_step_pre_hook(lambda *a: _call(ref, "_pre_step"))
            )
            self._handles.append(
                self.optimizer.register_step_post_hook(lambda *a: _call(ref, "_post_step"))
            )
            if self.weights and self._updates is None:
                self._updates = UpdateNorms(self.optimizer, [p for _, p in self.params])
        self._set_active(bool(self.schedule(self.step_index)))
        return self

    def _set_active(self, active: bool) -> None:
        if active and not self._fwd_handles and self._handles:
            ref = self._ref
            if self.forward:
                self._fwd_handles.append(
                    self.model.register_forward_pre_hook(partial(_input_hook, ref))
                )
            for i, (_, m) in enumerate(self._mods):
                self._fwd_handles.append(m.register_forward_hook(partial(_fwd_hook, ref, i)))
        elif not active and self._fwd_handles:
            for h in self._fwd_handles:
                h.remove()
            self._fwd_handles.clear()
        self._active = active

    def detach(self) -> None:
        """Remove every hook, drop stashed tensors and flush (a pending step is kept)."""
        self._set_active(False)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear()
        self._pre_done = False
        if self._updates is not None:
            self._updates.release()
        self.flush(wait=True)

    def __enter__(self) -> Probe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def recording(self) -> bool:
        """Whether the current step is being recorded."""
        return self._active

    # ---- user calls -----------------------------------------------------------------------------
    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach whole-model scalars (``loss=...``, ``accuracy=...``) to the current step.

        Tensors are detached and stay on their device until the step's flush.
        """
        if not self._active:
            return
        for k, v in scalars.items():
            self._scalars[k] = v.detach() if isinstance(v, torch.Tensor) else float(v)

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Finalise the current step without an optimiser (call after ``backward()``)."""
        if self.optimizer is not None:
            raise RuntimeError(
                "this probe steps with its optimizer; do not call probe.step() as well"
            )
        if loss is not None:
            self.log(loss=loss)
        self._pre_step()
        self._post_step()

    def gradients_ready(self) -> None:
        """Step boundary for training loops that drive the probe themselves (Lightning, custom
        loops with closures): gradients of the current step are final; compute every statistic
        except update ratios (and prepare those when an optimiser is bound)."""
        self._pre_step()

    def stepped(self, *, update_ratios: bool = True) -> None:
        """Step boundary: the optimiser has (or, with ``update_ratios=False``, has not) changed
        the weights; finish the step's record and advance the step counter."""
        if not update_ratios:
            self._snapshot = None
            self._skip_ratios = True
        self._post_step()

    def pending(self) -> dict[str, dict[str, float]] | None:
        """Values of the current step computed by :meth:`gradients_ready`, already in the
        record (``pending()[layer][metric]``; add to it to record extra values with this step).
        Flushes (waits for the device)."""
        if not (self._active and self._pre_done):
            return None
        self.flush(wait=True)
        return self._record.data.setdefault(self.step_index, {})

    def snapshot_weights(self) -> None:
        """Copy the current weights now (for update ratios when the optimiser is not bound to
        the probe, or the gradients were modified after :meth:`gradients_ready`)."""
        det = [p.detach() for _, p in self.params]
        if self._buffers is None:
            self._buffers = [torch.empty_like(q) for q in det]
        torch._foreach_copy_(self._buffers, det)
        self._snapshot = self._buffers

    # ---- internals ------------------------------------------------------------------------------
    def _clear(self) -> None:
        for i in self._order:
            self._samples[i].clear()
            self._in_samples[i].clear()
            self._numel[i] = 0
            self._alive[i].clear()
            self._out_bad[i].clear()
            self._ograds[i].clear()
        self._inputs = []
        self._scalars = {}
        self._snapshot = None

    def _declare_layers(self) -> None:
        order = self._order + [i for i in range(len(self._mods)) if i not in self._fired]
        depth_of: dict[str, int] = {}
        for d, i in enumerate(order):
            name, m = self._mods[i]
            depth_of[name] = d
            self._record.add_layer(
                LayerInfo(name=name, type=type(m).__name__, depth=d, activation=self._kinds[i])
            )
        for pname, p in self.params:
            owner = pname.rsplit(".", 1)[0] if "." in pname else ""
            owner = owner or type(self.model).__name__
            self._record.add_layer(
                LayerInfo(
                    name=pname,
                    type="Parameter",
                    role="param",
                    depth=depth_of.get(owner, len(order)),
                    module=owner,
                    shape=list(p.shape),
                )
            )
        self._layers_declared = True

    def _pre_step(self) -> None:
        """Gradients are ready: compute everything except update ratios, on the device."""
        if not self._active or self._pre_done:
            return
        if not self._layers_declared and self._fired:
            self._declare_layers()
        e = _Entry(self.step_index, "pre")
        if self.forward:
            self._forward_stats(e)
            self._input_stats(e)
        if self.backward:
            self._backward_values(e)
        if self.weights:
            self._weight_values(e)
        for k, v in self._scalars.items():
            if isinstance(v, torch.Tensor):
                e.parts.append(v.reshape(-1)[:1].to(torch.float64))
                e.names.append(self._names_of(("scalar", k), lambda k=k: [(MODEL, k)]))
            else:
                e.host[(MODEL, k)] = v
        self._pre_done = True
        self._queue.append(e)
        if self.flush_every == 1:
            self.flush(wait=True)

    def _weight_values(self, e: _Entry) -> None:
        with_grad = [(n, p.grad) for n, p in self.params if p.grad is not None]
        tensors = [g for _, g in with_grad] + [p.detach() for _, p in self.params]
        allnorms = device_norms(tensors)
        k = len(with_grad)
        e.parts.append(allnorms)
        gkey = tuple(n for n, _ in with_grad)
        e.names.append(self._names_of(
            ("weights", gkey), lambda: [(n, "grad_norm") for n, _ in with_grad]
            + [(n, "weight_norm") for n, _ in self.params]
        ))
        self._pending_weight_norms = allnorms[k:]
        if k:
            gn = allnorms[:k]
            e.parts.append(gn.square().sum().sqrt().reshape(1))
            e.names.append(self._names_of("total", lambda: [(MODEL, "grad_norm_total")]))
            if self._careful and self.flush_every != 1:
                e.parts.append(
                    torch.stack([(~torch.isfinite(g)).sum() for _, g in with_grad]).double()
                )
            else:
                e.parts.append(torch.zeros(k, dtype=torch.float64, device=allnorms.device))
                e.grad_counted = False
            e.names.append(self._names_of(
                ("grad_nonfinite", gkey), lambda: [(n, "grad_nonfinite") for n, _ in with_grad]
            ))
        if self._updates is not None and self._snapshot is None:
            self._updates.before(self._grad_norms_all(allnorms, k))

    def _grad_norms_all(self, allnorms: torch.Tensor, k: int) -> torch.Tensor | None:
        if self._updates is None or self._updates.method != "sgd":
            return None
        if k == len(self.params):
            return allnorms[:k]
        out = torch.zeros(len(self.params), dtype=torch.float64, device=allnorms.device)
        idx = [i for i, (_, p) in enumerate(self.params) if p.grad is not None]
        if idx:
            out.index_copy_(0, host_tensor(idx, torch.long, out.device), allnorms[:k])
        return out

    def _names_of(self, key: Any, build: Callable[[], _Metrics]) -> _Metrics:
        # the (layer, metric) labels recur every step; building them is measurable
        cached = self._name_cache.get(key)
        if cached is None:
            cached = self._name_cache[key] = build()
        return cached

    def _post_step(self) -> None:
        """The optimiser has stepped: update ratios, then move to the next step."""
        if self._active and self._pre_done:
            e = _Entry(self.step_index, "post")
            den = self._pending_weight_norms
            num: torch.Tensor | None = None
            if self.weights and den is not None and not self._skip_ratios:
                if self._snapshot is not None:
                    torch._foreach_sub_(self._snapshot, [p.detach() for _, p in self.params])
                    num = device_norms(self._snapshot)
                elif self._updates is not None:
                    num = self._updates.after()
            if num is not None and den is not None:
                e.parts.append(num / den.clamp_min(1e-30))
                e.names.append(self._names_of(
                    "update_ratio", lambda: [(n, "update_ratio") for n, _ in self.params]
                ))
            self._queue.append(e)
            self._recorded_since_flush += 1
            if self.on_record:
                self.flush(wait=True)  # listeners see each step complete, as it ends
            elif self.flush_every > 1 and self._recorded_since_flush >= self.flush_every:
                # (with flush_every=1 the step's own flush ran in _pre_step; its update ratios
                # travel with the next one)
                self.flush(wait=False)
            elif self._inflight:
                self.flush(wait=False)  # store transfers that have landed; never wait
        if self._updates is not None:
            self._updates.advance()
            if self._active and not self.schedule(self.step_index + 1):
                self._updates.release()  # no copy held through unrecorded steps
        self._clear()
        self._pre_done = False
        self._skip_ratios = False
        self._pending_weight_norms = None
        self.step_index += 1
        self._set_active(bool(self.schedule(self.step_index)))

    def _forward_stats(self, e: _Entry) -> None:
        groups: dict[tuple, list[int]] = {}
        samples: dict[int, torch.Tensor] = {}
        for i in self._order:
            s = self._samples[i]
            if not s:
                continue
            t = s[0] if len(s) == 1 else torch.cat(s)
            samples[i] = t
            groups.setdefault((t.numel(), t.dtype, t.device), []).append(i)
        for idx in groups.values():
            x = torch.stack([samples[i] for i in idx])  # [G, k]
            x32 = stats.flat_rows(x)
            mean, std = stats.moments(x32)
            pct = stats.percentiles(x32, self.percentiles, self.max_percentile_samples)
            key = tuple(idx)
            e.parts += [mean, std, pct.T.reshape(-1)]
            e.names.append(self._names_of(("fwd", key), lambda key=key: self._group_names(key)))
            # NaN/Inf: exact counts in careful mode, else the sample's count scaled to the output
            if self._careful and all(self._out_bad[i] for i in idx):
                e.parts.append(
                    torch.stack([torch.stack(self._out_bad[i]).sum() for i in idx]).double()
                )
            else:
                scale = host_tensor([self._numel[i] / x.shape[1] for i in idx], torch.float64, x.device)
                e.parts.append(stats.nonfinite_count(x32).double() * scale)
            e.names.append(self._names_of(
                ("nonfinite", key), lambda key=key: [(self._mods[i][0], "out_nonfinite") for i in key]
            ))
            self._activation_stats(idx, x32, e)

    def _group_names(self, idx: tuple[int, ...]) -> _Metrics:
        layer = [self._mods[i][0] for i in idx]
        names = [(n, "out_mean") for n in layer] + [(n, "out_std") for n in layer]
        for q in self.percentiles:
            key = stats.percentile_key(q)
            names += [(n, key) for n in layer]
        return names

    def _input_stats(self, e: _Entry) -> None:
        # the model's own input: badly scaled inputs are a common cause of first-layer saturation
        xs = [x for x in self._inputs if x.is_floating_point()]
        if not xs:
            return
        x = xs[0] if len(xs) == 1 else torch.cat([t.reshape(-1) for t in xs])
        x = stats.flat_rows(x.reshape(1, -1))  # three cheap passes over the whole input
        mean, std = stats.moments(x)
        absmax = x.abs().amax(dim=1)
        e.parts += [mean, std, absmax]
        e.names.append(self._names_of("input", lambda: [
            (MODEL, "input_mean"), (MODEL, "input_std"), (MODEL, "input_absmax")
        ]))

    def _activation_stats(self, idx: list[int], x: torch.Tensor, e: _Entry) -> None:
        by_kind: dict[str, list[int]] = {}
        for j, i in enumerate(idx):
            k = self._kinds[i]
            if k is not None:
                by_kind.setdefault(k, []).append(j)
        for kind, js in by_kind.items():
            layer = [self._mods[idx[j]][0] for j in js]
            if kind in stats.SATURATING:
                if stats.SATURATING[kind][0]:
                    src = x[js] if len(js) < len(idx) else x
                else:
                    ins = []
                    for j in js:
                        s = self._in_samples[idx[j]]
                        ins.append(s[0] if len(s) == 1 else torch.cat(s))
                    src = torch.stack(ins)
                e.parts.append(stats.saturated_fraction(src, kind, self.saturation_ratio).float())
                e.names.append(self._names_of(
                    ("sat", tuple(layer)), lambda layer=layer: [(n, "saturated_frac") for n in layer]
                ))
            if kind in stats.RECTIFIERS:
                dead = []
                for j in js:
                    a = self._alive[idx[j]]
                    act = a[0] if len(a) == 1 else torch.stack(a).any(0)
                    dead.append(1.0 - act.float().mean())
                e.parts.append(torch.stack(dead))
                e.names.append(self._names_of(
                    ("dead", tuple(layer)), lambda layer=layer: [(n, "dead_frac") for n in layer]
                ))

    def _backward_values(self, e: _Entry) -> None:
        norms: list[Any] = []
        bads: list[Any] = []
        layer: list[int] = []
        for i in self._order:
            g = self._ograds[i]
            if not g:
                continue
            layer.append(i)
            if len(g) == 1:
                norms.append(g[0][0])
                bads.append(g[0][1])
            elif isinstance(g[0][0], float):
                # several calls in one step (RNN cells, micro-batches): the norm of all of them
                norms.append(math.hypot(*(n for n, _ in g)))
                bads.append(sum(b for _, b in g))
            else:
                norms.append(torch.linalg.vector_norm(torch.stack([n for n, _ in g])))
                bb = [b for _, b in g]
                bads.append(None if any(b is None for b in bb) else torch.stack(bb).sum())
        if not layer:
            return
        if isinstance(norms[0], float):
            e.parts.append(torch.tensor(norms, dtype=torch.float64))
            e.parts.append(torch.tensor(bads, dtype=torch.float64))
        else:
            v = torch.stack(norms)
            e.parts.append(v)
            if all(b is not None for b in bads):
                e.parts.append(torch.stack(bads).double())
            else:
                e.parts.append(torch.zeros(len(layer), dtype=torch.float64, device=v.device))
                e.ograd_counted = False
        key = tuple(layer)
        e.names.append(self._names_of(
            ("bwd", key),
            lambda: [(self._mods[i][0], "out_grad_norm") for i in key]
            + [(self._mods[i][0], "out_grad_nonfinite") for i in key],
        ))

    def _sample(self, t: torch.Tensor) -> torch.Tensor:
        """A fixed strided sample of at most ``max_forward_samples`` values of ``t`` (a copy:
        the output itself may be freed by autograd or overwritten by an in-place op)."""
        k = self.max_forward_samples
        if k is None:
            return t.reshape(-1)
        n = t.numel()
        key = (n, t.shape[-1] if t.dim() else 1, t.device)
        idx = self._stride_cache.get(key)
        if idx is None:
            row = key[1]
            # stride coprime with the row length, so the sample visits every unit position
            # rather than the same few units of each example
            step = max(1, -(-n // k))
            while step > 1 and math.gcd(step, row) != 1:
                step += 1
            idx = torch.arange(0, n, step, device=t.device)[:k]
            self._stride_cache[key] = idx
        return torch.take(t, idx)  # one gather; row-major order, any layout

    def __repr__(self) -> str:
        return (
            f"Probe({type(self.model).__name__}, modules={len(self._mods)}, "
            f"params={len(self.params)}, schedule={self.schedule}, step={self.step_index})"
        )


def _blas_nrm2() -> dict[torch.dtype, Callable[[np.ndarray], float]]:
    try:
        from scipy.linalg import blas
    except ImportError:  # then the CPU takes the accelerators' path (float64 norm)
        return {}
    return {torch.float32: blas.snrm2, torch.float64: blas.dnrm2}


_NRM2 = _blas_nrm2()

#: float32 norms below this (around the square root of the smallest normal float32) may have
#: lost precision or underflowed while squaring.
_RECHECK_BELOW = 1e-18


class _Sentinel:
    """Marks an attached probe that has no optimiser hooks."""

    def remove(self) -> None:
        pass


def _call(ref: weakref.ref, method: str) -> None:
    p = ref()
    if p is not None:
        getattr(p, method)()


def _input_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    if args and isinstance(args[0], torch.Tensor):
        p._inputs.append(args[0].detach())


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(t)).sum()


def _active_units(h: torch.Tensor) -> torch.Tensor:
    """Which units of a rectifier's output are active for some example: [units] bool.
    A unit is a feature (dim 1; conv maps: a channel, over batch and positions)."""
    if h.dim() <= 1:
        return (h.amax() > 0).reshape(1)
    if h.dim() == 2:
        return h.amax(dim=0) > 0
    return h.amax(dim=(0, *range(2, h.dim()))) > 0


def _fwd_hook(ref: weakref.ref, i: int, module: nn.Module, inp: tuple, out: Any) -> None:
    # Hot path: runs for every watched module on every forward of a recorded step. One small
    # copy (the sample) per module; no host read.
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    if isinstance(out, tuple):  # e.g. RNN cells returning (h, c): watch the first
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return
    if i not in p._fired:
        p._fired.add(i)
        p._order.append(i)
    if p.forward:
        o = out.detach()
        p._samples[i].append(p._sample(o))
        p._numel[i] += o.numel()
        if p._needs_input[i] and inp and isinstance(inp[0], torch.Tensor):
            p._in_samples[i].append(p._sample(inp[0].detach()))
        if p._rectifier[i]:
            p._alive[i].append(_active_units(o))
        if p._careful:
            p._out_bad[i].append(_nonfinite(o))
    if p.backward and out.requires_grad:
        out.register_hook(partial(_grad_hook, p._ograds[i], p._careful))


def _grad_hook(store: list[tuple[Any, Any]], careful: bool, g: torch.Tensor) -> None:
    # Runs inside backward for every watched output: reduce to a norm now, keep no tensor.
    # Float32 squares underflow below ~1e-19 (vanishing gradients are exactly what is measured)
    # and the gradient is gone by the time the values reach the host, so the norm must be
    # robust here. On the CPU: BLAS nrm2 (scaled: no underflow, no temporary, ~4 us for 16k
    # values); its result is a host float, as the CPU is the host there is nothing to wait for,
    # and a non-finite norm is followed by an exact count at once. Elsewhere: a float64 norm on
    # the device (its float64 copy of g is transient) and, in careful mode, a device count;
    # ``None`` marks a count not taken.
    nrm2 = _NRM2.get(g.dtype) if g.device.type == "cpu" else None
    if nrm2 is not None and not g.requires_grad:
        a = (g if g.is_contiguous() else g.contiguous()).numpy().reshape(-1)
        n = float(nrm2(a))
        store.append((n, 0.0 if n < math.inf else float(np.count_nonzero(~np.isfinite(a)))))
        return
    store.append(
        (
            torch.linalg.vector_norm(g, dtype=torch.float64),
            _nonfinite(g) if careful else None,
        )
    )


def probe(model: nn.Module, **kwargs: Any) -> Probe:
    """Create a :class:`Probe` (use as a context manager: ``with probe(model, optimizer=opt) as p``)."""
    return Probe(model, **kwargs)
