"""Backward and weight statistics of a recorded step: output-gradient norms pooled from the
gradient hooks, parameter gradient and weight norms in one fused call (on the CPU: on the host,
:func:`signalprop.stats.host_norms`), norms before clipping, and what the optimiser needs for
update ratios."""

from __future__ import annotations

import math
import weakref
from functools import partial
from itertools import repeat
from operator import attrgetter, is_
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree

from signalprop import stats
from signalprop.probe import hooks, update
from signalprop.probe.sites import _Metrics, _pool, time_metric
from signalprop.probe.update import device_norms, host_tensor
from signalprop.record import MODEL

if TYPE_CHECKING:  # pragma: no cover
    from signalprop.probe.core import Probe

# (per-parameter reads in C: these run over every parameter at every recorded step)
_GRAD = attrgetter("grad")
_VERSION = attrgetter("_version")
_REQUIRES_GRAD = attrgetter("requires_grad")


class BackwardStats:
    """Mixin of :class:`~signalprop.probe.core.Probe`: gradients, weights, update norms."""

    def _param_lists(self) -> None:
        """The per-parameter lists and names derived from ``self.params``."""
        self._param_names = [n for n, _ in self.params]
        self._plist = [p for _, p in self.params]
        self._wnames = [(n, "weight_norm") for n, _ in self.params]
        self._gnames = [(n, "grad_norm") for n, _ in self.params] + [(MODEL, "grad_norm_total")]
        self._param_of = dict(self.params)
        self._ratio_names = [(n, "update_ratio") for n, _ in self.params]
        self._all_ps = [p for _, p in self._named_all]
        self._params_key = self._trainable_key()

    def _trainable_key(self) -> tuple[tuple[bool, ...], tuple[int, ...]]:
        # (read at every recorded step: which parameters are trainable, how many groups)
        return (tuple(map(_REQUIRES_GRAD, self._all_ps)),
                tuple(len(o.param_groups) for o in self.optimizers))

    def _sync_params(self) -> None:
        """Follow the trainable set at a recorded step's start: parameters unfrozen
        (``requires_grad_(True)``) or frozen after the probe was built, and parameter groups
        added to the optimiser (fine-tuning); the measured parameters used to be fixed at
        construction, so an unfrozen layer was never measured and an added group's update
        ratios came from a stale group index."""
        key = self._trainable_key()
        if key == self._params_key or not any(key[0]):
            return
        self.params = [(n, p) for n, p in self._named_all if p.requires_grad]
        self._param_lists()
        self._buffers = self._snapshot = None
        self._plans.clear()
        self._healthy = None
        self.__dict__.pop("_hnorms", None)
        self._params_declared = False  # (the new ones are declared; add_layer keeps the old)
        if self._updates is not None:
            self._updates = update.UpdateNorms(self.optimizers[0], self._plist,
                                               method=self.update_ratio)

    def _late_grads(self, k: int) -> None:
        """Optimiser ``k`` steps later in this recorded step, after a backward pass of its own
        (GAN-like loops: D steps on D's loss, then G's loss is backpropagated and G steps): its
        parameters' gradient norms are those it steps with. They used to be those seen as the
        step's first optimiser stepped: missing (G's were None then) or from D's loss."""
        self._late_backward = False
        mine = {id(q) for g in self.optimizers[k].param_groups for q in g["params"]}
        sel = [(n, q.grad) for n, q in self.params if id(q) in mine and q.grad is not None]
        if not sel or self._pending is None:
            return
        norms = self._param_norms([g for _, g in sel], False)
        scale = self._loss_scale()
        norms = norms / scale if scale is not None else norms
        if self._deferring:  # (queued after the step's values: they land after them)
            self._enqueue("late", [norms], [(n, "grad_norm") for n, _ in sel], False)
            return
        for (n, _), v in zip(sel, norms.tolist(), strict=True):
            self._pending.setdefault(n, {})["grad_norm"] = v

    def _discarded_pass(self) -> bool:
        """A backward pass whose gradients were zeroed without an optimiser step is taken for
        a skipped step (a GradScaler's inf/NaN); with finite gradients it was another loss
        passing through this model (two probes on a GAN: G's loss backpropagated through D):
        that pass's statistics are dropped and the step goes on. It used to be recorded as a
        skipped step, the next step's values one step late from then on."""
        pre = self._preclip
        if not self._active or self._stepped_opts or self._pending is not None or pre is None \
                or not bool(torch.isfinite(pre[1]).all()):
            return False
        self._clear()
        return True

    def _weight_values(self, values: list[torch.Tensor], names: _Metrics, scale: torch.Tensor | None) -> None:
        """Every norm of this step in ONE call (parameter grads, weights: :meth:`_param_norms`),
        the norms before clipping, and the optimiser's side of the update ratios."""
        allnorms = None
        n_grads = 0
        pre = self._preclip
        if self.weights and self._plist:
            tnames: _Metrics = []
            grads: list[torch.Tensor] = []
            have = None
            if pre is None:
                grads, have = _grads(self._plist)
                n_grads = len(grads)
                self._grads_late = n_grads > 0  # (no end-of-backward hook saw them)
                pnames = self._param_names
                tnames = [(pnames[i], "grad_norm") for i in (have or range(n_grads))]
            tnames += self._wnames
            allnorms = self._param_norms(grads, True)  # no host read (CPU: exact)
            if n_grads and scale is not None:
                allnorms = torch.cat([allnorms[:n_grads] / scale, allnorms[n_grads:]])
            values.append(allnorms)
            names += tnames
            self._pending_weight_norms = allnorms[n_grads:] if n_grads else allnorms
            if n_grads:
                values.append(torch.linalg.vector_norm(allnorms[:n_grads]).reshape(1))
                names.append((MODEL, "grad_norm_total"))
        if pre is not None:
            self._preclip_values(pre, values, names, scale)
        if self.weights and self._updates is not None:
            # update norms from the optimiser's state after the step (SGD: known now)
            self._updates.before(self._current_grad_norms(pre, allnorms, n_grads, scale))
        elif self.weights and self.optimizers and self.update_ratio:
            self._copy_weights()

    def _update_ratios(self) -> None:
        """||W_after - W_before|| / ||W_before|| of the step just taken, where it is known."""
        assert self._pending is not None
        num: torch.Tensor | None = None
        den = self._pending_weight_norms
        if self.weights and not self._no_ratio:
            if self._snapshot is not None:
                params = [p.detach() for _, p in self.params]
                torch._foreach_sub_(self._snapshot, params)  # buffer := W_before - W_after
                num = device_norms(self._snapshot)
            elif self._updates is not None and self._updates.ready:
                num = self._updates.after()
        if num is None:
            return
        if self.reducer is not None:
            num, den = self.reducer.update_norms(num, den)
        if self.on_record or self.reducer is not None or self._updates is None:
            # listeners, other ranks and hand-driven steps see the step complete now
            ratio = num / den.clamp_min(1e-30)
            for (n, _), r in zip(self.params, ratio.tolist(), strict=True):
                self._pending.setdefault(n, {})["update_ratio"] = r
        elif self._deferring:
            self._enqueue("ratio", [num, den], self._ratio_names, False)  # (divided on landing)
        else:
            # on the device until the next step's transfer (or reading the record), divided
            # there (transfer._ratios)
            self._ratios = (self.step_index, self._ratio_names, num, den)

    def _preclip_values(self, pre: Any, values: list[torch.Tensor], names: _Metrics,
                        scale: torch.Tensor | None) -> None:
        """Norms taken at the end of backward, before any clipping by the user's loop."""
        pnames, pnorms, versions = pre
        pnorms = pnorms / scale if scale is not None else pnorms
        values += [pnorms, torch.linalg.vector_norm(pnorms, dim=0, keepdim=True)]
        if pnames == self._param_names:  # (every parameter has a gradient: the usual case)
            names += self._gnames
        else:
            names += [(n, "grad_norm") for n in pnames] + [(MODEL, "grad_norm_total")]
        grads, _ = _grads(self._plist)
        changed = len(grads) == len(versions) and list(map(_VERSION, grads)) != versions
        # the pre-clip norms are those of the current gradients (every parameter has one)
        self._grads_intact = not changed and len(grads) == len(versions) == len(self.params)
        if changed:
            # gradients changed in place since backward (clip_grad_norm_, unscale_): the
            # global norm the optimiser will actually use
            after = self._param_norms(grads, False).square().sum().sqrt()
            if scale is not None and not self._unscaled_by_scaler():
                after = after / scale
            values.append(after.reshape(1))
            names.append((MODEL, "grad_norm_total_clipped"))

    def _copy_weights(self) -> None:
        """One fused copy of all parameters into persistent buffers, for
        ||W_after - W_before|| after the step."""
        det = [p.detach() for _, p in self.params]
        if self._buffers is None or any(
            b.shape != q.shape or b.dtype != q.dtype or b.device != q.device
            for b, q in zip(self._buffers, det, strict=True)
        ):
            self._buffers = [torch.empty_like(q) for q in det]
        torch._foreach_copy_(self._buffers, det)
        self._snapshot = self._buffers

    def _current_grad_norms(
        self, pre: Any, allnorms: torch.Tensor | None, n_grads: int, scale: torch.Tensor | None
    ) -> torch.Tensor | None:
        """||g|| of every parameter as the optimiser will see it (0 without a gradient); only
        the closed form of plain SGD needs it."""
        if self._updates is None or self._updates.method != "sgd":
            return None
        if pre is not None and scale is None and self._grads_intact:
            return pre[1]  # (the usual case: checked by _preclip_values)
        grads, sub = _grads(self._plist)
        if not grads:
            return None
        reuse = None
        if pre is not None:
            pnames, pnorms, versions = pre
            if scale is None and len(versions) == len(grads) and all(
                g._version == v for g, v in zip(grads, versions, strict=True)
            ):
                reuse = pnorms
        elif allnorms is not None and n_grads == len(grads) and scale is None:
            reuse = allnorms[:n_grads]
        norms = reuse if reuse is not None else self._param_norms(grads, False)
        if sub is None:
            return norms
        out = torch.zeros(len(self.params), dtype=torch.float64, device=norms.device)
        return out.index_copy_(0, host_tensor(sub, torch.long, norms.device), norms)
    def _loss_scale(self) -> torch.Tensor | None:
        """The scaler's current loss scale as a 0-dim float64 tensor, never read on the host
        (``GradScaler.get_scale()`` would synchronise with the device); ``None`` without an
        enabled scaler. A copy: the scaler's ``update()`` changes its tensor in place, and the
        value travels with the step's (possibly deferred) transfer."""
        sc = self.scaler
        if sc is None or not getattr(sc, "is_enabled", lambda: True)():
            return None
        get_async = getattr(sc, "_get_scale_async", None)
        t = get_async() if callable(get_async) else None
        if not isinstance(t, torch.Tensor):
            try:  # not scaled yet, or another scaler type: a host value, no device involved
                s = float(sc.get_scale())
            except Exception:  # a disabled scaler
                return None
            return torch.tensor(s if s > 0 and math.isfinite(s) else 1.0, dtype=torch.float64)
        t = t.detach().reshape(()).to(torch.float64, copy=True)
        return torch.where(torch.isfinite(t) & (t > 0), t, torch.ones_like(t))

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
        self._late_backward = self._pending is not None  # (after an optimiser: _late_grads)
        self._sync_params()
        grads, have = _grads(self._plist)
        if have is not None:
            if not have:
                return
            pnames = [self._param_names[i] for i in have]
            self._witness = self._plist[have[0]]
        else:  # (every parameter has a gradient: the usual case)
            pnames = self._param_names
            self._witness = self._plist[0]
        self._preclip = (pnames, self._param_norms(grads, False), list(map(_VERSION, grads)))

    def _param_norms(self, grads: list[torch.Tensor], weights: bool) -> torch.Tensor:
        """Norms (float64, on the parameters' device, no host read) of the gradients
        ``grads``, followed by those of every weight when ``weights``. On the CPU, taken on
        the host (:func:`~signalprop.stats.host_norms`, the weights' views made once:
        :class:`~signalprop.stats.HostNorms`), one small tensor made from the values;
        elsewhere, or for tensors that path does not take, one fused :func:`device_norms`."""
        if update.HOST_NUMPY and self._plist and self._plist[0].is_cpu:
            vals = stats.host_norms(grads) if grads else []
            if vals is not None and weights:
                plan = self.__dict__["_hnorms"] = stats.HostNorms.of(
                    self._plist, self.__dict__.get("_hnorms"))
                vals = vals + plan.weights() if plan.ok else None
            if vals is not None:
                return torch.tensor(vals, dtype=torch.float64)
        else:  # (parameters moved off the CPU: the views would keep their old memory alive)
            self.__dict__.pop("_hnorms", None)
        return _no_grad_norms([*grads, *self._plist] if weights else grads)

    def _backward_values(self, values: list[torch.Tensor], names: _Metrics, scale: torch.Tensor | None) -> None:
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
            values.append(nv / scale if scale is not None else nv)
            names += [(b, "in_grad_norm") for b, _ in blocks]
            return
        norms += tvals
        tnames += [(b, "in_grad_norm") for b, _ in blocks]
        tvals += [v for _, v in blocks]
        norms += [v for _, v in blocks]
        k = len(layer)
        if scale is None and all(type(v) is float for v in norms) and \
                all(type(v) is float for v in bads):
            # (the CPU's norms, taken on the host by the hooks: they stay host values)
            values += [norms[:k], bads] if not tvals else [norms[:k], bads, norms[k:]]
            names += [(n, "out_grad_norm") for n in layer]
            names += [(n, "out_grad_nonfinite") for n in layer]
            names += tnames
            return
        if all(type(v) is float for v in norms) and all(type(b) is float for b in bads):
            nv = torch.tensor(norms, dtype=torch.float64)
            bv = torch.tensor(bads, dtype=torch.float64)
        else:
            nv = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in norms])
            if any(b is None for b in bads):  # not counted (healthy so far): see _fix_...
                bv = torch.zeros(len(bads), dtype=torch.float64, device=nv.device)
                self._uncounted = True
            else:
                bv = torch.stack([torch.as_tensor(v) for v in bads]).to(torch.float64)
        if scale is not None:
            nv = nv / scale  # dL/dh of the unscaled loss
        values += [nv[: len(layer)], bv]
        names += [(n, "out_grad_norm") for n in layer]
        names += [(n, "out_grad_nonfinite") for n in layer]
        if tvals:
            values.append(nv[len(layer):])
            names += tnames

    def _check_lean(self) -> None:
        """After a recorded step of a probe without forward or backward statistics: whether
        its next recorded steps can do with :func:`add_lean_hooks`, or must go back to the
        hooks of every module and parameter. Lean once the hook on the model's output has
        seen a backward that gave the gradients (the model is called whole and its loss comes
        from its output); back if gradients appeared that no hook saw."""
        if self._compiled:
            return
        lean = self._lean
        if not lean and self._out_seen and self._preclip is not None:
            self._lean = True
        elif lean and self._preclip is None and self._grads_late:
            self._lean = False  # (this step's gradient norms were read at the optimiser step)
        if self._lean != lean:  # the other set of hooks from the next recorded step on
            self._set_active(False)
            self._active = True  # (until the end of this step)


