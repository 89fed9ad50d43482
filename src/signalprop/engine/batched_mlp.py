"""The batched MLP of a population: forward pass, loss and hand-written backward pass of all K
members at once.

- forward: per layer one ``baddbmm`` (bias fused), the normalisation, the activation;
- backward, written by hand (no autograd graph to build and walk): per layer the fused ATen
  derivative kernel of the activation, two ``bmm`` written straight into the gradient buffer's
  views, a bias reduction.

What the backward pass needs from the forward pass is a typed :class:`ForwardCache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from signalprop.engine.reference import BN_MOMENTUM, NORM_EPS

#: Marks a value not computed yet (``None`` is a valid result: all gains are 1).
_UNSET: Any = object()


@dataclass
class NormCache:
    """One normalisation's forward values its backward needs."""

    zhat: torch.Tensor  #: the normalised input (before the gain and bias)
    rstd: torch.Tensor  #: 1 / sqrt(var + eps)
    dim: int  #: the dimension normalised over (1: batch norm over the batch; -1: layer norm)


@dataclass
class RbfCache:
    """The RBF layer's forward values: squared distances, outputs, 1 / (2 width^2)."""

    d2: torch.Tensor
    out: torch.Tensor
    inv: torch.Tensor


@dataclass
class LayerCache:
    """One hidden block's forward values."""

    a: torch.Tensor  #: the block's input
    u: torch.Tensor | None = None  #: the activation's input (after a pre-norm)
    phi: torch.Tensor | None = None  #: the activation's output
    act_out: torch.Tensor | None = None  #: phi times the activation gain
    norm: NormCache | None = None  #: the block's normalisation, if any


@dataclass
class ForwardCache:
    """What :meth:`_BatchedMLP._forward` leaves for the backward pass and the probes."""

    x: torch.Tensor  #: the input [K, B, in]
    z: dict[str, torch.Tensor] = field(default_factory=dict)  #: module outputs (``keep=True``)
    layers: list[LayerCache] = field(default_factory=list)
    rbf: RbfCache | None = None
    h_last: torch.Tensor | None = None  #: the last hidden block's output
    out: torch.Tensor | None = None  #: the output [K, B, O]

    def __getitem__(self, name: str) -> Any:
        # read access by field name, as when the cache was a dict (tests index cache["z"])
        return getattr(self, name)


