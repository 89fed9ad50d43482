"""The probe: hooks on a model's modules and optimiser that record the forward and backward
signal per layer, per step, into a :class:`~signalprop.record.Record`.

Cost model (measured; see benchmarks/probe_overhead.py and the shared performance notes): on a
GPU a small training step is bound by kernel launches and host synchronisation, on a CPU by
per-operation dispatch; memory is bound by what the probe keeps alive while autograd holds the
activations. So:

- Unrecorded steps run with no module hooks (PyTorch's fast call path) and no host read.
- On a recorded step each call site's forward hook copies a fixed strided *sample* of at most
  ``max_forward_samples`` values of the output with one gather (outputs autograd would free are
  not kept alive, and a later in-place op cannot change the sample) and, for rectifiers, which
  units were active anywhere in the batch. The gradient hook reduces dL/dh to its norm at once.
- At the end of the step every statistic is computed in bulk on the device (samples of all
  sites stacked: one launch per metric family; norms through ``torch._foreach_norm``) and
  reaches the host in ONE transfer (the step's only host synchronisation); the update ratios
  of a step travel with the next step's transfer (or when :attr:`Probe.record` is read).
- Update ratios come from the optimiser's own update where it has a closed form (SGD, Adam,
  AdamW; :mod:`signalprop.probe.update`), else from a copy of the weights on recorded steps.
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
from signalprop.probe import recurrent
from signalprop.probe.functional import ProbeMode
from signalprop.probe.modules import activation_kind, watched_modules
from signalprop.probe.schedule import Schedule, as_schedule
from signalprop.probe.update import UpdateNorms, device_norms, host_tensor
from signalprop.record import MODEL, TIME_PREFIX, LayerInfo, Record

_Metrics = list[tuple[str, str]]  # (layer, metric) names matching a flat value vector

#: Default ``flush_every`` on an accelerator: recorded steps whose values wait on the device.
FLUSH_EVERY_ACCELERATOR: int = 16


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
        max_forward_samples: Moments, percentiles, saturated fractions and NaN/Inf counts of an
            output are computed on a fixed strided sample of at most this many of its values,
            copied in the forward hook (default :data:`signalprop.stats.MAX_FORWARD_SAMPLES`;
            ``None``: the whole output, kept alive until the end of the step). Dead fractions
            always use the whole batch.
        saturation_ratio: A unit counts as saturated when |phi'| < ratio * max|phi'|.
        modules: Optional filter ``(name, module) -> bool`` on the watched modules.
        record: An existing record to append to.
        on_record: Callables ``f(step, values)`` invoked after each recorded step with that
            step's ``values[layer][metric]`` (live writers: TensorBoard, Lightning loggers).
        flush_every: Recorded steps whose values stay on the device before one non-blocking
            copy to pinned host memory, stored in the record once it has landed (never
            waiting for the device) or when :attr:`record` is read (``None``: 1 on the CPU,
            :data:`FLUSH_EVERY_ACCELERATOR` on an accelerator). 1: each recorded step's values
            reach the host at once, in one transfer (its one synchronisation). Deferred only
            when the probe steps with its own optimiser and has no ``on_record`` listeners;
            NaN/Inf counts of a step are then taken on the device once a non-finite value has
            been seen (until then a non-finite norm records its count as NaN: not counted).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
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
        scaler: Any = None,
        flush_every: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs a torch.nn.Module, got {type(model).__name__}")
        # compiled modules (torch.compile's wrapper, or module.compile() in place) run their
        # recorded steps eagerly: hooks added after compilation never run inside the graph
        self._compiled = _compiled_modules(model)
        model = unwrap(model)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                f"model {type(model).__name__} has no trainable parameters: there are no "
                "gradients to measure"
            )
        self.model = model
        self.optimizers = _as_optimizers(optimizer)
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        self.scaler = scaler
        self.schedule = as_schedule(schedule)
        self.forward, self.backward, self.weights = forward, backward, weights
        self.percentiles = tuple(float(q) for q in percentiles)
        self.max_percentile_samples = max_percentile_samples
        self.max_forward_samples = max_forward_samples
        self._buffers: list[torch.Tensor] | None = None
        self.saturation_ratio = float(saturation_ratio)
        self._record = record if record is not None else Record()
        if flush_every is not None and (isinstance(flush_every, bool) or int(flush_every) < 1):
            raise ValueError(f"flush_every must be an int >= 1 or None, got {flush_every!r}")
        self._ratios: tuple[int, list[str], torch.Tensor] | None = None
        self._since_transfer = 0
        self._queue: list[tuple[int, str, _Metrics, torch.Tensor, bool]] = []
        self._inflight: list[tuple[torch.Tensor, Any, list[Any]]] = []
        dev = self.params[0][1].device if self.params else torch.device("cpu")
        self.flush_every = int(flush_every) if flush_every is not None else (
            1 if dev.type == "cpu" else FLUSH_EVERY_ACCELERATOR)
        self.step_index = 0
        if on_record is None:
            self.on_record: list[Callable[[int, dict[str, dict[str, float]]], None]] = []
        elif callable(on_record):
            self.on_record = [on_record]
        else:
            self.on_record = list(on_record)
        # distributed hook (signalprop.integrations.distributed): reduce(names, flat) ->
        # (names, flat) combines one step's values across ranks (the union of every rank's
        # names); update_norms(num, den) the per-parameter
        # norms behind update ratios. None: single process.
        self.reducer: Any = None

        mods = watched_modules(model)
        if modules is not None:
            mods = [(n, m) for n, m in mods if modules(n, m)]
        self._mods = mods
        self._root_watched = any(m is model for _, m in mods)
        self._kinds = [activation_kind(m) for _, m in mods]
        # recurrent cells are called once per time step: their calls are the time steps of one
        # layer; any other module called several times in one forward pass has one call site
        # (one layer of the signal path) per call
        self._loop = [isinstance(m, _CELLS) for _, m in mods]
        self._recurrent = [recurrent.kind_of(m) is not None for _, m in mods]
        self._handles: list[Any] = []
        self._fwd_handles: list[Any] = []
        self._active = False
        # the layer map: call sites in first-firing order, kept across steps
        self._sites: list[_Site] = []
        self._site_of: dict[tuple[int, int], int] = {}
        self._calls: dict[int, int] = {}  # module index -> its calls in this forward pass
        self._nforward = 0  # forward passes of the whole model in this step (micro-batches)
        self._used: list[int] = []  # sites holding data of this step
        self._declared = 0  # sites already declared in the record
        self._params_declared = False
        self._scalars: dict[str, Any] = {}
        self._scalar_counts: dict[str, int] = {}
        self._snapshot: list[torch.Tensor] | None = None
        self._pending_weight_norms = torch.zeros(0)
        self._pending: dict[str, dict[str, float]] | None = None
        self._inputs: list[torch.Tensor] = []
        self._name_cache: dict[tuple[int, ...], _Metrics] = {}
        self._preclip: tuple[list[str], torch.Tensor, list[int]] | None = None
        self._witness: torch.Tensor | None = None  # a parameter that had a gradient
        self._cb_queued = False
        self._grads_seen = False
        self._new_pass = False
        self._stepped_opts: set[int] = set()
        self._stash: dict[int, int] = {}  # data_ptr of a stashed output -> its site
        self._rnn_tmp: dict[int, tuple[list[list[torch.Tensor]], dict[str, Any]]] = {}
        self._stride_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        # update ratios of the last recorded step, on the device until the next transfer
        self._ratios: tuple[int, list[str], torch.Tensor] | None = None
        self._updates: UpdateNorms | None = None
        self._no_ratio = False
        self._param_names = [n for n, _ in self.params]
        self._param_of = dict(self.params)
        self._ratio_names = [(n, "update_ratio") for n, _ in self.params]
        self._uncounted = False
        # what module hooks cannot see (functional activations, residual adds, norm placement,
        # parameters used outside a module call) is read by a torch-function mode around the
        # forward: on the first recorded step (the mapping step), then only if needed
        self._names = {id(m): n for n, m in model.named_modules()}
        self._watched = {id(m): i for i, (_, m) in enumerate(mods)}
        self._path: list[str] = []  # sites and free parameters in first-use order
        self._mapping = True
        self._use_mode = forward or backward
        self._mode: ProbeMode | None = None
        self._mode_depth = 0
        self._stack: list[tuple[str, nn.Module, Any]] = []
        self._fn_found = False
        self._inplace_seen = False
        watched_names = {n for n, _ in mods}
        self._free_params = {
            id(prm): n for n, prm in self.params
            if (n.rsplit(".", 1)[0] if "." in n else "") not in watched_names
        }
        self._param_slot: dict[str, tuple[int, str]] = {}  # free param -> (path slot, where)
        self._producer: dict[int, tuple[str, torch.Tensor]] = {}
        self._blocks: dict[str, dict[str, Any]] = {}  # residual block -> facts
        self._block_grads: dict[str, list[tuple[Any, Any]]] = {}
        self._conv_context = False
        self._entry: dict[str, int] = {}  # module -> path position when first entered
        self._infer: dict[int, tuple[str, torch.Tensor]] = {}  # module -> (kind, its output)
        from signalprop.diagnosis.architecture import architecture_facts

        # what the module types say (the measured facts below override these)
        for k, v in architecture_facts(model).items():
            if v is not None:
                self._record.meta.setdefault(k, v)
        self._record.meta.setdefault("model", type(model).__name__)
        self._record.meta.setdefault("num_parameters", sum(p.numel() for _, p in self.params))
        self._record.meta.setdefault("schedule", str(self.schedule))
        self._record.meta.setdefault("percentiles", list(self.percentiles))
        self._record.meta.setdefault("saturation_ratio", self.saturation_ratio)

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
        vec = torch.cat([e[3] for e in entries])
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
        for step, kind, names, vec, uncounted in entries:
            vals = flat[pos : pos + vec.numel()]
            pos += vec.numel()
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
                _COUNT_NONFINITE[0] = True
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
                    _COUNT_NONFINITE[0] = True
                    d["grad_nonfinite"] = math.nan

    def _flush_ratios(self) -> None:
        if self._ratios is not None:
            step, names, t = self._ratios
            self._ratios = None
            self._store_ratios(step, names, t.tolist())

    def _store_ratios(self, step: int, names: list[str], vals: list[float]) -> None:
        row = self._record.data.setdefault(int(step), {})
        for n, r in zip(names, vals, strict=True):
            row.setdefault(n, {})["update_ratio"] = r

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The (first) bound optimiser, or ``None``."""
        return self.optimizers[0] if self.optimizers else None

    @optimizer.setter
    def optimizer(self, value: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None) -> None:
        if self._handles:
            raise RuntimeError("bind the optimizer before attaching the probe")
        self.optimizers = _as_optimizers(value)

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
        for k, opt in enumerate(self.optimizers):
            self._handles.append(
                opt.register_step_pre_hook(lambda *a, k=k: _call(ref, "_opt_pre", k))
            )
            self._handles.append(
                opt.register_step_post_hook(lambda *a, k=k: _call(ref, "_opt_post", k))
            )
        if self.scaler is not None:
            self._handles.append(_ScalerHook(self.scaler, ref))
        if self.weights and len(self.optimizers) == 1 and self._updates is None:
            # ||dW|| from the optimiser's own state where it has a closed form (no weight copy)
            self._updates = UpdateNorms(self.optimizers[0], [p for _, p in self.params])
        self._stepped_opts: set[int] = set()
        self._set_active(bool(self.schedule(self.step_index)))
        return self

    def _set_active(self, active: bool) -> None:
        if active and not self._fwd_handles and self._handles:
            ref = self._ref
            for cm in self._compiled:
                self._fwd_handles.append(_EagerPatch(cm))
            self._fwd_handles.append(
                self.model.register_forward_pre_hook(partial(_root_pre_hook, ref))
            )
            if self._use_mode:
                self._fwd_handles.append(self.model.register_forward_hook(
                    partial(_root_post_hook, ref), always_call=True))
                for m in self.model.modules():
                    if m is not self.model:
                        self._fwd_handles.append(
                            m.register_forward_pre_hook(partial(_push_hook, ref)))
                        self._fwd_handles.append(m.register_forward_hook(
                            partial(_pop_hook, ref), always_call=True))
            if self.backward:
                for name in self._blocks:
                    mod = self.model.get_submodule(name)
                    self._fwd_handles.append(
                        mod.register_forward_pre_hook(partial(_block_pre_hook, ref, name)))
            for i, (_, m) in enumerate(self._mods):
                self._fwd_handles.append(m.register_forward_hook(partial(_fwd_hook, ref, i)))
            for i, (_, m) in enumerate(self._mods):
                if recurrent.kind_of(m) is not None and recurrent.unsupported(m) is None:
                    # step-by-step forward on recorded steps: dL/dh_t and the gates
                    fn = recurrent.unrolled_rnn if isinstance(m, nn.RNNBase) else \
                        recurrent.unrolled_cell
                    self._fwd_handles.append(
                        _ForwardPatch(m, partial(fn, m, partial(_rnn_stash, ref, i)))
                    )
            if self.forward and self.max_forward_samples is None:
                # (sampled outputs are copies taken as the module returns: nothing to guard)
                for m in self.model.modules():
                    if getattr(m, "inplace", False) is True:
                        # an in-place activation overwrites the output of the layer before
                        # it: keep that layer's recorded output intact
                        self._fwd_handles.append(
                            m.register_forward_pre_hook(partial(_inplace_pre_hook, ref))
                        )
            if self.weights and not self.backward:
                # the end of every backward pass: parameter gradients before any clipping
                # (with output hooks, the first of them queues it: no hook per parameter)
                for _, prm in self.params:
                    self._fwd_handles.append(
                        prm.register_post_accumulate_grad_hook(partial(_param_hook, ref))
                    )
        elif not active and self._fwd_handles:
            for h in self._fwd_handles:
                h.remove()
            self._fwd_handles.clear()
        self._active = active

    def detach(self) -> None:
        """Remove every hook and drop stashed tensors (a pending step is finalised first)."""
        if self._pending is not None:
            self._commit()
        self._set_active(False)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear()
        if self._updates is not None:
            self._updates.release()
        self.flush()

    def __enter__(self) -> Probe:
        # nested ``with probe:`` blocks: only the outermost exit detaches (an inner exit used to
        # remove every hook, and the outer block silently recorded nothing more)
        self._depth = getattr(self, "_depth", 0) + 1
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self._depth = max(0, getattr(self, "_depth", 1) - 1)
        if self._depth == 0:
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

        Tensors are detached and read at the end of the step together with everything else.
        A scalar logged several times in one step (micro-batches of gradient accumulation) is
        recorded as the mean of its values.
        """
        if not self._active:
            return
        for k, v in scalars.items():
            v = v.detach().reshape(-1)[:1].float() if isinstance(v, torch.Tensor) else float(v)
            if k in self._scalars:
                self._scalars[k] = self._scalars[k] + v
                self._scalar_counts[k] += 1
            else:
                self._scalars[k] = v
                self._scalar_counts[k] = 1

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Finalise the current step without an optimiser (call after ``backward()``)."""
        if self.optimizers:
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
        except update ratios, and snapshot the weights when an optimiser is bound."""
        self._pre_step()

    def stepped(self, *, update_ratios: bool = True) -> None:
        """Step boundary: the optimiser has (or, with ``update_ratios=False``, has not) changed
        the weights; finish the step's record and advance the step counter."""
        if not update_ratios:
            self._snapshot = None
            self._no_ratio = True
        self._post_step()

    def pending(self) -> dict[str, dict[str, float]] | None:
        """Values of the current step computed by :meth:`gradients_ready`, not yet committed
        (``pending()[layer][metric]``; add to it to record extra values with this step)."""
        return self._pending

    def snapshot_weights(self) -> None:
        """Copy the current weights now (for update ratios when the optimiser is not bound to
        the probe, or the gradients were modified after :meth:`gradients_ready`)."""
        det = [p.detach() for _, p in self.params]
        self._buffers = [torch.empty_like(q) for q in det] if self._buffers is None else self._buffers
        torch._foreach_copy_(self._buffers, det)
        self._snapshot = self._buffers

    def save_before_inplace(self, x: torch.Tensor) -> None:
        """``x`` is about to be modified in place: if it is a recorded output of this step,
        record a copy instead (one copy, only on recorded steps)."""
        j = self._stash.get(x.data_ptr())
        if j is None:
            return
        self._inplace_seen = True
        s = self._sites[j]
        for k, o in enumerate(s.outs):
            if o.data_ptr() == x.data_ptr() and o._version == s.versions[k]:
                s.outs[k] = o.clone()
        del self._stash[x.data_ptr()]

    def _sample(self, t: torch.Tensor) -> torch.Tensor:
        """A fixed strided sample of at most ``max_forward_samples`` values of ``t``, copied
        with one gather (row-major order, any layout)."""
        k = self.max_forward_samples
        assert k is not None
        n = t.numel()
        key = (n, t.shape[-1] if t.dim() else 1, t.device)
        idx = self._stride_cache.get(key)
        if idx is None:
            row = key[1]
            # a stride coprime with the row length, so the sample visits every unit position
            # rather than the same few units of each example
            step = max(1, -(-n // k))
            while step > 1 and math.gcd(step, row) != 1:
                step += 1
            idx = torch.arange(0, n, step, device=t.device)[:k]
            self._stride_cache[key] = idx
        return torch.take(t, idx)

    @property
    def layer_map(self) -> list[str]:
        """Names of the recorded call sites in forward execution order (the signal path)."""
        return [s.name for s in self._sites]

    # ---- optimiser / scaler boundaries -----------------------------------------------------------
    def _opt_pre(self, k: int) -> None:
        if k in self._stepped_opts:
            # this optimiser steps a second time before the others: a new probe step
            self._post_step()
        if self._pending is None:
            self._pre_step()

    def _opt_post(self, k: int) -> None:
        if self._updates is not None:
            self._updates.advance()  # every step, recorded or not: Adam's step count
        self._stepped_opts.add(k)
        if len(self._stepped_opts) >= len(self.optimizers):
            self._post_step()

    def _scaler_update(self) -> None:
        """GradScaler.update(): a step whose optimisers did not run was skipped (inf/NaN)."""
        if not self.optimizers:
            # no optimiser bound: the loop closes steps itself (gradients_ready / stepped, as
            # the Lightning callback does); the scaler only supplies the loss scale
            return
        if self._stepped_opts:
            self._post_step()  # some optimisers stepped, others are not bound to the scaler
            return
        if not (self._used or self._pending is not None or self._grads_seen):
            return  # nothing of this step was seen (update() called twice)
        self._skip_step()

    def _skip_step(self) -> None:
        """Close the current step as skipped: recorded, marked, no update ratios."""
        if self._active:
            if self._pending is None:
                self._pre_step()
            if self._pending is not None:
                self._pending.setdefault(MODEL, {})["skipped_step"] = 1.0
        self._snapshot = None
        self._no_ratio = True
        self._post_step()

    # ---- internals ------------------------------------------------------------------------------
    def _clear(self) -> None:
        for j in self._used:
            self._sites[j].clear()
        self._used = []
        self._calls.clear()
        self._nforward = 0
        self._inputs = []
        self._scalars = {}
        self._scalar_counts = {}
        self._snapshot = None
        self._preclip = None
        self._witness = None
        self._cb_queued = False
        self._grads_seen = False
        self._new_pass = False
        self._stepped_opts = set()
        self._stash = {}
        self._rnn_tmp = {}
        self._no_ratio = False
        self._producer = {}
        self._stack = []
        for v in self._block_grads.values():
            v.clear()

    def _new_site(self, i: int, k: int) -> int:
        name, m = self._mods[i]
        site = _Site(
            name=name if k == 0 else f"{name}#{k + 1}",
            module=name,
            type=type(m).__name__,
            kind=self._kinds[i],
            call=k,
            loop=self._loop[i],
        )
        return self._add_site(site, (i, k))

    def _add_site(self, site: _Site, key: Any) -> int:
        site.depth = len(self._path)
        site.conv = self._conv_context
        self._path.append(site.name)
        self._sites.append(site)
        j = len(self._sites) - 1
        self._site_of[key] = j
        return j

    # ---- the torch-function mode's callbacks ------------------------------------------------------
    def _functional_activation(self, kind: str, fname: str, args: tuple, out: torch.Tensor) -> None:
        """An activation called as a function (F.relu, torch.sigmoid, x.tanh() ...)."""
        if not torch.is_grad_enabled():
            return
        enclosing, mod = (self._stack[-1][0], self._stack[-1][1]) if self._stack else ("", None)
        if mod is not None:
            i = self._watched.get(id(mod))
            if isinstance(mod, nn.RNNBase | nn.RNNCellBase):
                return  # the gates and states of a recurrent layer (measured as such)
            if i is not None and self._kinds[i] is not None:
                return  # inside an activation module (nn.ReLU calls F.relu): its hook records it
            if i is not None and next(mod.parameters(recurse=False), None) is None and \
                    next(mod.children(), None) is None:
                # a parameter-free leaf module calling an activation function: it IS that
                # activation if it returns the function's output (checked in its forward
                # hook); otherwise the function is an intermediate step of its own activation
                self._infer[i] = (kind, out)
                return
        self._fn_found = True
        where = enclosing or type(self.model).__name__
        base = f"{where}/{fname}"
        key = ("fn", base)
        if self._new_pass:
            self._new_pass = False
            self._calls.clear()
        k = self._calls.get(key, 0)  # type: ignore[call-overload]
        self._calls[key] = k + 1  # type: ignore[index]
        k = min(k, MAX_SITES - 1)
        j = self._site_of.get((key, k))  # type: ignore[arg-type]
        if j is None:
            site = _Site(name=base if k == 0 else f"{base}#{k + 1}", module=base,
                         type=f"functional {fname}", kind=kind, call=k, loop=False)
            j = self._add_site(site, (key, k))
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        _record_output(self, j, self._sites[j], out, inp, -1)

    def _seen_add(self, args: tuple, out: Any) -> None:
        ops = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        for name, mod, x in reversed(self._stack):
            if x is not None and next(mod.children(), None) is not None and any(
                    a is x for a in ops):
                if name not in self._blocks:
                    self._blocks[name] = {"type": type(mod).__name__,
                                          "depth": self._entry.get(name, 0),
                                          "norm_placement": None}
                    if self.backward and x.requires_grad:  # the mapping step's own stream
                        x.register_hook(partial(
                            _grad_hook, self._block_grads.setdefault(name, []), None))
                break
        if isinstance(out, torch.Tensor):
            self._producer[id(out)] = ("add", out)

    def _seen_norm(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._producer[id(out)] = ("norm", out)

    def _seen_params(self, args: tuple, kwargs: dict) -> None:
        for a in (*args, *kwargs.values()):
            n = self._free_params.get(id(a)) if isinstance(a, torch.Tensor) else None
            if n is not None and n not in self._param_slot:
                where = self._stack[-1][0] if self._stack else ""
                self._param_slot[n] = (len(self._path), where)
                self._path.append(n)

    def _block_done(self, name: str, out: Any) -> None:
        """A residual block's forward returned: its output says where it normalises."""
        b = self._blocks.get(name)
        if b is None or b.get("seen"):
            return
        b["seen"] = True
        if isinstance(out, tuple | list) and out:
            out = out[0]
        prod = self._producer.get(id(out)) if isinstance(out, torch.Tensor) else None
        if prod is not None and prod[1] is out:
            # norm(x + f(x)): post-LN; x + f(norm(x)) with norms inside: pre-LN
            b["norm_placement"] = "post" if prod[0] == "norm" else (
                "pre" if b.get("has_norm") else None)

    def _declare_layers(self) -> None:
        """Declare the sites first seen since the last declaration (forward order), then, once,
        every parameter, placed at the first site of the module that owns it."""
        for j in range(self._declared, len(self._sites)):
            s = self._sites[j]
            shape = list(s.shape) if s.shape is not None else None
            self._record.add_layer(
                LayerInfo(
                    name=s.name,
                    type=s.type,
                    depth=s.depth,
                    activation=s.kind,
                    module=s.module,
                    shape=shape,
                    site=s.call,
                    time_steps=len(s.tgrads) or None,
                    unchecked=s.unchecked,
                )
            )
        self._declared = len(self._sites)
        if self._params_declared or not self._sites:
            return
        first_site: dict[str, int] = {}
        for s in self._sites:
            first_site.setdefault(s.module, s.depth)
        root = type(self.model).__name__
        for pname, p in self.params:
            owner = pname.rsplit(".", 1)[0] if "." in pname else ""
            info = LayerInfo(name=pname, type="Parameter", role="param", module=owner or None,
                             shape=list(p.shape))
            if owner in first_site:
                info.depth = first_site[owner]
            elif pname in self._param_slot and (not owner or owner not in self._names.values()
                                                 or self._param_slot[pname][1] == ""):
                # a parameter used directly in a forward (a positional embedding): it acts at
                # the point of the path where it was first used
                slot, where = self._param_slot[pname]
                info.depth = slot
                info.module = pname
                info.placement = (f"used directly in the forward of {where or 'the model'!r}"
                                  ", placed where it is first used")
            else:
                # the owning module is never called (e.g. MultiheadAttention's out_proj, used
                # functionally inside its parent): place the parameter where it acts, at the
                # nearest enclosing module that is called
                anc = owner
                while anc and anc not in first_site:
                    anc = anc.rsplit(".", 1)[0] if "." in anc else ""
                if anc:
                    info.depth = first_site[anc]
                    info.module = anc
                    info.placement = (
                        f"acts inside {anc!r}" + (f" (module {owner!r} is never called)"
                                                   if owner else "")
                    )
                else:
                    # used outside any recorded module call (a root-level nn.Parameter such as
                    # a positional embedding): kept off the signal path rather than guessed
                    info.depth = len(self._path)
                    info.on_path = False
                    info.module = owner or root
                    info.placement = (
                        "used outside any module call: not placed on the signal path"
                    )
            self._record.add_layer(info)
        self._params_declared = True
        self._declare_blocks()

    def _declare_blocks(self) -> None:
        """Residual blocks found on the mapping step, and what the record's meta says of them."""
        if not self._blocks:
            return
        for name, b in self._blocks.items():
            self._record.add_layer(LayerInfo(
                name=name, type=b["type"], role="block", depth=b["depth"] or 0,
                module=name, residual=True, norm_placement=b["norm_placement"]))
        # measured: a block added its own input to its output
        self._record.meta["residual"] = True
        self._record.meta["residual_blocks"] = list(self._blocks)
        places = {b["norm_placement"] for b in self._blocks.values() if b["norm_placement"]}
        if places:
            self._record.meta["norm_placement"] = places.pop() if len(places) == 1 else "mixed"

    def _pre_step(self) -> None:
        """Gradients are ready: compute everything except update ratios."""
        if not self._active:
            return
        if self._sites:
            self._declare_layers()
        values: list[torch.Tensor] = []
        names: _Metrics = []
        scale = self._loss_scale()
        if self.forward:
            self._forward_stats(values, names)
            self._input_stats(values, names)
            self._gate_stats(values, names)
        # every norm of this step in ONE fused call (output grads, parameter grads, weights)
        tensors: list[torch.Tensor] = []
        tnames: _Metrics = []
        if self.backward:
            self._backward_values(values, names, scale)
        params = [p for _, p in self.params]
        n_grads = 0
        pre = self._preclip
        if self.weights:
            if pre is None:
                with_grad = [(n, p.grad) for n, p in self.params if p.grad is not None]
                tensors += [g for _, g in with_grad]
                tnames += [(n, "grad_norm") for n, _ in with_grad]
                n_grads = len(with_grad)
            tensors += [p.detach() for p in params]
            tnames += [(n, "weight_norm") for n, _ in self.params]
        if tensors:
            allnorms = device_norms(tensors)  # no host read (CPU underflow: re-checked below)
            if n_grads and scale != 1.0:
                allnorms = torch.cat([allnorms[:n_grads] / scale, allnorms[n_grads:]])
            values.append(allnorms)
            names += tnames
            if self.weights:
                k = len(tensors) - len(params)
                self._pending_weight_norms = allnorms[k:]
                if n_grads:
                    gn = allnorms[k - n_grads : k]
                    values.append(gn.square().sum().sqrt().reshape(1))
                    names.append((MODEL, "grad_norm_total"))
        if pre is not None:
            # norms taken at the end of backward, before any clipping by the user's loop
            pnames, pnorms, versions = pre
            pnorms = pnorms / scale if scale != 1.0 else pnorms
            values += [pnorms, pnorms.square().sum().sqrt().reshape(1)]
            names += [(n, "grad_norm") for n in pnames] + [(MODEL, "grad_norm_total")]
            grads = [p.grad for _, p in self.params if p.grad is not None]
            if len(grads) == len(versions) and any(
                g._version != v for g, v in zip(grads, versions, strict=True)
            ):
                # gradients changed in place since backward (clip_grad_norm_, unscale_): the
                # global norm the optimiser will actually use
                after = device_norms(grads).square().sum().sqrt()
                if not self._unscaled_by_scaler():
                    after = after / scale
                values.append(after.reshape(1))
                names.append((MODEL, "grad_norm_total_clipped"))
        if self.weights and self._updates is not None:
            # update norms from the optimiser's state after the step (SGD: known now)
            self._updates.before(self._current_grad_norms(pre, allnorms if tensors else None,
                                                          n_grads, scale))
        elif self.weights:
            if self.optimizers:
                # one fused copy of all parameters into persistent buffers, for
                # ||W_after - W_before|| after the step
                det = [p.detach() for p in params]
                if self._buffers is None or any(
                    b.shape != q.shape or b.dtype != q.dtype or b.device != q.device
                    for b, q in zip(self._buffers, det, strict=True)
                ):
                    self._buffers = [torch.empty_like(q) for q in det]
                torch._foreach_copy_(self._buffers, det)
                self._snapshot = self._buffers
        for k, v in self._scalars.items():
            n = self._scalar_counts.get(k, 1)
            t = v if isinstance(v, torch.Tensor) else torch.tensor([v], dtype=torch.float32)
            values.append(t / n if n > 1 else t)  # stays on its device until the transfer
            names.append((MODEL, k))
        if self.scaler is not None:
            values.append(torch.tensor([scale], dtype=torch.float64))
            names.append((MODEL, "loss_scale"))
        if self.optimizers:
            # the rate this step uses (learning-rate schedulers change it between steps)
            lr = self.optimizers[0].param_groups[0].get("lr")
            if isinstance(lr, int | float) or (isinstance(lr, torch.Tensor) and lr.numel() == 1):
                # (a tensor rate stays where it is: it travels with the step's one transfer)
                values.append(torch.as_tensor(lr, dtype=torch.float64).reshape(1))
                names.append((MODEL, "lr"))
        if self._deferring:
            # values stay on the device; host-side additions (skipped_step) go to _pending
            if self.weights and _COUNT_NONFINITE[0]:
                with_grad = [(n, p.grad) for n, p in self.params if p.grad is not None]
                if with_grad:
                    values.append(torch.stack([(~torch.isfinite(g)).sum() for _, g in with_grad]))
                    names += [(n, "grad_nonfinite") for n, _ in with_grad]
            self._enqueue("pre", values, names, self._uncounted)
            self._uncounted = False
            self._pending = {}
            self._note_unchecked()
            return
        self._pending = self._to_dict(values, names)
        self._note_unchecked()
        self._drop_unchanged_clip()
        self._fix_nonfinite_counts(scale)

    def _current_grad_norms(
        self, pre: Any, allnorms: torch.Tensor | None, n_grads: int, scale: float
    ) -> torch.Tensor | None:
        """||g|| of every parameter as the optimiser will see it (0 without a gradient); only
        the closed form of plain SGD needs it."""
        if self._updates is None or self._updates.method != "sgd":
            return None
        have = [i for i, (_, p) in enumerate(self.params) if p.grad is not None]
        if not have:
            return None
        grads = [self.params[i][1].grad for i in have]
        reuse = None
        if pre is not None:
            pnames, pnorms, versions = pre
            if scale == 1.0 and len(versions) == len(grads) and all(
                g._version == v for g, v in zip(grads, versions, strict=True)
            ):
                reuse = pnorms
        elif allnorms is not None and n_grads == len(grads) and scale == 1.0:
            reuse = allnorms[:n_grads]
        norms = reuse if reuse is not None else device_norms(grads)
        if len(have) == len(self.params):
            return norms
        out = torch.zeros(len(self.params), dtype=torch.float64, device=norms.device)
        return out.index_copy_(0, host_tensor(have, torch.long, norms.device), norms)

    def _enqueue(self, kind: str, values: list[torch.Tensor], names: _Metrics,
                 uncounted: bool) -> None:
        parts = [v.detach().reshape(-1) for v in values]
        if not parts:
            return
        devs = [p.device for p in parts if p.device.type != "cpu"]
        dev = devs[0] if devs else torch.device("cpu")
        vec = torch.cat(
            [p if p.device == dev else p.to(dev, non_blocking=True) for p in parts]
        ).to(torch.float64)
        if vec.numel() != len(names):  # a bug, never user error
            raise RuntimeError(f"probe bookkeeping mismatch: {vec.numel()} values, {len(names)} names")
        self._queue.append((self.step_index, kind, names, vec, uncounted))

    def _gate_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        # recurrent gates (sigmoid): saturated fraction and mean over batch, units, time steps
        for j in self._used:
            s = self._sites[j]
            for g, vals in s.gates.items():
                v = torch.cat([t.reshape(-1) for t in vals]).unsqueeze(0)
                values.append(stats.saturated_fraction(v, "sigmoid", self.saturation_ratio))
                values.append(v.float().mean(dim=1))
                names += [(s.name, f"gate_{g}_saturated_frac"), (s.name, f"gate_{g}_mean")]

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

    def _loss_scale(self) -> float:
        if self.scaler is None:
            return 1.0
        try:
            s = float(self.scaler.get_scale())
        except Exception:  # a disabled scaler
            return 1.0
        return s if s > 0 and math.isfinite(s) else 1.0

    def _unscaled_by_scaler(self) -> bool:
        """Whether the scaler has already divided the gradients by the loss scale."""
        sc = self.scaler
        if sc is None or not self.optimizers:
            return False
        states = getattr(sc, "_per_optimizer_states", {})
        st = states.get(id(self.optimizers[0]), {}).get("stage")
        return st is not None and getattr(st, "name", "") in ("UNSCALED", "STEPPED")

    def _on_backward_end(self) -> None:
        """Runs once at the end of each backward pass of a recorded step: parameter gradient
        norms before the user's loop clips or unscales them (the last micro-batch's backward
        leaves the accumulated gradient)."""
        self._cb_queued = False
        if not self._active or not self.weights:
            return
        with_grad = [(n, p.grad) for n, p in self.params if p.grad is not None]
        if not with_grad:
            return
        grads = [g for _, g in with_grad]
        self._witness = self._param_of[with_grad[0][0]]
        self._preclip = ([n for n, _ in with_grad], device_norms(grads), [g._version for g in grads])

    def _post_step(self) -> None:
        """The optimiser has stepped: update ratios, then move to the next step."""
        if self._active and self._pending is not None:
            num: torch.Tensor | None = None
            den = self._pending_weight_norms
            if self.weights and not self._no_ratio:
                if self._snapshot is not None:
                    params = [p.detach() for _, p in self.params]
                    torch._foreach_sub_(self._snapshot, params)  # buffer := W_before - W_after
                    num = device_norms(self._snapshot)
                elif self._updates is not None and self._updates.ready:
                    num = self._updates.after()
            if num is not None:
                if self.reducer is not None:
                    num, den = self.reducer.update_norms(num, den)
                ratio = num / den.clamp_min(1e-30)
                if self.on_record or self.reducer is not None or self._updates is None:
                    # listeners, other ranks and hand-driven steps see the step complete now
                    for (n, _), r in zip(self.params, ratio.tolist(), strict=True):
                        self._pending.setdefault(n, {})["update_ratio"] = r
                elif self._deferring:
                    self._enqueue("post", [ratio], self._ratio_names, False)
                else:
                    # on the device until the next step's transfer (or reading the record)
                    self._ratios = (self.step_index, self._param_names, ratio)
            self._commit()
            if self._deferring:
                self._since_transfer += 1
                if self._since_transfer >= self.flush_every:
                    self._since_transfer = 0
                    self._start_transfer()  # non-blocking; stored once landed
                if self._inflight:
                    self.flush(wait=False)  # store copies that have landed; never wait
        if self._updates is not None:
            self._updates.ready = False
            if self._active and not self.schedule(self.step_index + 1):
                self._updates.release()  # no weight copy held through unrecorded steps
        if self._active and self._mapping and self._sites:
            # the map is drawn: keep the function mode only where module hooks cannot see
            # (functional activations); residual blocks get their input hooks from now on
            if self._nforward == 0 and not self._root_watched and self._use_mode:
                self._record.meta.setdefault("unchecked", {})[type(self.model).__name__] = (
                    "the model itself was never called (the loop calls its submodules): "
                    "functional activations, residual additions and parameters used outside "
                    "module calls were not observed")
            self._mapping = False
            self._use_mode = self._fn_found or self._inplace_seen
            self._set_active(False)
        self._clear()
        self.step_index += 1
        self._set_active(bool(self.schedule(self.step_index)))

    def _commit(self) -> None:
        if self._pending is not None:
            if self.step_index not in self._record.data:
                # the step's fresh dicts become the record's row (no copy of ~10 values/layer)
                self._record.data[self.step_index] = self._pending
            else:
                self._record.add_many(self.step_index, self._pending)
            for fn in self.on_record:
                fn(self.step_index, self._pending)
        self._pending = None

    def _forward_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        groups: dict[tuple, list[int]] = {}
        for j in self._used:
            s = self._sites[j]
            if not s.outs:
                continue
            if s.versions and any(
                t._version != v for t, v in zip(s.outs, s.versions, strict=True)
            ):
                # overwritten in place after it was recorded (an in-place op the probe did not
                # see coming): its statistics would describe another tensor
                s.unchecked = "its output was modified in place after it was recorded"
                s.outs, s.ins = [], []
                continue
            t = s.outs[0]
            if len(s.outs) > 1:
                # micro-batches, time steps of a recurrent cell (same trailing shape; samples
                # are 1-D)
                t = torch.cat(s.outs, 0)
                if s.ins:
                    same_in = all(x.shape[1:] == s.ins[0].shape[1:] for x in s.ins)
                    s.ins = [torch.cat(s.ins, 0) if same_in else s.ins[0]]
            s.outs = [t]
            groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(j)
        for idx in groups.values():
            x = torch.stack([self._sites[j].outs[0] for j in idx])  # [G, k] samples, or outputs
            xf = stats.flat_rows(x)
            mean, std = stats.moments(xf)
            pct = stats.percentiles(xf, self.percentiles, self.max_percentile_samples)
            values += [mean, std, pct.T.reshape(-1)]
            names += self._group_names(tuple(idx))
            if self._deferring and self.max_forward_samples is not None:
                # NaN/Inf in the samples, scaled to the outputs' size (tensors gone by the
                # time the host sees the values)
                sc = host_tensor([self._sites[j].numel / xf.shape[1] for j in idx],
                                 torch.float64, xf.device)
                values.append(stats.nonfinite_count(xf).double() * sc)
                names += [(self._sites[j].name, "out_nonfinite") for j in idx]
            self._activation_stats(idx, x, xf, values, names)

    def _group_names(self, idx: tuple[int, ...]) -> _Metrics:
        # the (layer, metric) labels of a group's moments and percentiles; cached because the
        # same groups recur every step and building ~10 labels per layer is measurable
        cached = self._name_cache.get(idx)
        if cached is None:
            layer = [self._sites[j].name for j in idx]
            cached = [(n, "out_mean") for n in layer] + [(n, "out_std") for n in layer]
            for q in self.percentiles:
                key = stats.percentile_key(q)
                cached += [(n, key) for n in layer]
            self._name_cache[idx] = cached
        return cached

    def _input_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        # the model's own input: badly scaled inputs are a common cause of first-layer saturation
        xs = [x for x in self._inputs if x.is_floating_point()]
        if not xs:
            return
        x = xs[0] if len(xs) == 1 else torch.cat([t.reshape(-1) for t in xs])
        x = x.reshape(1, -1)  # three cheap passes over the whole input; NaN propagates
        mean, std = stats.moments(x)
        absmax = x.abs().amax(dim=1)
        values += [mean, std, absmax]
        names += [(MODEL, "input_mean"), (MODEL, "input_std"), (MODEL, "input_absmax")]

    def _activation_stats(
        self,
        idx: list[int],
        x: torch.Tensor,
        xf: torch.Tensor,
        values: list[torch.Tensor],
        names: _Metrics,
    ) -> None:
        by_kind: dict[str, list[int]] = {}
        for j, i in enumerate(idx):
            k = self._sites[i].kind
            if k is not None:
                by_kind.setdefault(k, []).append(j)
        for kind, js in by_kind.items():
            sites = [self._sites[idx[j]] for j in js]
            layer = [s.name for s in sites]
            if kind in stats.SATURATING:
                if stats.SATURATING[kind][0]:
                    src = xf if len(js) == len(idx) else xf.index_select(
                        0, host_tensor(js, torch.long, xf.device))  # (a list index syncs)
                else:
                    ins = [s.ins[0] if s.ins else None for s in sites]
                    ok = [j for j, t in zip(js, ins, strict=True) if t is not None
                          and t.shape == ins[0].shape]
                    if len(ok) != len(js) or ins[0] is None:
                        for s in sites:
                            s.unchecked = s.unchecked or "its input was not available"
                        src = None
                    else:
                        src = torch.stack(ins)
                if src is not None:
                    values.append(stats.saturated_fraction(src, kind, self.saturation_ratio).float())
                    names += [(n, "saturated_frac") for n in layer]
            if kind in stats.RECTIFIERS and all(s.alive for s in sites):
                # dead = inactive for the WHOLE batch: active units were noted in the hook
                dead = [
                    1.0 - (s.alive[0] if len(s.alive) == 1 else torch.stack(s.alive).any(0))
                    .float().mean()
                    for s in sites
                ]
                values.append(torch.stack(dead))
                names += [(n, "dead_frac") for n in layer]
            elif kind in stats.RECTIFIERS:
                # dead = inactive for the WHOLE batch: use every row, not the subsample
                chan = [s.conv or s.outs[0].dim() >= 4 for s in sites]
                for flag in (True, False):
                    sub = [s for s, c in zip(sites, chan, strict=True) if c == flag]
                    if not sub:
                        continue
                    h = torch.stack([s.outs[0] for s in sub])
                    if h.dim() > 3 and flag:  # conv maps [G, B, C, ...]: a unit is a channel
                        h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], -1).transpose(1, 2)
                        h = h.reshape(h.shape[0], -1, h.shape[-1])
                    elif h.dim() > 3:  # sequences [G, B, T, F]: a unit is a feature
                        h = h.reshape(h.shape[0], -1, h.shape[-1])
                    values.append(stats.dead_fraction(h).float())
                    names += [(s.name, "dead_frac") for s in sub]

    def _backward_values(self, values: list[torch.Tensor], names: _Metrics, scale: float) -> None:
        norms: list[Any] = []
        bads: list[Any] = []
        layer = []
        tvals: list[Any] = []
        tnames: _Metrics = []
        for j in self._used:
            s = self._sites[j]
            g = s.ograds
            if not g:
                continue
            layer.append(s.name)
            n, b = _pool(g)
            norms.append(n)
            bads.append(b)
            if s.tgrads:
                for t, gt in enumerate(s.tgrads):
                    if gt:
                        tvals.append(_pool(gt)[0])
                        tnames.append((s.name, time_metric(t)))
        blocks = [(b, _pool(g)[0]) for b, g in self._block_grads.items() if g]
        if not layer and not blocks:
            return
        if not layer:
            nv = torch.stack([torch.as_tensor(v, dtype=torch.float64) for _, v in blocks])
            values.append(nv / scale if scale != 1.0 else nv)
            names += [(b, "in_grad_norm") for b, _ in blocks]
            return
        norms += tvals
        tnames += [(b, "in_grad_norm") for b, _ in blocks]
        tvals += [v for _, v in blocks]
        norms += [v for _, v in blocks]
        if isinstance(norms[0], float):
            nv = torch.tensor(norms, dtype=torch.float64)
            bv = torch.tensor(bads, dtype=torch.float64)
        else:
            nv = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in norms])
            if any(b is None for b in bads):  # not counted (healthy so far): see _fix_...
                bv = torch.zeros(len(bads), dtype=torch.float64, device=nv.device)
                self._uncounted = True
            else:
                bv = torch.stack([torch.as_tensor(v) for v in bads]).to(torch.float64)
        if scale != 1.0:
            nv = nv / scale  # dL/dh of the unscaled loss
        values += [nv[: len(layer)], bv]
        names += [(n, "out_grad_norm") for n in layer]
        names += [(n, "out_grad_nonfinite") for n in layer]
        if tvals:
            values.append(nv[len(layer):])
            names += tnames

    def _to_dict(self, values: list[torch.Tensor], names: _Metrics) -> dict[str, dict[str, float]]:
        parts = [v.detach().reshape(-1) for v in values]
        carried = self._ratios  # the previous recorded step's update ratios ride along
        self._ratios = None
        if carried is not None:
            parts.append(carried[2].reshape(-1))
        if parts:
            devs = [p.device for p in parts if p.device.type != "cpu"]
            dev = devs[0] if devs else torch.device("cpu")
            vec = torch.cat(
                [p if p.device == dev else p.to(dev, non_blocking=True) for p in parts]
            ).to(torch.float64)
            vec = vec.cpu()  # the step's ONE transfer (its only host synchronisation)
        else:
            vec = torch.zeros(0, dtype=torch.float64)
        if carried is not None:
            n = len(carried[1])
            self._store_ratios(carried[0], carried[1], vec[len(vec) - n :].tolist())
            vec = vec[: len(vec) - n]
        if self.reducer is not None:  # across ranks, before anything is recorded
            names, vec = self.reducer.reduce(names, vec)
        flat = vec.tolist()
        if len(flat) != len(names):  # a bug, never user error
            raise RuntimeError(f"probe bookkeeping mismatch: {len(flat)} values, {len(names)} names")
        out: dict[str, dict[str, float]] = {}
        for (layer, metric), v in zip(names, flat, strict=True):
            d = out.get(layer)
            if d is None:
                d = out[layer] = {}
            d[metric] = v
        return out

    def _fix_nonfinite_counts(self, scale: float = 1.0) -> None:
        """Host-side fix-ups, right after the step's transfer (rare paths: healthy steps only
        scan). NaN/Inf entries are counted exactly (on the forward sample when the output was
        sampled, scaled to the output's size) where a norm or moment was non-finite; float32
        parameter norms (the CPU's) that may have under- or overflowed are redone in float64.
        Counts are recorded (as 0 or more) for every layer so a NaN is counted, never dropped.
        """
        pending = self._pending
        assert pending is not None
        pos = {s.name: s for s in self._sites}
        pidx = dict(self.params)
        refix = False
        uncounted, self._uncounted = self._uncounted, False
        for d in pending.values():
            n = d.get("out_grad_norm")
            if n is not None and not math.isfinite(n):
                _COUNT_NONFINITE[0] = True  # count from the next recorded step on
                if uncounted:
                    d["out_grad_nonfinite"] = math.nan  # not counted on this step
        for layer, d in pending.items():
            if layer == MODEL:
                continue
            if layer in pos:
                s = pos[layer]
                if "out_mean" in d:
                    bad = not (math.isfinite(d["out_mean"]) and math.isfinite(d["out_std"]))
                    cnt = 0.0
                    if bad and s.outs:
                        t = s.outs[0]
                        cnt = float(stats.nonfinite_count(t.reshape(1, -1))[0])
                        if s.numel > t.numel():  # a sample: scaled to the whole output
                            cnt = round(cnt * s.numel / t.numel())
                    d["out_nonfinite"] = cnt
                continue
            p = pidx.get(layer)
            if p is None:
                continue
            if "grad_norm" in d:
                g = p.grad
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
        if refix and "grad_norm_total" in pending.get(MODEL, {}):
            tot = [pending[n]["grad_norm"] for n, _ in self.params
                   if "grad_norm" in pending.get(n, {})]
            pending[MODEL]["grad_norm_total"] = math.sqrt(math.fsum(v * v for v in tot))

    def __repr__(self) -> str:
        return (
            f"Probe({type(self.model).__name__}, modules={len(self._mods)}, "
            f"sites={len(self._sites)}, params={len(self.params)}, schedule={self.schedule}, "
            f"step={self.step_index})"
        )


