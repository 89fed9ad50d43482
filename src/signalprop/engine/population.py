"""A population of K same-shaped MLPs trained in one batched computation.

Every parameter is stored stacked over the members (a hidden weight is ``[K, fan_in, fan_out]``),
and all of them live in one flat buffer (layer-major: each parameter a contiguous ``[K, ...]``
block), with the gradients in a second buffer of the same layout. One training step is:

- forward: per layer one ``baddbmm`` (bias fused), the normalisation, the activation;
- backward, written by hand (no autograd graph to build and walk): per layer the fused ATen
  derivative kernel of the activation, two ``bmm`` written straight into the gradient buffer's
  views, a bias reduction;
- clipping and the optimiser update: a few element-wise ops over the *whole* flat buffer
  (:mod:`signalprop.engine.optim`), whatever the depth;
- per-member bookkeeping: the loss of every member, and divergence by the package's one policy
  (:func:`signalprop.train.divergence_reason`: a non-finite loss or gradient, or a loss above
  ``DIVERGE_FACTOR x max(L0, 1)`` with L0 the member's own first loss); a diverging member is
  frozen before its update, never updated again, and marked with that step and the reason.

Per-member hyper-parameters (learning rate, momentum, weight decay, optimiser constants, clip
threshold, activation gain) are tensors over the members, expanded once to the flat layout.

Probes (the metrics of :mod:`signalprop.record`) are computed on the recorded steps only, for all
members at once with the batched kernels of :mod:`signalprop.stats`, and moved to the host in one
transfer per recorded step.
"""

from __future__ import annotations

from typing import Any

import torch

from signalprop import stats
from signalprop._registry import check_choice
from signalprop.engine.activations import get_activation
from signalprop.engine.batched_mlp import _UNSET, ForwardCache, _BatchedMLP
from signalprop.engine.clipping import AGC_EPS, CLIP_DEFAULTS, CLIPS, _Clipper
from signalprop.engine.fit import (
    BatchSampler,
    FitResult,
    _Fitting,
    _grad_ratios,
    divergence_policy,
    member_batches,
)
from signalprop.engine.initialise import INITS, LSUV_MAX_ITER, LSUV_TOL, _Initialiser
from signalprop.engine.layout import TASKS, Arch, ParamSpec, _as_member_tensor, _Layout
from signalprop.engine.optim import OPTIMIZERS, make_optimizer
from signalprop.engine.reference import MLP
from signalprop.record import MODEL

# the names this module defined before it was split by responsibility (they are public)
__all__ = [
    "AGC_EPS", "CLIPS", "CLIP_DEFAULTS", "INITS", "LSUV_MAX_ITER", "LSUV_TOL", "TASKS", "Arch",
    "BatchSampler", "FitResult", "ParamSpec", "Population", "_as_member_tensor", "_grad_ratios",
    "member_batches",
]


