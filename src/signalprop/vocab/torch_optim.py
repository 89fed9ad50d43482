"""Optimisers torch lacks (the torch face of some entries of the optimiser vocabulary).

- :class:`SMORMS3` (Simon Funk 2015, "RMSprop loses to SMORMS3 - Beware the Epsilon!").
- :class:`VSGD` (Schaul, Zhang & LeCun 2013, "No More Pesky Learning Rates"; finite-difference
  curvature from Schaul & LeCun 2013, "Adaptive learning rates and parallelization ...").
- :class:`LARS` (You, Gitman & Ginsburg 2017): a per-layer trust ratio ||w|| / ||g||.

Their names, default hyper-parameters and learning rates are registered in
:data:`signalprop.vocab.optimizers.OPTIMIZERS` (with :func:`~signalprop.vocab.optimizers.layerwise`,
which needs the registry for its base optimiser).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from signalprop._registry import unknown_name_message

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class SMORMS3(Optimizer):
    """SMORMS3 (squared mean over root mean squared, cubed), exactly as published by Simon Funk.

    Per element, state mem = 1, g = 0, g2 = 0; each step with gradient ``grad``::

        r   = 1 / (mem + 1)
        g   = (1 - r) g  + r grad
        g2  = (1 - r) g2 + r grad^2
        x   = g^2 / (g2 + eps)
        w  -= grad * min(lr, x) / (sqrt(g2) + eps)
        mem = 1 + mem (1 - x)

    The memory ``mem`` shortens when the gradient is consistent (x near 1) and grows when it is
    noise (x near 0), and min(lr, x) caps the step by the signal-to-noise ratio.

    Args:
        params: Parameters or parameter groups.
        lr: Maximum learning rate (default 1e-3).
        eps: Tiny constant (default 1e-16, as in the original; the point of the post is that a
            large epsilon hurts).
    """

    def __init__(self, params: Params, lr: float = 1e-3, eps: float = 1e-16) -> None:
        if not lr > 0:
            raise ValueError(f"SMORMS3 needs lr > 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"SMORMS3 needs eps >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("SMORMS3 does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["mem"] = torch.ones_like(p)
                    st["g"] = torch.zeros_like(p)
                    st["g2"] = torch.zeros_like(p)
                mem, g, g2 = st["mem"], st["g"], st["g2"]
                r = 1.0 / (mem + 1.0)
                g.mul_(1.0 - r).add_(r * grad)
                g2.mul_(1.0 - r).add_(r * grad * grad)
                x = g * g / (g2 + eps)
                p.sub_(grad * torch.clamp(x, max=lr) / (g2.sqrt() + eps))
                mem.copy_(1.0 + mem * (1.0 - x))
        return loss


def _refuse(bad: bool, needs: str, **got: Any) -> None:
    """Raise "``needs``; got k=v, ..." when ``bad`` (an optimiser's hyper-parameter check)."""
    if bad:
        raise ValueError(f"{needs}; got " + ", ".join(f"{k}={v}" for k, v in got.items()))


class VSGD(Optimizer):
    """vSGD: per-parameter learning rates from running estimates (Schaul, Zhang & LeCun 2013).

    The optimal rate of a noisy quadratic, eta* = E[g]^2 / (h E[g^2]), estimated per element with
    running averages over an adaptive memory tau (their Algorithm 1, "vSGD-l")::

        gbar  <- (1 - 1/tau) gbar  + g / tau          (mean gradient)
        vbar  <- (1 - 1/tau) vbar  + g^2 / tau        (mean squared gradient)
        hbar  <- (1 - 1/tau) hbar  + h / tau          (mean curvature)
        vhbar <- (1 - 1/tau) vhbar + h^2 / tau        (mean squared curvature)
        eta   = lr * (gbar^2 / vbar) * (hbar / vhbar)
        tau   <- (1 - gbar^2 / vbar) tau + 1
        w     <- w - eta * g

    Curvature h (our choice, stated as asked). The paper's bbprop diagonal-Hessian estimate needs
    a second backward pass through a modified network, which a generic torch model does not
    offer. We use the bbprop-free finite-difference estimate of Schaul & LeCun 2013 ("vSGD-fd"):
    h = |g(w) - g(w + delta)| / |delta| elementwise, and, as they do, the ratio hbar / vhbar
    (= 1/h for a noise-free h, smaller when h is noisy) in place of 1/hbar. Two ways to get the
    second gradient:

    - ``curvature="secant"`` (default; no closure, one backward per step): the difference along
      the last *update*, h = |g_t - g_{t-1}| / |w_t - w_{t-1}| (the variant of AdaSecant,
      Gulcehre et al. 2014). Mini-batch noise in g_t - g_{t-1} inflates h, which only makes
      steps more cautious. The first step, before any curvature is known, is a plain SGD step of
      size ``init_lr``.
    - ``curvature="fd"`` (needs ``step(closure)`` evaluating the *same* mini-batch): the paper's
      difference along delta = gbar, at the cost of a second forward/backward per step.

    Initial statistics follow the authors' code's "slow start": vbar and vhbar start at
    ``slow_start`` times the first sample's square (overestimated variance: short steps), tau = 2.

    Args:
        params: Parameters or groups.
        lr: Multiplier on the adapted rate (1.0: the paper's hyper-parameter-free rule).
        curvature: ``"secant"`` or ``"fd"``.
        init_lr: SGD step size of the first step in secant mode.
        slow_start: C >= 1, the overestimation factor of the initial variances.
        eps: Floor added to the second moments.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1.0,
        curvature: str = "secant",
        init_lr: float = 1e-3,
        slow_start: float = 2.0,
        eps: float = 1e-12,
    ) -> None:
        if curvature not in ("secant", "fd"):
            raise ValueError(unknown_name_message("vSGD curvature", curvature, ["fd", "secant"]))
        _refuse(not lr > 0 or not init_lr > 0 or slow_start < 1 or eps <= 0,
                "vSGD needs lr > 0, init_lr > 0, slow_start >= 1, eps > 0",
                lr=lr, init_lr=init_lr, slow_start=slow_start, eps=eps)
        super().__init__(params, dict(lr=lr, curvature=curvature, init_lr=init_lr,
                                      slow_start=slow_start, eps=eps))

    def _params(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _fd_curvature(self, closure: Callable[[], Any]) -> dict[torch.Tensor, torch.Tensor]:
        # h = |g(w + delta) - g(w)| / |delta| on the same mini-batch, delta = gbar (first step: g)
        items = self._params()
        grads = {p: p.grad.detach().clone() for _, p in items}
        deltas = {}
        for group, p in items:
            st = self.state[p]
            d = (st["gbar"] if "gbar" in st else grads[p]).clone()
            # keep |delta| away from 0 without changing its sign
            d = torch.where(d >= 0, d + group["eps"] ** 0.5, d - group["eps"] ** 0.5)
            deltas[p] = d
            p.add_(d)
            p.grad = None  # the closure's backward must not add to the first gradient
        with torch.enable_grad():
            closure()
        hs = {}
        for _, p in items:
            g2 = p.grad if p.grad is not None else torch.zeros_like(p)
            hs[p] = (g2 - grads[p]).abs() / deltas[p].abs()
            p.sub_(deltas[p])
            p.grad = grads[p]
        return hs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        fd = any(g["curvature"] == "fd" for g in self.param_groups)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif fd:
            raise ValueError(
                "vSGD(curvature='fd') needs step(closure) that re-evaluates the same mini-batch "
                "(zero_grad, forward, backward, return loss); use curvature='secant' otherwise"
            )
        hs = self._fd_curvature(closure) if fd and closure is not None else {}
        for group, p in self._params():
            self._update(group, p, hs.get(p))
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor, h_fd: torch.Tensor | None) -> None:
        """One parameter's step (``h_fd``: its finite-difference curvature in ``fd`` mode)."""
        g = p.grad
        st = self.state[p]
        eps, c = group["eps"], group["slow_start"]
        if group["curvature"] == "fd":
            h = h_fd
        elif "prev_p" in st:
            dp = p - st["prev_p"]
            # a step below a few ulps of w is mostly rounding (or was absorbed entirely):
            # no curvature from it; those elements keep their running estimate
            ok = dp.abs() > torch.clamp(8 * torch.finfo(p.dtype).eps * p.abs(), min=1e-30)
            h = torch.where(ok, (g - st["prev_g"]).abs() / torch.where(ok, dp.abs(), 1.0),
                            torch.full_like(g, float("nan")))
        else:
            h = None
        fresh_g = "gbar" not in st
        if fresh_g:
            st["gbar"] = g.clone()
            st["vbar"] = c * (g * g + eps)
            st["tau"] = torch.full_like(g, 2.0)
        if h is None:
            # secant mode, first step: no curvature yet -> a small plain SGD step
            st["prev_g"], st["prev_p"] = g.clone(), p.clone()
            p.sub_(group["init_lr"] * g)
            return
        valid = ~torch.isnan(h)
        hv = torch.nan_to_num(h, nan=0.0)
        fresh_h = "hbar" not in st
        if fresh_h:
            st["hbar"] = hv.clone()
            st["vhbar"] = c * (hv * hv) + eps
        f = 1.0 / st["tau"]
        if not fresh_g:  # a fresh average already holds this sample
            st["gbar"].mul_(1 - f).add_(f * g)
            st["vbar"].mul_(1 - f).add_(f * (g * g) + eps)
        if not fresh_h:
            st["hbar"].copy_(torch.where(valid, (1 - f) * st["hbar"] + f * hv, st["hbar"]))
            st["vhbar"].copy_(
                torch.where(valid, (1 - f) * st["vhbar"] + f * hv * hv, st["vhbar"])
            )
        st["step"] = st.get("step", 0) + 1
        vpart = st["gbar"] ** 2 / st["vbar"]
        hpart = st["hbar"] / (st["vhbar"] + eps)
        rate = group["lr"] * vpart * hpart
        st["tau"].mul_(1 - vpart).add_(1.0)
        if group["curvature"] == "secant":
            st["prev_g"], st["prev_p"] = g.clone(), p.clone()
        p.sub_(rate * g)


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, Algorithm 1).

    Per parameter tensor w with gradient g::

        local_lr = trust * ||w|| / (||g|| + weight_decay ||w||)     (1 when either norm is 0)
        v <- momentum v + lr * local_lr * (g + weight_decay w)
        w <- w - v

    Every layer moves by about ``lr * trust`` of its own norm per step whatever the size of its
    gradient: a vanishing first-layer gradient no longer means a frozen first layer.
    1-d parameters (biases, norm gains) are not adapted when ``exclude_vectors``.

    Args:
        params: Parameters or groups.
        lr: Global rate (default 1.0: each layer moves ~``trust`` of its norm per step).
        momentum: Heavy-ball momentum (default 0.9).
        weight_decay: L2 coefficient.
        trust: The trust coefficient eta (default 0.01).
        exclude_vectors: Use local_lr = 1 for 1-d parameters (and a plain ``lr * trust`` rate).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust: float = 0.01,
        exclude_vectors: bool = True,
    ) -> None:
        _refuse(not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0 or not trust > 0,
                "LARS needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, trust > 0",
                lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust=trust, exclude_vectors=exclude_vectors))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, trust = group["weight_decay"], group["momentum"], group["trust"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.dim() <= 1 and group["exclude_vectors"]:
                    local = torch.tensor(trust, device=p.device, dtype=p.dtype)
                    d = g
                else:
                    wn, gn = p.norm(), g.norm()
                    ok = (wn > 0) & (gn > 0)
                    ratio = trust * wn / torch.where(ok, gn + wd * wn, torch.ones_like(gn))
                    local = torch.where(ok, ratio, torch.ones_like(ratio))
                    d = g.add(p, alpha=wd) if wd else g
                upd = group["lr"] * local * d
                st = self.state[p]
                if mom:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = upd.clone()
                    else:
                        buf.mul_(mom).add_(upd)
                    upd = buf
                p.sub_(upd)
        return loss


def depth_groups(model: nn.Module) -> list[list[torch.nn.Parameter]]:
    """Trainable parameters grouped by the module owning them, in registration order."""
    groups = []
    for m in model.modules():
        ps = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if ps:
            groups.append(ps)
    return groups