#: At most this many call sites per module and forward pass; later calls share the last site
#: (a module called in a long Python loop is better described as a recurrent cell).
MAX_SITES = 64

_CELLS = (nn.RNNCellBase,)


def time_metric(t: int) -> str:
    """Metric name of ||dL/dh_t|| at time step ``t`` of a recurrent layer."""
    return f"{TIME_PREFIX}{t}"


class _Site:
    """One call site of a watched module: one layer of the signal path."""

    __slots__ = ("name", "module", "type", "kind", "call", "loop", "outs", "ins", "versions",
                 "ograds", "tgrads", "used", "unchecked", "gates", "depth", "conv", "shape", "numel",
                 "alive")

    def __init__(self, name: str, module: str, type: str, kind: str | None, call: int,
                 loop: bool) -> None:
        self.name, self.module, self.type, self.kind = name, module, type, kind
        self.call, self.loop = call, loop
        self.outs: list[torch.Tensor] = []
        self.ins: list[torch.Tensor] = []
        self.versions: list[int] = []
        # (||dL/dh||, NaN/Inf count) of each backward call this step, computed inside the
        # gradient hook. Keeping the gradient tensors alive until the end of the step instead
        # costs ~3x more (the allocator can no longer reuse their buffers; measured).
        self.ograds: list[tuple[Any, Any]] = []
        self.tgrads: list[list[tuple[Any, Any]]] = []  # per time step (recurrent cells)
        self.used = False
        self.unchecked: str | None = None
        self.gates: dict[str, list[torch.Tensor]] = {}  # recurrent gate values this step
        self.shape: tuple[int, ...] | None = None  # output shape without the batch dimension
        self.numel = 0  # values output this step (a sample holds at most max_forward_samples)
        self.alive: list[torch.Tensor] = []  # rectifiers: units active in the batch, per call
        self.depth = 0  # position on the signal path
        self.conv = False  # output of a convolutional stack: channel-first units

    @property
    def needs_input(self) -> bool:
        k = self.kind
        return k is not None and k in stats.SATURATING and not stats.SATURATING[k][0]

    def clear(self) -> None:
        self.outs, self.ins, self.versions = [], [], []
        self.shape, self.numel, self.alive = None, 0, []
        self.ograds = []
        self.tgrads = []
        self.gates = {}
        self.used = False


