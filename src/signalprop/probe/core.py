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
- At the end of the step every statistic is computed in bulk on the device (``_foreach_norm``)
  and reaches the host in ONE transfer (its only host sync; on the CPU none: a tensor call
  costs ~5 us there, so values are read where they are); a step's dicts are built when the
  record is read, its update ratios travel with the next step. Weights only: one hook.
- Memory on an accelerator (deferred steps) peaks late in backward, with every parameter
  gradient alive: a one-pass step's forward statistics are computed as its backward begins,
  so the samples are gone by then; gradient norms accumulate in float64 without a float64
  copy of the gradient and are packed 16 sites to a tensor (the CUDA allocator gives every
  tensor a 512-byte block); values waiting for their transfer hold at most about 1% of the
  parameters' bytes (:data:`signalprop.probe.transfer.QUEUE_FRACTION`).
- Update ratios come from the optimiser's own update where it has a closed form (SGD, Adam,
  AdamW; :mod:`signalprop.probe.update`), else from a copy of the weights on recorded steps.

The class is assembled from mixins, one file per responsibility: :mod:`.layermap` (the map of
the signal path), :mod:`.forward` and :mod:`.backward` (the statistics), :mod:`.transfer` (from
device values to the record); the hooks live in :mod:`.hooks`, per-site state in :mod:`.sites`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from signalprop import stats
from signalprop.probe import hooks
from signalprop.probe.backward import BackwardStats, add_lean_hooks
from signalprop.probe.forward import ForwardStats
from signalprop.probe.layermap import LayerMap
from signalprop.probe.schedule import Schedule, as_schedule
from signalprop.probe.sites import MAX_SITES, _Metrics, time_metric
from signalprop.probe.transfer import Transfer
from signalprop.probe.update import UpdateNorms, _check_update_ratio
from signalprop.probe.wrappers import (
    _as_optimizers,
    _compiled_modules,
    _ScalerHook,
    _Sentinel,
    _step_hook,
    unwrap,
)
from signalprop.record import MODEL, Record

#: Default ``flush_every`` on an accelerator: recorded steps whose values wait on the device.
FLUSH_EVERY_ACCELERATOR: int = 16

__all__ = ["FLUSH_EVERY_ACCELERATOR", "MAX_SITES", "Probe", "probe", "time_metric", "unwrap"]


