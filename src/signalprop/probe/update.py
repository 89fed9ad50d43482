"""||W_after - W_before|| of an optimiser step without a copy of the weights.

A copy of every parameter (the obvious way to measure an update) doubles the weights' memory.
For the optimisers most models train with, the update is a closed-form function of state the
optimiser keeps anyway, so its norm is computed from that state after the step:

- ``SGD`` without momentum: ``dW = -lr (g + wd W)``; with ``wd = 0`` that is ``lr ||g||``, known
  before the step at no cost (with weight decay: one fused pass over ``g + wd W`` in chunks).
- ``SGD`` with (non-Nesterov) momentum: ``dW = -lr buf`` with the momentum buffer after the step.
- ``Adam`` / ``AdamW`` (also AMSGrad): ``dW = -lr m_hat / (sqrt(v_hat) + eps)``, plus the
  decoupled decay ``-lr wd W_before`` for AdamW, rewritten in terms of ``W_after``:
  ``||dW|| = lr / (1 - lr wd) * ||wd W_after + m_hat / (sqrt(v_hat) + eps)||``.

Element-wise work runs on chunks of at most :data:`CHUNK_FRACTION` of the parameters' elements
(large tensors cut into flat pieces), so temporary memory stays a small fraction of the model.
On the CPU, Adam's closed form runs in NumPy: each large tensor's state is read in place, piece
by piece (``sqrt(v)``, ``+ e``, ``m /`` into a scratch array ``d``, then ``||d + wa W||^2 =
||d||^2 + 2 wa <d, W> + wa^2 ||W||^2`` by guarded BLAS dots: ``stats.axpy_norm``); small tensors
(most of a transformer's tensors, few of its elements) are gathered. Elsewhere, torch operations:
one launch per pass and chunk. ``benchmarks/update_norms.py`` times them in the training loop of
``probe_overhead.py``'s transformer (866k parameters in 149 tensors, one CPU thread; medians of
4 runs on a shared machine): NumPy 2.0 ms per recorded step (2.5 ms with every tensor
gathered and the decay term added in passes of its own), torch 3.2 ms, a weight copy 1.8 ms
(holding a third of Adam's state); reading m, v and W alone takes ~0.8 ms. Relative error
against a float64 evaluation: NumPy ~1e-7 (tested <= 1e-6), torch's float32 norms ~6e-6.

Bias corrections use the step count of each parameter group as read once when the plan is made
and advanced by the probe on every optimiser step (no host read during training); once a
parameter skips a step (no gradient: Adam leaves it and its count alone, as in conditional
branches and unrouted experts), its count lags the group's and the copy measures instead.

Every other optimiser (or a tensor-valued learning rate) falls back to a copy of the weights on
recorded steps only, released after the step. Results agree with the copy to float rounding;
with the copy, ``W_after - W_before`` in float32 itself carries a relative error of about
``eps_float32 * ||W|| / ||dW||``, which the closed form does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, NamedTuple

import numpy as np
import torch

from signalprop import stats

#: Temporary tensors of the closed forms hold at most this fraction of the parameters' elements
#: (Adam keeps two moments per weight, so its share of model + optimiser state is a third).
CHUNK_FRACTION: dict[str, float] = {"sgd": 0.02, "adam": 0.1}
#: ... but chunks are never cut below this many elements (fewer, larger fused launches).
MIN_CHUNK: int = 1 << 12
#: Adam: tensors of fewer elements are gathered into flat buffers (one launch per operation for
#: all of them; on the CPU a per-tensor launch costs as much as ~3000 elements of arithmetic).
SMALL_TENSOR: int = 1 << 12


class _AdamGroup(NamedTuple):
    """Adam's plan for one parameter group (see ``UpdateNorms._adam_plan``)."""

    gi: int  # the group's index in optimizer.param_groups
    big: list[tuple[list[torch.Tensor], ...]]  # chunks of (m, v, W) pieces (torch)
    flat: Any  # torch: chunks of flat (m, v, W) views and runs; the CPU: a _HostPlan
    host: bool  # ``flat`` is the CPU's NumPy plan (see _adam_host)
    owner: torch.Tensor | None  # piece -> position in ``idx`` (None: no tensor was cut)
    idx: torch.Tensor  # the positions' parameter indices
    n: int  # number of parameters


_GRAD = attrgetter("grad")