def _pool(g: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """One (norm, bad count) from several backward calls (micro-batches, time steps): the
    norm of all of them together."""
    if len(g) == 1:
        return g[0]
    if isinstance(g[0][0], float):
        return math.hypot(*(n for n, _ in g)), sum(b for _, b in g)
    bads = [b for _, b in g]
    return (torch.linalg.vector_norm(torch.stack([n for n, _ in g])),
            None if any(b is None for b in bads)
            else torch.stack([torch.as_tensor(b) for b in bads]).sum())


class _Sentinel:
    """Marks an attached probe that has no optimiser hooks."""

    def remove(self) -> None:
        pass


class _ScalerHook:
    """Wraps ``GradScaler.update`` (restored on remove): the update that follows a step the
    scaler skipped (inf/NaN gradients) closes that step as skipped instead of merging it into
    the next one."""

    def __init__(self, scaler: Any, ref: weakref.ref) -> None:
        self.scaler = scaler
        orig = scaler.update
        self.had_attr = "update" in vars(scaler)

        def update(*a: Any, **k: Any) -> Any:
            p = ref()
            if p is not None:
                p._scaler_update()
            return orig(*a, **k)

        scaler.update = update

    def remove(self) -> None:
        if self.had_attr:
            return
        vars(self.scaler).pop("update", None)


def _is_optimized(m: nn.Module) -> bool:
    return type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The module that actually runs: DDP/DataParallel wrappers are unwrapped to ``.module``,
    ``torch.compile``'s wrapper to the original module (``._orig_mod``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, DistributedDataParallel | DataParallel) or _is_optimized(model):
        model = model._orig_mod if _is_optimized(model) else model.module
    return model


def _compiled_modules(model: nn.Module) -> list[nn.Module]:
    """Compiled modules in ``model`` (torch.compile wrappers, modules compiled in place)."""
    out = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if _is_optimized(m) or getattr(m, "_compiled_call_impl", None) is not None:
            out.append(m)
        stack.extend(m.children())
        if isinstance(getattr(m, "module", None), nn.Module):
            stack.append(m.module)
    return out


class _EagerPatch:
    """Runs a compiled module eagerly until removed (the recorded steps only), so the probe's
    hooks run; the compiled graph serves every other step."""

    def __init__(self, m: nn.Module) -> None:
        self.m = m
        if _is_optimized(m):
            self.attr, self.saved = "forward", vars(m).get("forward")
            m.forward = m._orig_mod.__call__  # type: ignore[method-assign]
        else:
            self.attr, self.saved = "_compiled_call_impl", m._compiled_call_impl
            m._compiled_call_impl = None

    def remove(self) -> None:
        if self.saved is None and self.attr == "forward":
            vars(self.m).pop("forward", None)
        else:
            setattr(self.m, self.attr, self.saved)


def _as_optimizers(
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None,
) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(o).__name__}")
    return opts