class Probe(LayerMap, ForwardStats, BackwardStats, Transfer):
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
        update_ratio: How update ratios ||W_after - W_before|| / ||W_before|| are measured
            (with ``weights``): ``"auto"`` (default) from the optimiser's own state where it
            has a closed form (SGD, Adam, AdamW: no copy of the weights; see
            :mod:`signalprop.probe.update`), else from a copy of the weights taken on recorded
            steps; ``"optimizer"``: the closed form only (ValueError for other optimisers);
            ``"copy"``: always the copy (fastest on recorded steps, but it holds the
            parameters' size in memory through the step); ``False``: no update ratios.
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
        update_ratio: str | bool = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Probe needs a torch.nn.Module, got {type(model).__name__}")
        # compiled modules (torch.compile's wrapper, or module.compile() in place) run their
        # recorded steps eagerly: hooks added after compilation never run inside the graph
        self._compiled = _compiled_modules(model)
        model = unwrap(model)
        self._named_all = list(model.named_parameters())  # (layers unfrozen later: _sync_params)
        self.params = [(n, p) for n, p in self._named_all if p.requires_grad]
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
        self.update_ratio = _check_update_ratio(update_ratio)
        self.percentiles = tuple(float(q) for q in percentiles)
        self.max_percentile_samples = max_percentile_samples
        self.max_forward_samples = max_forward_samples
        self.saturation_ratio = float(saturation_ratio)
        self._record = record if record is not None else Record()
        self.flush_every = _flush_every(flush_every, self.params[0][1].device)
        self.on_record: list[Callable[[int, dict[str, dict[str, float]]], None]] = (
            [] if on_record is None else [on_record] if callable(on_record) else list(on_record))
        # distributed hook (signalprop.integrations.distributed): reduce(names, flat) ->
        # (names, flat) combines one step's values across ranks (the union of every rank's
        # names); update_norms(num, den) the per-parameter norms behind update ratios
        self.reducer: Any = None  # None: single process
        self._init_state()
        self._init_map(modules)
        self._init_meta()

    def _init_state(self) -> None:
        """Per-step and transfer state (cleared or consumed as steps go by)."""
        self._buffers: list[torch.Tensor] | None = None
        self._since_transfer = 0
        # (step, kind, names, device values, uncounted, host values' layout or None)
        self._queue: list[tuple[int, str, _Metrics, torch.Tensor, bool, Any]] = []
        self._queued_bytes = 0  # device bytes of the queue (Transfer._queue_full)
        self._inflight: list[tuple[torch.Tensor, Any, list[Any]]] = []
        self.step_index = 0
        self._handles: list[Any] = []
        self._fwd_handles: list[Any] = []
        self._active = False
        self._calls: dict[Any, int] = {}  # module index -> its calls in this forward pass
        # calls inside backward (activation checkpointing recomputes; hooks._call_index), and
        # the keys called in a forward pass of this step
        self._bw_calls: dict[Any, int] = {}
        self._fwd_keys: set[Any] = set()
        self._nforward = 0  # forward passes of the whole model in this step (micro-batches)
        self._used: list[int] = []  # sites holding data of this step
        self._scalars: dict[str, Any] = {}
        self._scalar_counts: dict[str, int] = {}
        self._snapshot: list[torch.Tensor] | None = None
        self._pending_weight_norms = torch.zeros(0)
        self._pending: dict[str, dict[str, float]] | None = None
        self._inputs: list[torch.Tensor] = []
        self._name_cache: dict[tuple[int, ...], _Metrics] = {}
        self._host_plans: dict[tuple[Any, ...], Any] = {}  # forward.ForwardStats._host_plan
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
        # (step, names, ||dW||, ||W||): divided on the host
        self._ratios: tuple[int, _Metrics, torch.Tensor, torch.Tensor] | None = None
        self._updates: UpdateNorms | None = None
        self._no_ratio = False
        self._param_lists()
        self._site_names: dict[str, Any] = {}  # site name -> site (transfer's fix-ups)
        self._grads_intact = False  # pre-clip norms are the current gradients' (this step)
        self._uncounted = False
        self._early: tuple[list[torch.Tensor], _Metrics] | None = None
        self._passes = 0  # forward passes of the last recorded step
        self._loose: list[tuple[list[Any], int]] = []  # device norms not packed (hooks._pack)
        self._plans: dict[tuple[int, int], Any] = {}  # transfer._RowsPlan by names
        # weights only (no forward or backward statistics): recorded steps need no hook per
        # module or parameter once the model's own hooks have been seen to catch its backward
        self._lean = False
        self._out_seen = False  # this step's backward passed through the model's output
        self._grads_late = False  # gradients first seen at the optimiser step (no hook saw them)
        # a committed step's names, flat values and plan, before its dicts are built
        # (transfer._to_dict; None: the dicts are _pending)
        self._row: tuple[_Metrics, list[float], Any] | None = None
        self._healthy: Any = None  # the plan of a step that needs no NaN/Inf fix-up (transfer)

    def _init_meta(self) -> None:
        """What the module types say (the measured facts found later override these)."""
        from signalprop.diagnosis.architecture import architecture_facts

        meta = self._record.meta
        for k, v in architecture_facts(self.model).items():
            if v is not None:
                meta.setdefault(k, v)
        meta.setdefault("model", type(self.model).__name__)
        meta.setdefault("num_parameters", sum(p.numel() for _, p in self.params))
        meta.setdefault("schedule", str(self.schedule))
        meta.setdefault("percentiles", list(self.percentiles))
        meta.setdefault("saturation_ratio", self.saturation_ratio)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The (first) bound optimiser, or ``None``."""
        return self.optimizers[0] if self.optimizers else None

    @optimizer.setter
    def optimizer(self, value: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None) -> None:
        if self._handles:
            raise RuntimeError("bind the optimizer before attaching the probe")
        self.optimizers = _as_optimizers(value)
        self._updates = None  # (a new optimiser, e.g. rebuilt after unfreezing: its own state)

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
            self._handles.append(opt.register_step_pre_hook(partial(_step_hook, ref, False, k)))
            self._handles.append(opt.register_step_post_hook(partial(_step_hook, ref, True, k)))
        if self.scaler is not None:
            self._handles.append(_ScalerHook(self.scaler, ref))
        self._sync_params()  # (frozen or unfrozen while detached)
        if self.update_ratio == "optimizer" and len(self.optimizers) != 1 and self.weights:
            raise ValueError("update_ratio='optimizer' needs exactly one optimizer bound to the "
                             f"probe, got {len(self.optimizers)}")
        if self.weights and self.update_ratio and len(self.optimizers) == 1 and \
                self._updates is None:
            # ||dW|| from the optimiser's own state where it has a closed form (no weight copy)
            self._updates = UpdateNorms(self.optimizers[0], [p for _, p in self.params],
                                        method=self.update_ratio)
        self._stepped_opts: set[int] = set()
        self._set_active(bool(self.schedule(self.step_index)))
        return self

    def _set_active(self, active: bool) -> None:
        if active and not self._fwd_handles and self._handles:
            if self._lean:  # weights only: one hook on the model (backward.add_lean_hooks)
                add_lean_hooks(self)
            else:
                hooks.add_step_hooks(self)
                if not (self.forward or self.backward):
                    add_lean_hooks(self)  # (to learn whether it sees this model's steps)
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
            if isinstance(v, torch.Tensor):
                v = v.detach()
                if v.dim() or v.dtype is not torch.float32:  # (a float32 loss as it is)
                    v = v.reshape(-1)[:1].float()
            else:
                v = float(v)
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
        self._lazy_rows()
        return self._pending

    def snapshot_weights(self) -> None:
        """Copy the current weights now (for update ratios when the optimiser is not bound to
        the probe, or the gradients were modified after :meth:`gradients_ready`)."""
        det = [p.detach() for _, p in self.params]
        self._buffers = [torch.empty_like(q) for q in det] if self._buffers is None else self._buffers
        torch._foreach_copy_(self._buffers, det)
        self._snapshot = self._buffers

    # ---- optimiser / scaler boundaries -----------------------------------------------------------
    def _opt_pre(self, k: int) -> None:
        if k in self._stepped_opts:
            # this optimiser steps a second time before the others: a new probe step
            self._post_step()
        if self._pending is None:
            self._pre_step()
        elif getattr(self, "_late_backward", False):
            self._late_grads(k)

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
        """Close the current step as skipped: recorded, marked, no update ratios (unless only
        a pass with finite gradients was discarded: :meth:`_discarded_pass`)."""
        if self._discarded_pass():
            return
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
        self._bw_calls.clear()
        self._fwd_keys.clear()
        self._nforward = 0
        self._inputs = []
        self._scalars = {}
        self._scalar_counts = {}
        self._snapshot = None
        self._preclip = None
        self._row = None
        self._early = None
        self._loose = []
        self._witness = None
        self._cb_queued = False
        self._grads_seen = False
        self._new_pass = False
        self._stepped_opts = set()
        self._stash = {}
        self._rnn_tmp = {}
        self._no_ratio = False
        self._out_seen = False
        self._grads_late = False
        self._producer = {}
        self._stack = []
        self._fn_counts = {}
        for v in self._block_grads.values():
            v.clear()

    def _pre_step(self) -> None:
        """Gradients are ready: compute everything except update ratios."""
        if not self._active:
            return
        if self._preclip is None:  # (else the end of backward has followed it this step)
            self._sync_params()
        if self._sites:
            self._declare_layers()
        self._passes = self._nforward
        values: list[torch.Tensor] = []
        names: _Metrics = []
        scale = self._loss_scale()
        if self.forward:
            if self._early is not None:  # computed as backward began (_early_forward_stats)
                values += self._early[0]
                names += self._early[1]
            self._forward_stats(values, names)
            self._input_stats(values, names)
            self._gate_stats(values, names)
        if self.backward:
            self._backward_values(values, names, scale)
        self._weight_values(values, names, scale)
        self._step_scalars(values, names, scale)
        if self._deferring:
            # values stay on the device; host-side additions (skipped_step) go to _pending
            if self.weights and hooks._COUNT_NONFINITE[0]:
                with_grad = [(n, stats.dense_values(p.grad)) for n, p in self.params
                             if p.grad is not None]
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
        self._fix_nonfinite_counts()

    def _step_scalars(self, values: list[torch.Tensor], names: _Metrics,
                      scale: torch.Tensor | None) -> None:
        """Logged scalars, the loss scale and the learning rate of this step."""
        for k, v in self._scalars.items():
            n = self._scalar_counts.get(k, 1)
            t = v if isinstance(v, torch.Tensor) else torch.tensor([v], dtype=torch.float32)
            values.append(t / n if n > 1 else t)  # stays on its device until the transfer
            names.append((MODEL, k))
        if self.scaler is not None:  # (1 for a disabled scaler)
            values.append(scale.reshape(1) if scale is not None
                          else torch.ones(1, dtype=torch.float64))
            names.append((MODEL, "loss_scale"))
        if self.optimizers:
            # the rate this step uses (learning-rate schedulers change it between steps)
            lr = self.optimizers[0].param_groups[0].get("lr")
            if isinstance(lr, int | float):
                values.append([float(lr)])  # (a host value: no tensor)
                names.append((MODEL, "lr"))
            elif isinstance(lr, torch.Tensor) and lr.numel() == 1:
                # (a tensor rate stays where it is: it travels with the step's one transfer)
                values.append(lr.detach().to(torch.float64).reshape(1))
                names.append((MODEL, "lr"))

    def _post_step(self) -> None:
        """The optimiser has stepped: update ratios, then move to the next step."""
        if not self._active:  # (no hook ran: only the optimiser boundary's state to reset)
            if self._updates is not None:
                self._updates.ready = False
            self._stepped_opts, self._snapshot, self._no_ratio = set(), None, False
            self.step_index += 1
            if self.schedule(self.step_index):
                self._set_active(True)
            return
        if self._pending is not None:
            self._update_ratios()
            self._commit()
            if self._deferring:
                self._since_transfer += 1
                if self._since_transfer >= self.flush_every or self._queue_full:
                    self._since_transfer = 0
                    self._start_transfer()  # non-blocking; stored once landed
                if self._inflight:
                    self.flush(wait=False)  # store copies that have landed; never wait
        if self._updates is not None:
            self._updates.ready = False
            if self._active and not self.schedule(self.step_index + 1):
                self._updates.release()  # no weight copy held through unrecorded steps
        if self._active and not (self.forward or self.backward):
            self._check_lean()
        if self._active and self._mapping and self._sites:
            self._map_drawn()
        elif self._active:
            self._check_fn_patches()
        self._clear()
        self.step_index += 1
        self._set_active(bool(self.schedule(self.step_index)))

    def __repr__(self) -> str:
        return (f"Probe({type(self.model).__name__}, modules={len(self._mods)}, "
                f"sites={len(self._sites)}, params={len(self.params)}, "
                f"schedule={self.schedule}, step={self.step_index})")


def _flush_every(flush_every: int | None, dev: torch.device) -> int:
    if flush_every is not None and (isinstance(flush_every, bool) or int(flush_every) < 1):
        raise ValueError(f"flush_every must be an int >= 1 or None, got {flush_every!r}")
    if flush_every is not None:
        return int(flush_every)
    return 1 if dev.type == "cpu" else FLUSH_EVERY_ACCELERATOR


def probe(model: nn.Module, **kwargs: Any) -> Probe:
    """Create a :class:`Probe` (use as a context manager: ``with probe(model, optimizer=opt) as p``)."""
    return Probe(model, **kwargs)

