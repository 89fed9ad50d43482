"""The probe: hooks on a model's modules and optimiser that record the forward and backward
signal per layer, per step, into a :class:`~signalprop.record.Record`.

Cost model (see shared performance notes): per-module Python work on every step is what makes
instrumentation slow. Hooks here only *stash references* to tensors that autograd keeps alive
anyway; all statistics are computed at the end of the step in bulk (layers of one shape stacked
into one tensor, norms through ``torch._foreach_norm``) and moved to the CPU in one transfer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from signalprop import stats
from signalprop.probe.modules import activation_kind, watched_modules
from signalprop.probe.schedule import Schedule, as_schedule
from signalprop.record import MODEL, LayerInfo, Record

_Metrics = list[tuple[str, str]]  # (layer, metric) names matching a flat value vector


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
            this many values per layer (``None``: exact).
        max_forward_samples: Moments and saturated fractions are computed on the first batch
            rows holding at most this many values per layer (``None``: the whole output).
        saturation_ratio: A unit counts as saturated when |phi'| < ratio * max|phi'|.
        modules: Optional filter ``(name, module) -> bool`` on the watched modules.
        record: An existing record to append to.
        on_record: Callables ``f(step, values)`` invoked after each recorded step with that
            step's ``values[layer][metric]`` (live writers: TensorBoard, Lightning loggers).
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
        self.model = model
        self.optimizer = optimizer
        self.schedule = as_schedule(schedule)
        self.forward, self.backward, self.weights = forward, backward, weights
        self.percentiles = tuple(float(q) for q in percentiles)
        self.max_percentile_samples = max_percentile_samples
        self.max_forward_samples = max_forward_samples
        self._buffers: list[torch.Tensor] | None = None
        self.saturation_ratio = float(saturation_ratio)
        self.record = record if record is not None else Record()
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
        self._handles: list[Any] = []
        self._fwd_handles: list[Any] = []
        self._active = False
        self._outs: list[list[torch.Tensor]] = [[] for _ in mods]
        self._ins: list[list[torch.Tensor]] = [[] for _ in mods]
        # per module: (||dL/dh||, NaN/Inf count) of each backward call this step, computed inside
        # the gradient hook. Keeping the gradient tensors alive until the end of the step instead
        # costs ~3x more (the allocator can no longer reuse their buffers; measured).
        self._ograds: list[list[tuple[Any, Any]]] = [[] for _ in mods]
        self._order: list[int] = []  # module indices in first-firing order
        self._fired: set[int] = set()
        self._scalars: dict[str, Any] = {}
        self._snapshot: list[torch.Tensor] | None = None
        self._pending_weight_norms = torch.zeros(0)
        self._pending: dict[str, dict[str, float]] | None = None
        self._inputs: list[torch.Tensor] = []
        self._layers_declared = False
        self._name_cache: dict[tuple[int, ...], _Metrics] = {}
        self.record.meta.setdefault("model", type(model).__name__)
        self.record.meta.setdefault("num_parameters", sum(p.numel() for _, p in self.params))
        self.record.meta.setdefault("schedule", str(self.schedule))
        self.record.meta.setdefault("percentiles", list(self.percentiles))
        self.record.meta.setdefault("saturation_ratio", self.saturation_ratio)

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
        """Remove every hook and drop stashed tensors (a pending step is finalised first)."""
        if self._pending is not None:
            self._commit()
        self._set_active(False)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear()

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
        except update ratios, and snapshot the weights when an optimiser is bound."""
        self._pre_step()

    def stepped(self, *, update_ratios: bool = True) -> None:
        """Step boundary: the optimiser has (or, with ``update_ratios=False``, has not) changed
        the weights; finish the step's record and advance the step counter."""
        if not update_ratios:
            self._snapshot = None
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

    # ---- internals ------------------------------------------------------------------------------
    def _clear(self) -> None:
        for i in self._order:
            self._outs[i].clear()
            self._ins[i].clear()
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
            self.record.add_layer(
                LayerInfo(name=name, type=type(m).__name__, depth=d, activation=self._kinds[i])
            )
        for pname, p in self.params:
            owner = pname.rsplit(".", 1)[0] if "." in pname else ""
            owner = owner or type(self.model).__name__
            self.record.add_layer(
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
        """Gradients are ready: compute everything except update ratios."""
        if not self._active:
            return
        if not self._layers_declared and self._fired:
            self._declare_layers()
        values: list[torch.Tensor] = []
        names: _Metrics = []
        if self.forward:
            self._forward_stats(values, names)
            self._input_stats(values, names)
        # every norm of this step in ONE fused call (output grads, parameter grads, weights)
        tensors: list[torch.Tensor] = []
        tnames: _Metrics = []
        if self.backward:
            self._backward_values(values, names)
        params = [p for _, p in self.params]
        n_grads = 0
        if self.weights:
            with_grad = [(n, p.grad) for n, p in self.params if p.grad is not None]
            tensors += [g for _, g in with_grad]
            tnames += [(n, "grad_norm") for n, _ in with_grad]
            n_grads = len(with_grad)
            tensors += [p.detach() for p in params]
            tnames += [(n, "weight_norm") for n, _ in self.params]
        if tensors:
            allnorms = stats.norms(tensors)
            values.append(allnorms)
            names += tnames
            if self.weights:
                k = len(tensors) - len(params)
                self._pending_weight_norms = allnorms[k:]
                if n_grads:
                    gn = allnorms[k - n_grads : k]
                    values.append(gn.square().sum().sqrt().reshape(1))
                    names.append((MODEL, "grad_norm_total"))
        if self.weights:
            if self.optimizer is not None:
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
            values.append(torch.as_tensor(v, dtype=torch.float32).reshape(-1)[:1].cpu())
            names.append((MODEL, k))
        self._pending = self._to_dict(values, names)
        self._fix_nonfinite_counts()

    def _post_step(self) -> None:
        """The optimiser has stepped: update ratios, then move to the next step."""
        if self._active and self._pending is not None:
            if self._snapshot is not None:
                params = [p.detach() for _, p in self.params]
                den = self._pending_weight_norms
                torch._foreach_sub_(self._snapshot, params)  # in place: buffer := W_before - W_after
                num = stats.norms(self._snapshot)
                ratio = (num / den.clamp_min(1e-30)).tolist()
                for (n, _), r in zip(self.params, ratio, strict=True):
                    self._pending.setdefault(n, {})["update_ratio"] = r
            self._commit()
        self._clear()
        self.step_index += 1
        self._set_active(bool(self.schedule(self.step_index)))

    def _commit(self) -> None:
        if self._pending is not None:
            self.record.add_many(self.step_index, self._pending)
            for fn in self.on_record:
                fn(self.step_index, self._pending)
        self._pending = None

    def _forward_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        groups: dict[tuple, list[int]] = {}
        for i in self._order:
            outs = self._outs[i]
            if not outs:
                continue
            t = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
            self._outs[i] = [t]
            if self._needs_input[i]:
                ins = self._ins[i]
                self._ins[i] = [ins[0] if len(ins) == 1 else torch.cat(ins, 0)]
            groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
        for idx in groups.values():
            full = [self._outs[i][0] for i in idx]
            rows = _rows_for(full[0], self.max_forward_samples)
            x = torch.stack([t[:rows] for t in full]) if rows else torch.stack(full)  # [G, b, ...]
            mean, std = stats.moments(x)
            pct = stats.percentiles(x, self.percentiles, self.max_percentile_samples)
            values += [mean, std, pct.T.reshape(-1)]
            names += self._group_names(tuple(idx))
            self._activation_stats(idx, x, rows, values, names)

    def _group_names(self, idx: tuple[int, ...]) -> _Metrics:
        # the (layer, metric) labels of a group's moments and percentiles; cached because the
        # same groups recur every step and building ~10 labels per layer is measurable
        cached = self._name_cache.get(idx)
        if cached is None:
            layer = [self._mods[i][0] for i in idx]
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
        rows: int | None,
        values: list[torch.Tensor],
        names: _Metrics,
    ) -> None:
        by_kind: dict[str, list[int]] = {}
        for j, i in enumerate(idx):
            k = self._kinds[i]
            if k is not None:
                by_kind.setdefault(k, []).append(j)
        for kind, js in by_kind.items():
            layer = [self._mods[idx[j]][0] for j in js]
            if kind in stats.SATURATING:
                if stats.SATURATING[kind][0]:
                    src = x[js]
                else:
                    src = torch.stack([self._ins[idx[j]][0][:rows] for j in js])
                values.append(stats.saturated_fraction(src, kind, self.saturation_ratio).float())
                names += [(n, "saturated_frac") for n in layer]
            if kind in stats.RECTIFIERS:
                # dead = inactive for the WHOLE batch: use every row, not the subsample
                h = torch.stack([self._outs[idx[j]][0] for j in js])
                if h.dim() > 3:  # conv maps [G, B, C, ...]: a unit is a channel
                    h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], -1).transpose(1, 2)
                    h = h.reshape(h.shape[0], -1, h.shape[-1])
                values.append(stats.dead_fraction(h).float())
                names += [(n, "dead_frac") for n in layer]

    def _backward_values(self, values: list[torch.Tensor], names: _Metrics) -> None:
        norms: list[Any] = []
        bads: list[Any] = []
        layer = []
        for i in self._order:
            g = self._ograds[i]
            if not g:
                continue
            layer.append(self._mods[i][0])
            if len(g) == 1:
                norms.append(g[0][0])
                bads.append(g[0][1])
            elif isinstance(g[0][0], float):
                # several calls in one step (RNN cells, micro-batches): the norm of all of them
                norms.append(math.hypot(*(n for n, _ in g)))
                bads.append(sum(b for _, b in g))
            else:
                norms.append(torch.linalg.vector_norm(torch.stack([n for n, _ in g])))
                bads.append(torch.stack([b for _, b in g]).sum())
        if not layer:
            return
        if isinstance(norms[0], float):
            values.append(torch.tensor(norms, dtype=torch.float64))
            values.append(torch.tensor(bads, dtype=torch.float64))
        else:
            values.append(torch.stack(norms))
            values.append(torch.stack(bads).to(torch.float64))
        names += [(n, "out_grad_norm") for n in layer]
        names += [(n, "out_grad_nonfinite") for n in layer]

    def _to_dict(self, values: list[torch.Tensor], names: _Metrics) -> dict[str, dict[str, float]]:
        flat = (
            torch.cat([v.detach().reshape(-1).to("cpu", torch.float64) for v in values]).tolist()
            if values
            else []
        )
        if len(flat) != len(names):  # a bug, never user error
            raise RuntimeError(f"probe bookkeeping mismatch: {len(flat)} values, {len(names)} names")
        out: dict[str, dict[str, float]] = {}
        for (layer, metric), v in zip(names, flat, strict=True):
            out.setdefault(layer, {})[metric] = v
        return out

    def _fix_nonfinite_counts(self) -> None:
        """Count NaN/Inf entries exactly, but only where a norm or moment was non-finite.

        A norm or mean is non-finite whenever any entry is, so healthy steps pay nothing here.
        Counts are recorded (as 0 or more) for every layer so a NaN is counted, never dropped.
        """
        pending = self._pending
        assert pending is not None
        pos = {n: i for i, (n, _) in enumerate(self._mods)}
        pidx = {n: p for n, p in self.params}
        for layer, d in pending.items():
            if layer == MODEL:
                continue
            if layer in pos:
                i = pos[layer]
                if "out_mean" in d:
                    bad = not (math.isfinite(d["out_mean"]) and math.isfinite(d["out_std"]))
                    d["out_nonfinite"] = (
                        float(stats.nonfinite_count(self._outs[i][0].unsqueeze(0))[0])
                        if bad and self._outs[i]
                        else 0.0
                    )
            elif layer in pidx and "grad_norm" in d:
                g = pidx[layer].grad
                bad = not math.isfinite(d["grad_norm"])
                d["grad_nonfinite"] = (
                    float(stats.nonfinite_count(g.unsqueeze(0))[0]) if bad and g is not None else 0.0
                )

    def __repr__(self) -> str:
        return (
            f"Probe({type(self.model).__name__}, modules={len(self._mods)}, "
            f"params={len(self.params)}, schedule={self.schedule}, step={self.step_index})"
        )