class Population(_Layout, _Initialiser, _BatchedMLP, _Clipper, _Fitting):
    """K MLPs of one architecture with stacked parameters, trained together.

    Args:
        arch: The shared :class:`Arch`.
        size: Number of members K.
        optimizer: ``sgd | rmsprop | adam | rprop | smorms3``.
        hparams: Optimiser hyper-parameters by name (``lr``, ``momentum``, ``weight_decay``,
            ``beta1`` ...): a float (all members) or K values. Missing ones take the optimiser's
            defaults (:data:`signalprop.engine.optim.OPTIMIZERS`).
        clip: ``none | norm | value | agc``; clip_threshold: a float or K values (``None``: the
            default of the kind).
        act_scale: Gain a of the scaled activation a*phi: a float or K values.
        dtype: ``torch.float32`` or ``torch.float64``. device: where everything lives.
        fast_math: Use an activation's faster float32 form where it has one (tanh as
            2 sigmoid(2z) - 1, absolute error <= 1.8e-7). Default: on for float32 on the CPU.

    Example:
        >>> from signalprop.data import load_dataset
        >>> pop = Population(Arch(64, 10, depth=3, width=32), 4, hparams={"lr": [0.01, 0.1, 0.3, 1]})
        >>> _ = pop.init_(seeds=[0, 1, 2, 3])
        >>> out = pop.fit(load_dataset("digits"), steps=100, batch_size=64, seeds=[0, 1, 2, 3])
        >>> out.losses.shape, out.diverged_step
        ((100, 4), [None, None, None, None])
    """

    def __init__(
        self,
        arch: Arch,
        size: int,
        *,
        optimizer: str = "sgd",
        hparams: dict[str, Any] | None = None,
        clip: str = "none",
        clip_threshold: Any = None,
        act_scale: Any = 1.0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        fast_math: bool | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"population size must be >= 1, got {size}")
        self.arch, self.K = arch, int(size)
        self.device = torch.device(device)
        self.dtype = dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.act = get_activation(arch.activation)
        if fast_math is None:  # a CPU-only win (torch's CPU tanh is the slow one)
            fast_math = dtype == torch.float32 and self.device.type == "cpu"
        self.fast = self.act.fast if fast_math else None
        self.optimizer_name = OPTIMIZERS.entry(optimizer).name
        self.clip = check_choice("clip", clip, CLIPS)
        defaults = OPTIMIZERS.defaults(optimizer)
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {unknown} for optimizer {optimizer!r}; "
                f"valid: {', '.join(sorted(defaults))}"
            )
        self.hparams = {
            k: _as_member_tensor(hparams.get(k, d) if hparams.get(k) is not None else d, self.K, k)
            for k, d in defaults.items()
        }
        ct = CLIP_DEFAULTS[self.clip] if clip_threshold is None else clip_threshold
        self.clip_threshold = _as_member_tensor(ct, self.K, "clip_threshold")
        self.act_scale = _as_member_tensor(act_scale, self.K, "act_scale")
        self._build_params()
        self.active = torch.ones(self.K, dtype=torch.bool, device=self.device)
        self.diverged_step: list[int | None] = [None] * self.K
        self.diverged_reason: list[str | None] = [None] * self.K
        #: The divergence policy's loss bound (``None``: non-finite values only); ``fit`` sets it.
        self.diverge_factor: float | None = divergence_policy().DIVERGE_FACTOR
        self.initial_loss: torch.Tensor | None = None  # per member, the first step's loss (L0)
        self.step_count = 0
        self._opt = None
        self._hp_cache: dict[str, Any] = {}  # hyper-parameter name -> its flat-layout value
        self._act_scale_view: torch.Tensor | None = _UNSET

    def _hp(self, name: str, v: torch.Tensor) -> Any:
        if name not in self._hp_cache:
            self._hp_cache[name] = self.expand(v)
        return self._hp_cache[name]

    def _optimizer(self):
        if self._opt is None:
            hp = {k: self._hp(k, v) for k, v in self.hparams.items()}
            layout = (self.K, [(s.offset, s.numel) for s in self.specs])
            self._opt = make_optimizer(self.optimizer_name, self.flat, hp, layout)
        return self._opt

    # ---- training ------------------------------------------------------------------------
    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, probe: bool = False
    ) -> tuple[torch.Tensor, dict | None]:
        """One optimiser step of every active member on x [K, B, in], y [K, B] (or [K, B, O]).

        Returns:
            (loss [K] before the step, probe values {(layer, metric): [K]} or None).

        A member whose step the divergence policy rejects (:meth:`_apply_divergence_policy`) is
        frozen before the update: its parameters stay those that gave this step's loss.
        """
        # batch-norm running statistics are frozen with the member's parameters
        saved_running = {n: v.clone() for n, v in self.running.items()}
        cache = self._forward(x, train=True, keep=probe)
        loss, dout = self._loss(cache.out, y)
        pr: dict | None = {} if probe else None
        if pr is not None:
            self._probe_forward(cache, loss, y, pr)
        self._backward(cache, dout, pr)
        # the gradients as backward left them (before clipping): the probe's grad_norm, the
        # divergence policy's finiteness test and the norm clip's total, from one reduction
        gn = self.member_norms(self.grad)
        any_frozen = self._apply_divergence_policy(loss, gn)
        frozen = ~self.active
        if any_frozen:
            for n, v in self.running.items():
                v.copy_(torch.where(frozen.view(-1, 1, 1), saved_running[n], v))
        self._clip_(gn)
        if pr is not None:
            for j, s in enumerate(self.specs):
                pr[(s.name, "grad_norm")] = gn[j]
            pr[(MODEL, "grad_norm_total")] = gn.square().sum(0).sqrt()
            if self.clip != "none":  # as the probe does when a loop clips in place
                pr[(MODEL, "grad_norm_total_clipped")] = (
                    self.member_norms(self.grad).square().sum(0).sqrt())
            before = self.flat.clone()
        if any_frozen:
            fmask = torch.repeat_interleave(frozen.repeat(len(self.specs)), self._seg_len)
            keep_vals = self.flat[fmask]
        self._optimizer().step(self.flat, self.grad)
        if any_frozen:
            self.flat[fmask] = keep_vals
        if pr is not None:
            wn = self.member_norms(before)
            dn = self.member_norms(self.flat - before)
            ratio = dn / wn.clamp_min(1e-30)  # the probe's definition (a zero bias: not inf)
            for j, s in enumerate(self.specs):
                pr[(s.name, "weight_norm")] = wn[j]
                pr[(s.name, "update_ratio")] = ratio[j]
        self.step_count += 1
        return loss, pr

    def _probe_forward(
        self, cache: ForwardCache, loss: torch.Tensor, y: torch.Tensor, pr: dict
    ) -> None:
        a = self.arch
        pr[(MODEL, "loss")] = loss
        if a.task == "classification":
            pr[(MODEL, "accuracy")] = (cache.out.argmax(-1) == y).to(loss.dtype).mean(1)
        for name, t in cache.z.items():
            mean, std = stats.moments(t)
            pr[(name, "out_mean")], pr[(name, "out_std")] = mean, std
            if name != "head":
                q = stats.percentiles(t)
                for j, qq in enumerate(stats.PERCENTILES):
                    pr[(name, stats.percentile_key(qq))] = q[:, j]
        kind = a.activation
        for i, c in enumerate(cache.layers):
            n = f"layers.{i}.act"
            mean, std = stats.moments(c.act_out)
            pr[(n, "out_mean")], pr[(n, "out_std")] = mean, std
            if kind in stats.SATURATING:
                uses_out = stats.SATURATING[kind][0]
                pr[(n, "saturated_frac")] = stats.saturated_fraction(
                    c.phi if uses_out else c.u, kind
                )
            if kind in stats.RECTIFIERS:
                pr[(n, "dead_frac")] = stats.dead_fraction(c.phi, batch_dim=1)

    def member_module(self, k: int) -> MLP:
        """Member ``k`` as a standalone :class:`MLP` (a copy of its current parameters and
        batch-norm running statistics, float64 or float32 as the population)."""
        m = self.arch.module(float(self.act_scale[k])).to(self.dtype)
        sd = {}
        for s in self.specs:
            v = self.params[s.name][k].detach().cpu()
            if s.name.endswith("linear.weight") or s.name == "head.weight":
                v = v.T  # nn.Linear stores [fan_out, fan_in]
            sd[s.name] = v.reshape(s.torch_shape).clone()
        for n, v in self.running.items():
            sd[n] = v[k].reshape(-1).cpu().clone()
        missing = m.load_state_dict(sd, strict=False)
        bad = [x for x in missing.missing_keys if not x.endswith("num_batches_tracked")]
        if bad or missing.unexpected_keys:
            raise RuntimeError(f"state mismatch: missing {bad}, unexpected {missing.unexpected_keys}")
        return m