def _grads(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int] | None]:
    """The parameters' gradients that exist, and their indices (``None``: every parameter
    has one, the usual case)."""
    grads = list(map(_GRAD, params))
    if not any(map(is_, grads, repeat(None))):
        return grads, None
    have = [i for i, g in enumerate(grads) if g is not None]
    return [grads[i] for i in have], have


def _no_grad_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`device_norms` outside autograd (parameters require grad; the optimiser's
    pre-hook runs with grad mode on), without a ``torch.no_grad()`` object per call."""
    if not torch.is_grad_enabled():
        return device_norms(tensors)
    torch._C._set_grad_enabled(False)
    try:
        return device_norms(tensors)
    finally:
        torch._C._set_grad_enabled(True)


def add_lean_hooks(p: Probe) -> None:
    """The hook of a recorded step that records no forward or backward statistics: a forward
    hook on the model that hooks its output's backward node, which queues the end-of-backward
    callback (pre-clip gradient norms) and notices a skipped step. One hook instead of a
    forward hook per module and a hook per parameter (~80 Python calls per step on a 20-layer
    MLP); the model's children keep PyTorch's fast call path."""
    p._fwd_handles.append(p.model.register_forward_hook(partial(_root_out_hook, p._ref)))


def _root_out_hook(ref: weakref.ref, module: nn.Module, args: tuple, out: Any) -> None:
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    leaves = (out,) if type(out) is torch.Tensor else _pytree.tree_leaves(out)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            t.grad_fn.register_prehook(partial(_out_backward, ref))


def _out_backward(ref: weakref.ref, grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
    # the backward pass reached the model's output (before any parameter's gradient): the
    # end-of-backward callback is queued
    p = ref()
    if p is None or not p._active:
        return
    if p._lean and p._grads_seen and p._witness is not None and p._witness.grad is None and \
            p.optimizers and not p._stepped_opts and p._pending is None:
        # a backward happened, then the gradients were zeroed without an optimiser step: the
        # step was skipped (a GradScaler not given to the probe found inf/NaN gradients; the
        # full set of hooks sees this in the model's forward pre-hook)
        p._skip_step()
        if not p._active:
            return
    p._out_seen = True
    hooks._backward_started(ref)