class _Sentinel:
    """Marks an attached probe that has no optimiser hooks."""

    def remove(self) -> None:
        pass


def _rows_for(t: torch.Tensor, max_values: int | None) -> int | None:
    """How many leading batch rows of ``t`` hold at most ``max_values`` values (None: all)."""
    if max_values is None or t.dim() == 0:
        return None
    per_row = max(1, t[0].numel()) if t.dim() > 1 else 1
    rows = max(1, max_values // per_row)
    return None if rows >= t.shape[0] else rows


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


def _fwd_hook(ref: weakref.ref, i: int, module: nn.Module, inp: tuple, out: Any) -> None:
    # Hot path: runs for every watched module on every forward. Stash references only.
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
        p._outs[i].append(out.detach())
        if p._needs_input[i] and inp and isinstance(inp[0], torch.Tensor):
            p._ins[i].append(inp[0].detach())
    if p.backward and out.requires_grad:
        out.register_hook(partial(_grad_hook, p._ograds[i]))


def _grad_hook(store: list[tuple[Any, Any]], g: torch.Tensor) -> None:
    # Runs inside backward for every watched output: reduce to a norm now, keep no tensor.
    if g.device.type == "cpu":
        n = float(torch.linalg.vector_norm(g))
        bad = 0.0
        if not 1e-18 <= n < math.inf:  # under/overflow while squaring in float32, or NaN/Inf
            if g.is_floating_point() and g.dtype != torch.float64:
                n = float(torch.linalg.vector_norm(g.to(torch.float64)))
            if not math.isfinite(n):
                bad = float((~torch.isfinite(g)).sum())
        store.append((n, bad))
    else:  # no host synchronisation inside backward on an accelerator
        store.append(
            (
                torch.linalg.vector_norm(g, dtype=torch.float64),
                (~torch.isfinite(g)).sum(),
            )
        )


def probe(model: nn.Module, **kwargs: Any) -> Probe:
    """Create a :class:`Probe` (use as a context manager: ``with probe(model, optimizer=opt) as p``)."""
    return Probe(model, **kwargs)