class _BatchedMLP:
    """Part of :class:`~signalprop.engine.population.Population`: forward, loss, backward."""

    def _norm_fwd(self, t: torch.Tensor, i: int, train: bool) -> tuple[torch.Tensor, NormCache]:
        a = self.arch
        if a.norm == "batch":
            rm = self.running[f"layers.{i}.norm.running_mean"]
            rv = self.running[f"layers.{i}.norm.running_var"]
            if train:
                var, mu = torch.var_mean(t, dim=1, keepdim=True, unbiased=False)
                b = t.shape[1]
                # torch's running averages: the variance is the unbiased one
                rm.mul_(1 - BN_MOMENTUM).add_(mu, alpha=BN_MOMENTUM)
                rv.mul_(1 - BN_MOMENTUM).add_(var, alpha=BN_MOMENTUM * b / max(b - 1, 1))
            else:
                mu, var = rm, rv
            dim = 1
        else:
            var, mu = torch.var_mean(t, dim=-1, keepdim=True, unbiased=False)
            dim = -1
        rstd = torch.rsqrt(var + NORM_EPS)
        zhat = (t - mu) * rstd
        c = NormCache(zhat, rstd, dim)
        if a.norm_affine:
            return torch.addcmul(
                self.params[f"layers.{i}.norm.bias"], zhat, self.params[f"layers.{i}.norm.weight"]
            ), c
        return zhat, c

    def _through_norm(self, d: torch.Tensor, i: int, c: Any, probe: dict | None) -> torch.Tensor:
        """Back through layer ``i``'s norm (pre or post): record the gradient at its output, then
        propagate it."""
        if probe is not None:
            probe[(f"layers.{i}.norm", "out_grad_norm")] = _knorm(d)
        return self._norm_bwd(d, i, c.norm)

    def _norm_bwd(self, dy: torch.Tensor, i: int, c: NormCache | None) -> torch.Tensor:
        assert c is not None  # a normalised layer's forward always leaves its cache
        zhat, rstd, dim = c.zhat, c.rstd, c.dim
        if self.arch.norm_affine:
            n = f"layers.{i}.norm"
            torch.sum(dy * zhat, dim=1, keepdim=True, out=self.grads[f"{n}.weight"])
            torch.sum(dy, dim=1, keepdim=True, out=self.grads[f"{n}.bias"])
            dzh = dy * self.params[f"{n}.weight"]
        else:
            dzh = dy
        # d/dz of (z - mean)/std (Ioffe & Szegedy 2015, section 3):
        # rstd * (dzh - mean(dzh) - zhat * mean(dzh * zhat))
        m1 = dzh.mean(dim=dim, keepdim=True)
        m2 = (dzh * zhat).mean(dim=dim, keepdim=True)
        return (dzh - m1).sub_(zhat * m2).mul_(rstd)

    def _scale(self) -> torch.Tensor | None:
        """The activation gains [K, 1, 1], or ``None`` when every member's is 1 (computed once)."""
        if self._act_scale_view is _UNSET:
            s = self.act_scale
            self._act_scale_view = (
                None
                if bool((s == 1.0).all())
                else s.to(self.device, self.dtype).view(self.K, 1, 1)
            )
        return self._act_scale_view

    def _forward(self, x: torch.Tensor, train: bool, keep: bool = False) -> ForwardCache:
        """Forward pass of all members on x [K, B, in]. Returns the cache (``out`` [K, B, O])."""
        a, P = self.arch, self.params
        scale = self._scale()
        cache = ForwardCache(x)
        h = x
        if a.rbf:
            c, w = P["rbf.centres"], P["rbf.widths"]
            d2 = torch.baddbmm((c * c).sum(-1).unsqueeze(1), h, c.transpose(1, 2), alpha=-2.0)
            d2 = d2.add_((h * h).sum(-1, keepdim=True)).clamp_min_(0)
            inv = 0.5 / (w * w)
            out = torch.exp(-d2 * inv)
            cache.rbf = RbfCache(d2, out, inv)
            if keep:
                cache.z["rbf"] = out
            h = out
        for i in range(a.depth):
            c = LayerCache(a=h)
            pre = a.norm != "none" and a.norm_position == "pre"
            bias, weight = self._lin[i][0], self._lin[i][1]
            if self.fast is not None and not pre:
                # fold the fast form's input scale into the matmul: s*z = baddbmm(.., s, s)
                s = self.act.fast_scale
                zs = torch.baddbmm(bias, h, weight, beta=s, alpha=s)
                if keep:
                    cache.z[f"layers.{i}.linear"] = zs / s
                u = zs  # consumed in place: the backward of a fast activation uses h only
                phi = self.fast(zs)
            else:
                z = torch.baddbmm(bias, h, weight)
                if keep:
                    cache.z[f"layers.{i}.linear"] = z
                u = z
                if pre:
                    u, c.norm = self._norm_fwd(z, i, train)
                    if keep:
                        cache.z[f"layers.{i}.norm"] = u
                if self.fast is not None:
                    phi = self.fast(u * self.act.fast_scale)
                else:
                    phi = self.act.forward(u)
            c.u, c.phi = u, phi
            out = phi if scale is None else phi * scale
            c.act_out = out
            if a.norm != "none" and a.norm_position == "post":
                out, c.norm = self._norm_fwd(out, i, train)
                if keep:
                    cache.z[f"layers.{i}.norm"] = out
            h = h + out if (a.residual and i > 0) else out
            cache.layers.append(c)
        cache.h_last = h
        out = torch.baddbmm(P["head.bias"], h, P["head.weight"])
        cache.out = out
        if keep:
            cache.z["head"] = out
        return cache

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean loss [K] and d(loss_k)/d(out) [K, B, O]."""
        B = out.shape[1]
        if self.arch.task == "classification":
            logp = torch.log_softmax(out, dim=-1)
            loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=1)
            d = logp.exp_()
            d.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(d[..., :1], -1.0))
            return loss, d.div_(B)
        diff = out - y
        loss = diff.square().mean(dim=(1, 2))
        return loss, diff.mul_(2.0 / diff[0].numel())

    def _backward(self, cache: ForwardCache, dout: torch.Tensor, probe: dict | None) -> None:
        """Write every member's gradients into ``self.grad`` (no autograd)."""
        a, P, G = self.arch, self.params, self.grads
        scale = self._scale()
        h = cache.h_last
        torch.bmm(h.transpose(1, 2), dout, out=G["head.weight"])
        torch.sum(dout, dim=1, keepdim=True, out=G["head.bias"])
        if probe is not None:
            probe[("head", "out_grad_norm")] = _knorm(dout)
        da = torch.bmm(dout, P["head.weight"].transpose(1, 2))
        for i in reversed(range(a.depth)):
            c = cache.layers[i]
            d_out = da
            if a.norm != "none" and a.norm_position == "post":
                d_out = self._through_norm(d_out, i, c, probe)
            if probe is not None:
                probe[(f"layers.{i}.act", "out_grad_norm")] = _knorm(d_out)
            dphi = d_out if scale is None else d_out * scale
            du = self.act.backward(dphi, c.u, c.phi)
            if a.norm != "none" and a.norm_position == "pre":
                du = self._through_norm(du, i, c, probe)
            if probe is not None:
                probe[(f"layers.{i}.linear", "out_grad_norm")] = _knorm(du)
            _, _, weight_t, g_weight, g_bias = self._lin[i]
            torch.bmm(c.a.transpose(1, 2), du, out=g_weight)
            torch.sum(du, dim=1, keepdim=True, out=g_bias)
            if i > 0 or a.rbf:
                nda = torch.bmm(du, weight_t)
                if a.residual and i > 0:
                    nda.add_(da)
                da = nda
        if a.rbf:
            assert cache.rbf is not None
            d2, out, inv = cache.rbf.d2, cache.rbf.out, cache.rbf.inv
            if probe is not None:
                probe[("rbf", "out_grad_norm")] = _knorm(da)
            e = da * out  # dL/d(exponent) up to sign
            c, w = P["rbf.centres"], P["rbf.widths"]
            # h = exp(-d2 / (2 w^2)):  dh/dw = h d2 / w^3,  dh/dd2 = -h / (2 w^2)
            torch.sum(e * d2, dim=1, keepdim=True, out=G["rbf.widths"])
            G["rbf.widths"].div_(w * w * w)
            dd2 = e.mul_(-inv)
            # d2 = |c|^2 - 2 x.c + |x|^2:  dd2/dc_j = 2 c_j - 2 x
            gc = G["rbf.centres"]
            torch.bmm(dd2.transpose(1, 2), cache.x, out=gc)
            gc.mul_(-2.0).add_(c * (2.0 * dd2.sum(dim=1).unsqueeze(-1)))


def _knorm(t: torch.Tensor) -> torch.Tensor:
    """Per-member L2 norm of [K, ...]."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)
