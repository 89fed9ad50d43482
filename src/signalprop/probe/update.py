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
(large tensors are cut into flat pieces), so the temporary memory stays a small fraction of the
model however large it is. The price is time: Adam's closed form is five passes over its state
on each recorded step (on one CPU thread about 0.6x an AdamW step; a weight copy costs a fifth
of that and a third of Adam's state in memory). Bias corrections use the step count of each parameter group as read
once when the plan is made and advanced by the probe on every optimiser step (no host read
during training); a parameter that skipped steps (no gradient) is corrected as if it had not.

Every other optimiser (or a tensor-valued learning rate) falls back to a copy of the weights on
recorded steps only, released after the step. Results agree with the copy to float rounding;
with the copy, ``W_after - W_before`` in float32 itself carries a relative error of about
``eps_float32 * ||W|| / ||dW||``, which the closed form does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

#: Temporary tensors of the closed forms hold at most this fraction of the parameters' elements
#: (Adam keeps two moments per weight, so its share of model + optimiser state is a third).
CHUNK_FRACTION: dict[str, float] = {"sgd": 0.02, "adam": 0.1}
#: ... but chunks are never cut below this many elements (fewer, larger fused launches).
MIN_CHUNK: int = 1 << 12


def device_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norms of ``tensors`` as one float64 tensor on their device, with no host read.

    On the CPU the norms are taken in float32 (float64 costs 3x); tiny or infinite results are
    re-checked in float64 by the caller when the values reach the host (see ``Probe``). On an
    accelerator ``torch._foreach_norm`` with ``dtype=float64`` computes in float64 in one fused
    launch, so no re-check is needed.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    tensors = list(tensors)
    if tensors[0].device.type == "cpu":
        raw = torch._foreach_norm(tensors)
    else:
        raw = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    if all(o.dtype == raw[0].dtype for o in raw):
        return torch.stack(raw).to(torch.float64)
    return torch.stack([o.to(torch.float64) for o in raw])


def host_tensor(values: Sequence[float] | Sequence[int], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A small tensor of host values on ``dev`` (a copy that never waits for the device)."""
    t = torch.tensor(values, dtype=dtype)
    return t if dev.type == "cpu" else t.to(dev, non_blocking=True)


def _raw_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if tensors[0].device.type == "cpu":
        return list(torch._foreach_norm(tensors))
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float64))


def _chunks(tensors: Sequence[torch.Tensor], limit: int) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Cut flat views of ``tensors`` into lists of at most ``limit`` elements each.

    Returns the lists and, for every piece in order, the index of the tensor it came from.
    """
    groups: list[list[torch.Tensor]] = [[]]
    owner: list[int] = []
    size = 0
    for i, t in enumerate(tensors):
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
        group_of: dict[int, int] = {}
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                group_of[id(p)] = gi
        self.group_idx = [group_of.get(id(p), -1) for p in params]
        # "auto": the closed form where there is one; "copy": always the copy; "optimizer":
        # the closed form or an error
        self.method = "copy" if method == "copy" else self._choose()
        if method == "optimizer" and self.method == "copy":
            raise ValueError(
                f"update_ratio='optimizer': no closed-form update for {type(optimizer).__name__}"
                " with these settings (SGD without Nesterov, Adam, AdamW with float betas and a "
                "float lr have one); use update_ratio='auto' or 'copy'")
        self.limit = max(MIN_CHUNK, int(CHUNK_FRACTION.get(self.method, 0.02) * total))
        self.steps_taken = [self._initial_step(g) for g in optimizer.param_groups]
        self._copy: list[torch.Tensor] | None = None
        self._plan: tuple[Any, Any] | None = None  # Adam: cached chunk views (see _adam_plan)
        self._before: torch.Tensor | None = None
        self._had_grad: list[bool] = []
        self._scale_key: Any = None  # SGD: what the cached per-parameter rates were made for
        self._scale: torch.Tensor | None = None
        self.ready = False  # before() ran for the current step

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
        if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
            if any(isinstance(b, torch.Tensor) for g in groups for b in g["betas"]):
                return "copy"
            return "adam"
        return "copy"

    def _initial_step(self, group: dict[str, Any]) -> float:
        # read once, when the plan is made (attach time), never during training
        for p in group["params"]:
            st = self.optimizer.state.get(p, {})
            s = st.get("step")
            if s is not None:
                return float(s)
        return 0.0

    # ---- before the optimiser step --------------------------------------------------------------
    def before(self, grad_norms: torch.Tensor | None) -> None:
        """Gradients are final. ``grad_norms``: ||g|| of every parameter (0 where no gradient)."""
        self._had_grad = [p.grad is not None for p in self.params]
        self._before = None
        self.ready = True
        if self.method == "copy":
            det = [p.detach() for p in self.params]
            if self._copy is None or any(
                b.shape != q.shape or b.dtype != q.dtype or b.device != q.device
                for b, q in zip(self._copy, det, strict=True)
            ):
                self._copy = [torch.empty_like(q) for q in det]
            torch._foreach_copy_(self._copy, det)
        elif self.method == "sgd":
            groups = self.optimizer.param_groups
            glr = tuple(g.get("lr", 0.0) for g in groups)
            gwd = tuple(g.get("weight_decay", 0.0) for g in groups)
            lrs = [glr[gi] if gi >= 0 else 0.0 for gi in self.group_idx]
            wds = [gwd[gi] if gi >= 0 else 0.0 for gi in self.group_idx]
            if any(w != 0 for w in wds):
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
            out = device_norms(self._copy)
            return out
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
        if self.method == "adam":
            self.steps_taken = [t + 1 for t in self.steps_taken]

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

    def _adam_plan(self, ms: list[torch.Tensor], vs: list[torch.Tensor], ws: list[torch.Tensor],
                   idx: list[int]) -> tuple[list[list[torch.Tensor]], ...]:
        """The chunk views of Adam's state and the weights, cached while the state tensors
        and parameters keep their memory (updated in place by the optimiser): cutting ~150
        tensors into views costs as much as a pass over them."""
        key = tuple(t.data_ptr() for t in (*ms, *vs, *ws))  # (a .data swap changes it too)
        if self._plan is None or self._plan[0] != key:
            mc, owner = _chunks(ms, self.limit)
            vc, _ = _chunks(vs, self.limit)
            wc, _ = _chunks(ws, self.limit)
            # (the views keep their memory alive: no address in the key can be reused meanwhile)
            self._plan = (key, (mc, vc, wc, owner))
        return self._plan[1]

    def _adam(self) -> torch.Tensor:
        # dW = -lr * (m_hat / (sqrt(v_hat) + eps) + wd_dec * W_before). With
        # a = sqrt(bc2) / bc1 and e = eps * sqrt(bc2): m_hat / (sqrt(v_hat) + eps) =
        # a * m / (sqrt(v) + e), and W_before = (W_after + lr * that) / (1 - lr * wd_dec), so
        # ||dW|| = lr * a / (1 - lr wd_dec) * ||m / (sqrt(v) + e) + (wd_dec / a) * W_after||:
        # five passes over the state, in place on one temporary per chunk
        dev = self.params[0].device
        ms, vs, ws, idx = [], [], [], []
        e_l, wa_l, outer = [], [], []
        decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p, {})
            if not self._had_grad[i] or "exp_avg" not in st:
                continue
            g = self._group(i)
            b1, b2 = g["betas"]
            t = self.steps_taken[self.group_idx[i]]  # advance() has counted the step just taken
            lr, wd = float(g["lr"]), float(g.get("weight_decay", 0.0))
            dec = decoupled or bool(g.get("decoupled_weight_decay", False))
            wd_dec = wd if dec else 0.0
            sq = math.sqrt(1.0 - b2**t)
            a = sq / (1.0 - b1**t)
            ms.append(st["exp_avg"])
            vs.append(st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"])
            ws.append(p.detach())
            idx.append(i)
            e_l.append(float(g["eps"]) * sq)
            wa_l.append(wd_dec / a)
            outer.append(lr * a / (1.0 - lr * wd_dec))
        out = torch.zeros(len(self.params), dtype=torch.float64, device=dev)
        if not idx:
            return out
        mc, vc, wc, owner = self._adam_plan(ms, vs, ws, idx)
        piece_norms = []
        k = 0
        for m_list, v_list, w_list in zip(mc, vc, wc, strict=True):
            own = owner[k : k + len(m_list)]
            k += len(m_list)
            d = torch._foreach_sqrt(v_list)
            es = {e_l[j] for j in own}
            if len(es) == 1:
                torch._foreach_add_(d, es.pop())
            else:
                torch._foreach_add_(d, [e_l[j] for j in own])
            torch._foreach_reciprocal_(d)
            torch._foreach_mul_(d, m_list)
            was = {wa_l[j] for j in own}
            if len(was) == 1 and 0.0 not in was:
                torch._foreach_add_(d, w_list, alpha=was.pop())  # no temporary
            elif any(wa_l[j] for j in own):
                tmp = torch._foreach_mul(w_list, [wa_l[j] for j in own])
                torch._foreach_add_(d, tmp)
                del tmp
            piece_norms.append(_raw_norms(d))
            del d
        norms = _pieces_to_norms(piece_norms, owner, len(idx))
        out.index_copy_(0, host_tensor(idx, torch.long, dev), norms * host_tensor(outer, torch.float64, dev))
        return out