def _rows_for(t: torch.Tensor, max_values: int | None) -> int | None:
    """How many leading batch rows of ``t`` hold at most ``max_values`` values (None: all)."""
    if max_values is None or t.dim() == 0:
        return None
    per_row = max(1, t[0].numel()) if t.dim() > 1 else 1
    rows = max(1, max_values // per_row)
    return None if rows >= t.shape[0] else rows


def _call(ref: weakref.ref, method: str, *args: Any) -> None:
    p = ref()
    if p is not None:
        getattr(p, method)(*args)


def _root_pre_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    # a new forward pass of the whole model: call sites are counted from here
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    if p._root_watched:
        # the model is itself one watched module (a bare cell or layer): each call is one of
        # its calls or time steps, not a new forward pass
        if p.forward:
            p._inputs.append(args[0].detach()) if args and isinstance(args[0], torch.Tensor) else None
        return
    if p._grads_seen and p._witness is not None and \
            p._witness.grad is None and p.optimizers and not p._stepped_opts and \
            p._pending is None:
        # a backward happened, then the gradients were zeroed without an optimiser step: the
        # step was skipped (e.g. a GradScaler not given to the probe found inf/NaN gradients)
        p._skip_step()
        if not p._active:
            return
    p._nforward += 1
    p._calls.clear()
    p._new_pass = False
    if p._use_mode:
        if p._mode is None:
            p._mode = ProbeMode(p)
            p._mode.__enter__()
            p._stack = []
        p._mode_depth += 1
    if p.forward and args and isinstance(args[0], torch.Tensor):
        p._inputs.append(args[0].detach())


def _root_post_hook(ref: weakref.ref, module: nn.Module, args: tuple, out: Any) -> None:
    p = ref()
    if p is None or p._mode is None:
        return
    p._mode_depth -= 1
    if p._mode_depth == 0:
        p._mode.__exit__(None, None, None)
        p._mode = None
        p._stack = []


def _push_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    p = ref()
    if p is None or p._mode is None:
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    name = p._names.get(id(module), type(module).__name__)
    p._stack.append((name, module, x if p._mapping else None))
    if p._mapping:
        p._entry.setdefault(name, len(p._path))
        if name in p._blocks and p.backward and x is not None and x.requires_grad:
            # a block found in an earlier forward of this step (micro-batches)
            x.register_hook(partial(_grad_hook, p._block_grads.setdefault(name, []), None))


def _pop_hook(ref: weakref.ref, module: nn.Module, args: tuple, out: Any) -> None:
    p = ref()
    if p is None or p._mode is None or not p._stack:
        return
    name = p._stack.pop()[0]
    if p._mapping and name in p._blocks:
        p._block_done(name, out)
    elif p._mapping and p._stack and isinstance(module, _NORMS):
        for n, _, _ in p._stack:
            if n in p._blocks:
                p._blocks[n]["has_norm"] = True


def _block_pre_hook(ref: weakref.ref, name: str, module: nn.Module, args: tuple) -> None:
    # the residual stream: ||dL/dx|| at the block's input
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is not None and x.requires_grad:
        x.register_hook(partial(_grad_hook, p._block_grads.setdefault(name, []), None))


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _fwd_hook(ref: weakref.ref, i: int, module: nn.Module, inp: tuple, out: Any) -> None:
    # Hot path: runs for every watched module on every forward. Stash references only.
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    if isinstance(out, tuple | list) and out:  # RNN (output, h_n), cells' (h, c): the first
        out = out[0]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        out = out.data
    if not isinstance(out, torch.Tensor):
        return
    if p._new_pass:
        # the first call after a backward pass (a micro-batch of gradient accumulation, also
        # when the loop calls submodules rather than the model): call sites count from here
        p._new_pass = False
        p._calls.clear()
    cand = p._infer.pop(i, None) if p._infer else None
    if cand is not None and cand[1] is out and p._kinds[i] is None:
        p._kinds[i] = cand[0]
        for st in p._sites:
            if st.module == p._mods[i][0]:
                st.kind = cand[0]
        cand = None
    k = p._calls.get(i, 0)
    p._calls[i] = k + 1
    if p._loop[i]:
        t, k = k, 0
    else:
        t, k = -1, min(k, MAX_SITES - 1)
    j = p._site_of.get((i, k))
    if j is None:
        j = p._new_site(i, k)
    s = p._sites[j]
    if cand is not None and s.kind is None and s.unchecked is None:
        s.unchecked = (f"a custom activation (it calls {cand[0]} inside): no saturation or "
                       "dead-unit check is defined for its function")
    if not s.used:
        s.used = True
        p._used.append(j)
    if p._recurrent[i]:
        _attach_time(p, i, s, module)
    if isinstance(module, nn.modules.conv._ConvNd):
        p._conv_context = True
    elif isinstance(module, nn.Linear | nn.Embedding | nn.MultiheadAttention | nn.RNNBase):
        p._conv_context = False
    _record_output(p, j, s, out, inp[0] if inp and isinstance(inp[0], torch.Tensor) else None, t)


def _record_output(p: Probe, j: int, s: _Site, out: torch.Tensor, inp: torch.Tensor | None,
                   t: int) -> None:
    if not s.used:
        s.used = True
        p._used.append(j)
    if p.forward and (s.shape is None or s.shape == out.shape[1:]):
        # pooled over micro-batches and time steps when their shapes agree; an output of
        # another shape (dynamic padding) is left out of the forward statistics
        o = out.detach()
        s.shape = o.shape[1:]
        if p.max_forward_samples is None:  # exact: keep the output until the end of the step
            s.outs.append(o)
            s.versions.append(out._version)
            p._stash[out.data_ptr()] = j
            if s.needs_input and inp is not None:
                s.ins.append(inp.detach())
        else:  # a small copy now: nothing of the output is kept alive or seen overwritten
            s.outs.append(p._sample(o))
            s.numel += o.numel()
            if s.needs_input and inp is not None:
                s.ins.append(p._sample(inp.detach()))
            if s.kind in stats.RECTIFIERS:
                s.alive.append(_active_units(o, s.conv or o.dim() >= 4))
    if p.backward and out.requires_grad:
        if t >= 0:
            while len(s.tgrads) <= t:
                s.tgrads.append([])
            out.register_hook(partial(_out_grad_hook, p._ref, s.ograds, s.tgrads[t]))
        else:
            out.register_hook(partial(_out_grad_hook, p._ref, s.ograds, None))


class _ForwardPatch:
    """Replaces ``module.forward`` by an instance attribute until removed."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self.module = module
        module.forward = fn  # type: ignore[method-assign]

    def remove(self) -> None:
        vars(self.module).pop("forward", None)


def _rnn_stash(ref: weakref.ref, i: int, hs: list[list[torch.Tensor]],
               gates: dict[str, list[torch.Tensor]]) -> None:
    p = ref()
    if p is not None and p._active and torch.is_grad_enabled():
        p._rnn_tmp[i] = (hs, gates)


def _attach_time(p: Probe, i: int, s: _Site, module: nn.Module) -> None:
    """Hook the hidden states of one unrolled recurrent call (per-time-step dL/dh_t)."""
    tmp = p._rnn_tmp.pop(i, None)
    if tmp is None:
        if not s.loop and s.unchecked is None:
            s.unchecked = recurrent.unsupported(module) or (
                "no per-time-step gradients: packed sequences are not unrolled")
        return
    hs, gates = tmp
    if p.forward:
        for g, v in gates.items():
            s.gates.setdefault(g, []).extend(v)
    if not p.backward:
        return
    while len(s.tgrads) < len(hs):
        s.tgrads.append([])
    for t, hl in enumerate(hs):
        for h in hl:
            if h.requires_grad:
                h.register_hook(partial(_grad_hook, s.tgrads[t], None))


def _active_units(h: torch.Tensor, channels: bool) -> torch.Tensor:
    """Which units of a rectifier's output are active for some example: [units] bool. A unit
    is a feature (the last dim, over batch and sequence positions) or, for convolutional maps
    (``channels``), a channel (dim 1, over batch and all positions)."""
    if h.dim() <= 1:
        return (h.amax() > 0).reshape(1)
    if h.dim() == 2:
        return h.amax(dim=0) > 0
    if channels:
        return h.amax(dim=(0, *range(2, h.dim()))) > 0
    return h.amax(dim=tuple(range(h.dim() - 1))) > 0


def _inplace_pre_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    p = ref()
    if p is None or not p._active or not args or not isinstance(args[0], torch.Tensor):
        return
    p.save_before_inplace(args[0])


def _param_hook(ref: weakref.ref, param: torch.Tensor) -> None:
    _backward_started(ref)


def _out_grad_hook(ref: weakref.ref, store: list[tuple[Any, Any]], tstore: list | None,
                   g: torch.Tensor) -> None:
    p = ref()
    if p is not None and not p._cb_queued:
        _backward_started(ref)
    _grad_hook(store, tstore, g)


def _backward_started(ref: weakref.ref) -> None:
    p = ref()
    if p is None or not p._active:
        return
    p._grads_seen = True
    p._new_pass = True
    if not p._cb_queued:
        p._cb_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(partial(_requeue_end, ref))


def _requeue_end(ref: weakref.ref) -> None:
    # at the end of backward: queue the real work behind every callback queued during the
    # pass, so DDP's all-reduce finalisation has written the averaged gradients before we read
    # them (final callbacks may queue more; they run in order)
    torch.autograd.Variable._execution_engine.queue_callback(
        partial(_call, ref, "_on_backward_end")
    )


def _grad_hook(store: list[tuple[Any, Any]], tstore: list | None, g: torch.Tensor) -> None:
    # Runs inside backward for every watched output: reduce to a norm now, keep no tensor.
    # Float32 squares underflow below ~1e-19 (vanishing gradients are exactly what is measured)
    # and the gradient is gone by the time a host sees the norm, so the norm must be robust
    # here. On the CPU: BLAS nrm2 (scaled, so no underflow; no temporary; ~4 us for 16k
    # values), whose result is a host float: the CPU is the host, there is no device to wait
    # for, and a NaN/Inf norm is followed by an exact count at once. On an accelerator: a
    # float64 norm and the NaN/Inf count on the device, no host synchronisation.
    nrm2 = _NRM2.get(g.dtype) if g.device.type == "cpu" else None
    if nrm2 is not None and not g.requires_grad:
        a = (g if g.is_contiguous() else g.contiguous()).numpy().reshape(-1)
        n = float(nrm2(a))
        v = (n, 0.0 if n < math.inf else float(np.count_nonzero(~np.isfinite(a))))
    else:
        # the NaN/Inf count costs launches and a bool temporary of g's size (412 MB for a
        # GPT-2 logit gradient), so it is only taken once some probe has seen a non-finite
        # value (None: not counted; recorded as NaN if the norm turns out non-finite)
        v = (
            torch.linalg.vector_norm(g, dtype=torch.float64),
            (~torch.isfinite(g)).sum() if _COUNT_NONFINITE[0] else None,
        )
    store.append(v)
    if tstore is not None:
        tstore.append(v)


#: Whether gradient hooks on an accelerator count NaN/Inf entries: switched on for good once a
#: probe has seen a non-finite norm (a diverging run), off while training is healthy.
_COUNT_NONFINITE = [False]


def _blas_nrm2() -> dict[torch.dtype, Callable[[np.ndarray], float]]:
    try:
        from scipy.linalg import blas
    except ImportError:  # then the CPU takes the accelerators' path (float64 norm)
        return {}
    return {torch.float32: blas.snrm2, torch.float64: blas.dnrm2}


_NRM2 = _blas_nrm2()

#: float32 norms below this (around the square root of the smallest normal float32) may have
#: lost precision or underflowed while squaring: re-checked in float64 on the host.
_RECHECK_BELOW = 1e-18


def probe(model: nn.Module, **kwargs: Any) -> Probe:
    """Create a :class:`Probe` (use as a context manager: ``with probe(model, optimizer=opt) as p``)."""
    return Probe(model, **kwargs)