def device_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norms of ``tensors`` as one float64 tensor on their device, with no host read.

    On the CPU the norms are taken in float32 (float64 costs 3x); tiny or infinite results are
    re-checked in float64 by the caller when the values reach the host (see ``Probe``). On an
    accelerator ``torch._foreach_norm`` with ``dtype=float64`` computes in float64 in one fused
    launch, so no re-check is needed.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    try:
        if tensors[0].is_cpu:  # (half precision: a half-precision result has 3 digits)
            low = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)
            raw = torch._foreach_norm(tensors, 2, dtype=torch.float64 if low else None)
        else:
            raw = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    except NotImplementedError:
        if not any(t.layout is not torch.strided for t in tensors):
            raise
        # sparse gradients (nn.Embedding(sparse=True)): the norms of their stored values
        return device_norms([stats.dense_values(t) for t in tensors])
    # (norms of mixed dtypes are promoted by the stack: exactly, to the widest of them)
    return torch.stack(raw).to(torch.float64)


def host_tensor(values: Sequence[float] | Sequence[int], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A small tensor of host values on ``dev`` (a copy that never waits for the device)."""
    t = torch.tensor(values, dtype=dtype)
    return t if dev.type == "cpu" else t.to(dev, non_blocking=True)


def _raw_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if tensors[0].device.type == "cpu":
        return list(torch._foreach_norm(tensors))
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float64))


def _chunks(tensors: Sequence[torch.Tensor], limit: int,
            whole: set[int] | frozenset[int] = frozenset()) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Cut flat views of ``tensors`` into lists of at most ``limit`` elements each (tensors
    whose index is in ``whole`` are kept whole, as they are, in a list of their own size).

    Returns the lists and, for every piece in order, the index of the tensor it came from.
    """
    groups: list[list[torch.Tensor]] = [[]]
    owner: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
        if i in whole:
            if size and size + t.numel() > limit:
                groups.append([])
                size = 0
            groups[-1].append(t)
            owner.append(i)
            size += t.numel()
            continue
        flat = t.reshape(-1)
        n = flat.numel()
        start = 0
        while start < n:
            room = limit - size
            if room <= 0:
                groups.append([])
                size, room = 0, limit
            take = min(room, n - start)
            groups[-1].append(flat[start : start + take] if take < n else flat)
            owner.append(i)
            size += take
            start += take
    return [g for g in groups if g], owner


def _pieces_to_norms(piece_norms: list[torch.Tensor], owner: list[int], n: int) -> torch.Tensor:
    """Combine the norms of the pieces of each tensor (sqrt of the sum of squares)."""
    sq = torch.cat([torch.stack(p) for p in piece_norms]).to(torch.float64).square()
    idx = host_tensor(owner, torch.long, sq.device)
    return torch.zeros(n, dtype=torch.float64, device=sq.device).index_add_(0, idx, sq).sqrt()


#: ``update_ratio`` choices: how ||W_after - W_before|| is measured.
UPDATE_RATIO_CHOICES = ("auto", "optimizer", "copy")


def _steps_differ(opt: torch.optim.Optimizer) -> bool:
    """Whether the parameters of some group count different steps (read once, at build)."""
    return any(len({float(opt.state.get(p, {}).get("step", 0.0)) for p in g["params"]}) > 1
               for g in opt.param_groups)


def _check_update_ratio(value: str | bool) -> str | bool:
    if value is False or value is True:
        return value and "auto"
    if value not in UPDATE_RATIO_CHOICES:
        raise ValueError(f"update_ratio must be one of {', '.join(map(repr, UPDATE_RATIO_CHOICES))}"
                         f" or False, got {value!r}")
    return value


class UpdateNorms:
    """Computes ``||dW||`` of one optimiser step for a fixed list of parameters.

    Use: :meth:`before` in the step pre-hook (gradients final), :meth:`advance` in the post-hook
    of every optimiser step (recorded or not), then :meth:`after`.
    ``method`` says how: ``"sgd"``, ``"sgd-momentum"``, ``"adam"`` or ``"copy"``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 method: str = "auto") -> None:
        self.optimizer = optimizer
        self.params = params
        total = sum(p.numel() for p in params)
        group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.group_idx = [group_of.get(id(p), -1) for p in params]
        # "auto": the closed form where there is one; "copy": always the copy; "optimizer":
        # the closed form or an error
        self.method = "copy" if method == "copy" else self._choose()
        if self.method == "adam" and method == "auto" and _steps_differ(optimizer):
            # one step count per group in the closed form: a layer unfrozen later (no state
            # yet) would be bias-corrected with the group's count, not its own
            self.method = "copy"
        if method == "optimizer" and self.method == "copy":
            raise ValueError(
                f"update_ratio='optimizer': no closed-form update for {type(optimizer).__name__}"
                " with these settings (SGD without Nesterov, Adam, AdamW with float betas and a "
                "float lr have one); use update_ratio='auto' or 'copy'")
        self.limit = max(MIN_CHUNK, int(CHUNK_FRACTION.get(self.method, 0.02) * total))
        self.steps_taken = [self._initial_step(g) for g in optimizer.param_groups]
        self._state = optimizer.state  # (a new dict after load_state_dict: see advance)
        self._auto, self._lagged = method == "auto", False  # (a count lags: see advance)
        self._stepped = [p for p, gi in zip(params, self.group_idx, strict=True) if gi >= 0]
        self._copy: list[torch.Tensor] | None = None
        self._plan: tuple[Any, Any] | None = None  # Adam: cached chunk views (see _adam_plan)
        self._dicts: list[dict[str, Any] | None] = []  # Adam: the parameters' optimiser state
        self._dicts_key: Any = None
        self._before: torch.Tensor | None = None
        self._had_grad: list[bool] = []
        self._scale_key: Any = None  # SGD: what the cached per-parameter rates were made for
        self._scale: torch.Tensor | None = None
        self._rates_key: Any = None  # SGD: the group settings _lrs/_wds were made for
        self._lrs: list[float] = []
        self._wds: list[float] = []
        self.ready = False  # before() ran for the current step
        self._complex = any(p.is_complex() for p in params)

    def _choose(self) -> str:
        opt = self.optimizer
        groups = opt.param_groups
        if any(isinstance(g.get("lr"), torch.Tensor) for g in groups):
            return "copy"
        if type(opt) is torch.optim.SGD:
            if any(g.get("nesterov") for g in groups):
                return "copy"
            if all(g.get("momentum", 0) == 0 for g in groups):
                return "sgd"
            if all(g.get("momentum", 0) != 0 for g in groups):
                return "sgd-momentum"
            return "copy"
        if type(opt) in (torch.optim.Adam, torch.optim.AdamW) and not any(
                isinstance(b, torch.Tensor) for g in groups for b in g["betas"]):
            return "adam"
        return "copy"

    def _initial_step(self, group: dict[str, Any]) -> float:
        # read once, when the plan is made (attach time), never during training
        steps = (self.optimizer.state.get(p, {}).get("step") for p in group["params"])
        return next((float(s) for s in steps if s is not None), 0.0)

    # ---- before the optimiser step --------------------------------------------------------------
    def before(self, grad_norms: torch.Tensor | None) -> None:
        """Gradients are final. ``grad_norms``: ||g|| of every parameter (0 where no gradient)."""
        self._had_grad = [g is not None for g in map(_GRAD, self.params)]
        self._before = None
        self.ready = True
        self.method = "copy" if self._lagged else self.method
        if self.method == "sgd":
            self._sgd_before(grad_norms)
        elif self.method == "copy":
            det = [p.detach() for p in self.params]
            if self._copy is None or any(
                b.shape != q.shape or b.dtype != q.dtype or b.device != q.device
                for b, q in zip(self._copy, det, strict=True)
            ):
                self._copy = [torch.empty_like(q) for q in det]
            torch._foreach_copy_(self._copy, det)

    def _sgd_before(self, grad_norms: torch.Tensor | None) -> None:
        """Plain SGD: ||dW|| = lr ||g + wd W||, known before the step (lr ||g|| without
        weight decay: the gradient norms times a cached vector of rates)."""
        groups = self.optimizer.param_groups
        glr = tuple(g.get("lr", 0.0) for g in groups)
        gwd = tuple(g.get("weight_decay", 0.0) for g in groups)
        if self._rates_key != (glr, gwd):  # (per parameter: looked up once per setting)
            self._rates_key = (glr, gwd)
            self._lrs = [glr[gi] if gi >= 0 else 0.0 for gi in self.group_idx]
            self._wds = [gwd[gi] if gi >= 0 else 0.0 for gi in self.group_idx]
        lrs, wds = self._lrs, self._wds
        if any(gwd) and any(w != 0 for w in wds):
            # ||g + wd W||, chunked so that the temporary stays small
            gs = [
                p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params
            ]
            ws = [p.detach() for p in self.params]
            gc, owner = _chunks(gs, self.limit)
            wc, _ = _chunks(ws, self.limit)
            piece_norms = []
            k = 0
            for g_list, w_list in zip(gc, wc, strict=True):
                alphas = [wds[owner[k + j]] for j in range(len(g_list))]
                tmp = torch._foreach_mul(w_list, alphas)
                torch._foreach_add_(tmp, g_list)
                piece_norms.append(_raw_norms(tmp))
                k += len(g_list)
                del tmp
            norm = _pieces_to_norms(piece_norms, owner, len(self.params))
        elif grad_norms is not None:
            norm = grad_norms
        else:  # no parameter has a gradient: the step changes nothing
            norm = torch.zeros(len(self.params), dtype=torch.float64,
                               device=self.params[0].device)
        key = (glr, tuple(self._had_grad), norm.device)
        if self._scale_key != key:  # (a new rate or another set of gradients)
            self._scale = host_tensor(
                [lr if had else 0.0 for lr, had in zip(lrs, self._had_grad, strict=True)],
                torch.float64, norm.device,
            )
            self._scale_key = key
        self._before = norm * self._scale

    def _group(self, i: int) -> dict[str, Any]:
        gi = self.group_idx[i]
        return self.optimizer.param_groups[gi] if gi >= 0 else {}

    # ---- after the optimiser step ---------------------------------------------------------------
    def after(self) -> torch.Tensor:
        """||dW|| of every parameter (float64, on the parameters' device). Call once per step,
        after :meth:`before` and :meth:`advance` of the same step."""
        if self.method == "copy":
            assert self._copy is not None
            torch._foreach_sub_(self._copy, [p.detach() for p in self.params])
            return device_norms(self._copy)
        if self.method == "sgd":
            assert self._before is not None
            return self._before
        if self.method == "sgd-momentum":
            return self._momentum()
        return self._adam()

    def release(self) -> None:
        """Drop the weight copy (the next recorded step allocates it again)."""
        self._copy = None

    def advance(self) -> None:
        """The optimiser took a step (recorded or not): advance the groups' step counts."""
        if self.method != "adam":
            return
        if self.optimizer.state is self._state:
            self.steps_taken = [t + 1 for t in self.steps_taken]
            # (auto only; from the next recorded step: this one's copy was not taken)
            self._lagged |= self._auto and any(map(is_, map(_GRAD, self._stepped), repeat(None)))
        else:  # load_state_dict (a checkpoint resumed, a rewind): the loaded counts, this step's
            # included (they were counted on, and Adam's bias correction came out wrong)
            self._state = self.optimizer.state
            self.steps_taken = [self._initial_step(g) for g in self.optimizer.param_groups]

    def _momentum(self) -> torch.Tensor:
        bufs, idx = [], []
        for i, p in enumerate(self.params):
            b = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if b is not None and self._had_grad[i]:
                bufs.append(b)
                idx.append(i)
        dev = self.params[0].device
        out = torch.zeros(len(self.params), dtype=torch.float64, device=dev)
        if bufs:
            lrs = host_tensor([self._group(i)["lr"] for i in idx], torch.float64, dev)
            out.index_copy_(0, host_tensor(idx, torch.long, dev), device_norms(bufs) * lrs)
        return out

    def _adam_plan(self) -> list[_AdamGroup]:
        """Which parameters take part in this step and how their state is cut, per parameter
        group. Cached while the same parameters have state and gradients and the state tensors
        and parameters keep their memory (the optimiser updates them in place): building the
        views costs as much as the arithmetic. The check reads one address per tensor."""
        opt = self.optimizer
        state = opt.state
        key = self._dicts_key
        # (load_state_dict replaces opt.state: the key holds the state it was made for, so
        # that its id cannot be reused by a later one)
        if key is None or key[0] is not state or key[1] != len(state):
            self._dicts = [state.get(p) for p in self.params]  # (.get: no entry is created)
            self._dicts_key = (state, len(state))
        vkey = ["max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq" for g in opt.param_groups]
        gidx = self.group_idx
        sel = [i for i, (d, had) in enumerate(zip(self._dicts, self._had_grad, strict=True))
               if had and d is not None and gidx[i] >= 0 and "exp_avg" in d]
        ms = [self._dicts[i]["exp_avg"] for i in sel]
        vs = [self._dicts[i][vkey[gidx[i]]] for i in sel]
        ws = [self.params[i] for i in sel]
        if self._complex:  # (Adam steps a complex tensor as its real view: so does the closed form)
            ms, vs, ws = ([torch.view_as_real(t) if t.is_complex() else t for t in ts]
                          for ts in (ms, vs, ws))
        ptr = torch.Tensor.data_ptr
        key = (tuple(sel), tuple(map(ptr, ms)), tuple(map(ptr, vs)), tuple(map(ptr, ws)))
        if self._plan is None or self._plan[0] != key:  # (a .data swap changes the key too)
            # (the views keep their memory alive: no address in the key can be reused meanwhile)
            self._plan = (key, self._adam_groups(sel, ms, vs, [w.detach() for w in ws]))
        return self._plan[1]

    def _adam_groups(self, sel: list[int], ms: list[torch.Tensor], vs: list[torch.Tensor],
                     ws: list[torch.Tensor]) -> list[_AdamGroup]:
        """The plan of each parameter group: NumPy views on the CPU, else torch views."""
        dev = self.params[0].device
        small_cut = min(SMALL_TENSOR, self.limit)
        by_group: dict[int, list[int]] = {}
        for k, i in enumerate(sel):
            by_group.setdefault(self.group_idx[i], []).append(k)
        plan = []
        for gi, ks in by_group.items():
            # flat views need contiguous memory (a channels_last tensor's .reshape(-1) would be
            # a copy, stale once cached): other tensors stay whole, in the per-tensor launches
            dense = {k for k in ks if all(t[k].is_contiguous() for t in (ms, vs, ws))}
            host = _host_plan(ms, vs, ws, ks, self.limit) if len(dense) == len(ks) else None
            big_chunks: list[tuple[list[torch.Tensor], ...]] = []
            if host is not None:  # the CPU: NumPy (see _adam_host), one norm per tensor
                order, flat_chunks, owner = ks, host, list(range(len(ks)))
            else:
                big = [k for k in ks if k not in dense or ms[k].numel() >= small_cut]
                small = sorted((k for k in ks if k in dense and ms[k].numel() < small_cut),
                               key=lambda k: ms[k].numel())
                order, owner = big + small, []
                if big:
                    whole = {j for j, k in enumerate(big) if k not in dense}
                    mc, owner = _chunks([ms[k] for k in big], self.limit, whole)
                    vc, _ = _chunks([vs[k] for k in big], self.limit, whole)
                    wc, _ = _chunks([ws[k] for k in big], self.limit, whole)
                    big_chunks = list(zip(mc, vc, wc, strict=True))
                flat_chunks = _flat_chunks(ms, vs, ws, small, self.limit)
                owner += range(len(big), len(big) + len(small))
            plan.append(_AdamGroup(
                gi, big_chunks, flat_chunks, host is not None,
                host_tensor(owner, torch.long, dev) if len(owner) != len(ks) else None,
                host_tensor([sel[k] for k in order], torch.long, dev), len(ks)))
        return plan

    def _adam(self) -> torch.Tensor:
        # dW = -lr * (m_hat / (sqrt(v_hat) + eps) + wd_dec * W_before). With
        # a = sqrt(bc2) / bc1 and e = eps * sqrt(bc2): m_hat / (sqrt(v_hat) + eps) =
        # a * m / (sqrt(v) + e), and W_before = (W_after + lr * that) / (1 - lr * wd_dec), so
        # ||dW|| = lr * a / (1 - lr wd_dec) * ||m / (sqrt(v) + e) + (wd_dec / a) * W_after||.
        # All of it is per parameter group: one set of scalars per group. On the CPU, NumPy
        # (_adam_host); elsewhere five passes over one temporary per chunk (one launch per
        # operation), small tensors gathered into flat buffers (their count costs nothing).
        opt = self.optimizer
        out = torch.zeros(len(self.params), dtype=torch.float64, device=self.params[0].device)
        decoupled = isinstance(opt, torch.optim.AdamW)
        for gp in self._adam_plan():
            g = opt.param_groups[gp.gi]
            b1, b2 = g["betas"]
            t = self.steps_taken[gp.gi]  # advance() has counted the step just taken
            lr, wd = float(g["lr"]), float(g.get("weight_decay", 0.0))
            dec = decoupled or bool(g.get("decoupled_weight_decay", False))
            wd_dec = wd if dec else 0.0
            sq = math.sqrt(1.0 - b2**t)
            a = sq / (1.0 - b1**t)
            e, wa = float(g["eps"]) * sq, wd_dec / a
            if gp.host:
                norms = torch.from_numpy(_adam_host(gp.flat, e, wa))
            else:
                parts = _adam_device(gp, e, wa)
                norms = torch.cat(parts).to(torch.float64) if parts else out[:0]
            if gp.owner is not None:  # tensors cut into pieces: combine the pieces' norms
                norms = torch.zeros(gp.n, dtype=torch.float64, device=norms.device).index_add_(
                    0, gp.owner, norms.square()).sqrt()
            out.index_copy_(0, gp.idx, norms * (lr * a / (1.0 - lr * wd_dec)))
        return out


def _flat_chunks(ms: list[torch.Tensor], vs: list[torch.Tensor], ws: list[torch.Tensor],
                 small: list[int], limit: int) -> list[tuple[Any, ...]]:
    """Whole small tensors ``small`` (by size) in chunks of at most ``limit`` elements: flat
    views of (m, v, W) and runs of (count, size) of equal sizes."""
    flat: list[tuple[list[torch.Tensor], ...]] = []
    runs: list[list[tuple[int, int]]] = []
    size = 0
    for k in small:
        n = ms[k].numel()
        if not flat or size + n > limit:
            flat.append(([], [], []))
            runs.append([])
            size = 0
        for lst, t in zip(flat[-1], (ms[k], vs[k], ws[k]), strict=True):
            lst.append(t.view(-1))
        if runs[-1] and runs[-1][-1][1] == n:
            runs[-1][-1] = (runs[-1][-1][0] + 1, n)
        else:
            runs[-1].append((1, n))
        size += n
    return [(*f, r) for f, r in zip(flat, runs, strict=True)]


def _adam_device(gp: _AdamGroup, e: float, wa: float) -> list[torch.Tensor]:
    """Norms of the pieces of ``m / (sqrt(v) + e) + wa W`` with torch operations."""
    parts = []
    for m_list, v_list, w_list in gp.big:
        d = torch._foreach_sqrt(v_list)
        torch._foreach_add_(d, e)
        torch._foreach_reciprocal_(d)
        torch._foreach_mul_(d, m_list)
        if wa:
            torch._foreach_add_(d, w_list, alpha=wa)
        parts.append(torch.stack(_raw_norms(d)))
        del d
    for m_list, v_list, w_list, runs in gp.flat:
        d = torch.cat(v_list).sqrt_().add_(e).reciprocal_().mul_(torch.cat(m_list))
        if wa:
            d.add_(torch.cat(w_list), alpha=wa)
        parts.append(_run_norms(d, runs))
        del d
    return parts


#: Whether the CPU takes the NumPy path (tests switch it off to check the torch path there).
HOST_NUMPY: bool = True


class _HostPlan(NamedTuple):
    """The CPU's Adam plan of one parameter group (see :func:`_host_plan`)."""

    dtype: torch.dtype
    big: list[tuple[int, list[tuple[np.ndarray, ...]]]]  # (position, pieces of (m, v, W) views)
    small: list[tuple[Any, ...]]  # gathered: (m, v, W) view lists, positions, starts, ends, floors
    n: int  # number of tensors
    most: int  # elements of the largest piece or chunk (the size of each scratch array)


def _host_plan(ms: list[torch.Tensor], vs: list[torch.Tensor], ws: list[torch.Tensor],
               ks: list[int], limit: int) -> _HostPlan | None:
    """The CPU's plan for tensors ``ks``: NumPy views of each tensor's own (m, v, W) in pieces of
    at most ``min(limit // 2, DOT_PIECE)`` elements, except tensors smaller than that and than
    :data:`SMALL_TENSOR`, gathered by size into chunks of at most as many (the size of each of
    two scratch arrays, whatever the model's size). ``None`` where this path does not apply
    (another device, a dtype without a BLAS norm, no SciPy)."""
    dtypes = {t[k].dtype for t in (ms, vs, ws) for k in ks}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if not HOST_NUMPY or dtype not in stats.HOST_NORMS or dtype not in stats.HOST_AXPY or any(
            type(t[k]) is not torch.Tensor or t[k].device.type != "cpu"  # (not a DTensor ...)
            for t in (ms, vs, ws) for k in ks):
        return None
    piece = min(max(1, limit // 2), stats.DOT_PIECE)
    small_cut = min(SMALL_TENSOR, piece)
    pos = {k: j for j, k in enumerate(ks)}
    big = []
    for k in ks:
        n = ms[k].numel()
        if n >= small_cut:
            m, v, w = (t[k].detach().view(-1).numpy() for t in (ms, vs, ws))
            big.append((pos[k], [(m[i:i + piece], v[i:i + piece], w[i:i + piece])
                                 for i in range(0, n, piece)]))
    # (tensors without elements stay out: their norm is the 0 the result starts with)
    small = sorted((k for k in ks if 0 < ms[k].numel() < small_cut), key=lambda k: ms[k].numel())
    tiny = float(np.finfo(np.float32 if dtype == torch.float32 else np.float64).tiny)
    gathered, at = [], 0
    for *views, _ in _flat_chunks(ms, vs, ws, small, piece):
        sizes = np.array([x.numel() for x in views[0]])
        ends = np.cumsum(sizes)
        gathered.append((*([x.numpy() for x in lst] for lst in views),
                         np.array([pos[k] for k in small[at:at + len(sizes)]], np.intp),
                         ends - sizes, ends, 1e9 * tiny * sizes))
        at += len(sizes)
    most = max([min(piece, ms[k].numel()) for k in ks] + [int(g[-2][-1]) for g in gathered])
    return _HostPlan(dtype, big, gathered, len(ks), max(most, 1))


def _adam_host(plan: _HostPlan, e: float, wa: float) -> np.ndarray:
    """Norms (float64) of ``m / (sqrt(v) + e) + wa W`` per tensor on the CPU: a large tensor's
    pieces in three NumPy passes into a scratch array, the decay term by BLAS dots
    (:func:`stats.axpy_norm`); small tensors gathered by ``concatenate`` (one call per pass for
    all of them), one ``reduceat`` for their norms."""
    out = np.zeros(plan.n)
    if not plan.n:
        return out
    axpy, nrm = stats.HOST_AXPY[plan.dtype], stats.HOST_NORMS[plan.dtype]
    dtype = np.float32 if plan.dtype == torch.float32 else np.float64
    b1, b2 = np.empty(plan.most, dtype), np.empty(plan.most, dtype)
    with np.errstate(all="ignore"):  # (NaN/Inf: as in the optimiser's own step; no warnings)
        for j, pieces in plan.big:
            parts = []
            for m, v, w in pieces:
                d = b1[:m.shape[0]]
                np.sqrt(v, out=d)
                np.add(d, e, out=d)
                np.divide(m, d, out=d)
                parts.append(axpy(d, w, wa, b2))
            out[j] = parts[0] if len(parts) == 1 else math.sqrt(math.fsum(x * x for x in parts))
        for m_list, v_list, w_list, where, starts, ends, floors in plan.small:
            d, t = b1[:ends[-1]], b2[:ends[-1]]
            np.concatenate(v_list, out=d)
            np.sqrt(d, out=d)
            np.add(d, e, out=d)
            np.concatenate(m_list, out=t)
            np.divide(t, d, out=d)
            if wa:
                np.concatenate(w_list, out=t)
                np.multiply(t, wa, out=t)
                np.add(d, t, out=d)
            # squares summed per tensor in double; where they could have lost anything (a sum
            # below 1e9 n tiny: underflow; not finite: overflow, NaN) the tensor again by nrm
            ss = np.add.reduceat(np.multiply(d, d, out=t), starts, dtype=np.float64)
            norms = np.sqrt(ss)
            for i in np.flatnonzero(~((ss >= floors) & (ss < np.inf))):
                norms[i] = nrm(d[starts[i]:ends[i]])
            out[where] = norms
    return out


def _run_norms(flat: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """Norms of consecutive tensors laid out in ``flat``, ``runs`` of (count, size) equal sizes:
    one reduction per run (float32 on the CPU, float64 elsewhere, as :func:`_raw_norms`)."""
    dtype = None if flat.device.type == "cpu" else torch.float64
    out, start = [], 0
    for count, size in runs:
        block = flat[start : start + count * size].view(count, size)
        out.append(torch.linalg.vector_norm(block, dim=1, dtype=dtype))
        start += count * size
    return out[0] if len(out) == 1 else torch.cat(out)
