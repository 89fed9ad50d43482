"""Initialisation of a population's members: each from its own generator, five schemes plus LSUV."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from signalprop._registry import check_choice
from signalprop.engine.layout import _as_member_tensor
from signalprop.vocab.inits import INITS as VOCAB_INITS
from signalprop.vocab.inits import LSUV_MAX_ITER, LSUV_TOL, init

#: The schemes the engine implements: a view of the initialisation vocabulary (aliases ``he``,
#: ``gaussian`` resolve to ``kaiming``, ``lecun``).
INITS = tuple(n for n in VOCAB_INITS if init(n).engine)

if TYPE_CHECKING:  # the annotation of init_'s return (Population is built from this mixin)
    from signalprop.engine.population import Population


class _Initialiser:
    """Part of :class:`~signalprop.engine.population.Population`: ``init_`` and LSUV."""

    @torch.no_grad()
    def init_(
        self,
        seeds: Sequence[int],
        init: str | Sequence[str] = "lecun",
        init_scale: Any = 1.0,
        bias_std: Any = 0.0,
        data_x: torch.Tensor | None = None,
    ) -> Population:
        """Initialise every member from its own generator (seeded ``2*seed``), in place.

        Weights: ``lecun`` std 1/sqrt(fan_in), ``xavier`` sqrt(2/(fan_in+fan_out)), ``kaiming``
        sqrt(2/fan_in) (Glorot & Bengio 2010; He et al. 2015), ``orthogonal`` (Saxe et al. 2013),
        each times ``init_scale``; ``lsuv`` (Mishkin & Matas 2016): orthogonal, then each layer
        (head included) rescaled until the variance of its output on ``data_x`` is within
        :data:`LSUV_TOL` of ``init_scale**2`` (at most :data:`LSUV_MAX_ITER` passes). Biases
        ~ N(0, bias_std^2). Norm gains 1, biases 0. RBF centres ~ N(0, 1), widths sqrt(in).

        Args:
            seeds: K seeds. init: a scheme or K schemes. init_scale, bias_std: float or K values.
            data_x: [N, in] inputs, required for ``lsuv``.
        """
        K = self.K
        if len(seeds) != K:
            raise ValueError(f"expected {K} seeds, got {len(seeds)}")
        inits = [init] * K if isinstance(init, str) else list(init)
        if len(inits) != K:
            raise ValueError(f"expected one init or {K}, got {len(inits)}")
        inits = [VOCAB_INITS.canonical(s) if s in VOCAB_INITS else s for s in inits]
        for s in inits:
            check_choice("init", s, INITS)
        scale = _as_member_tensor(init_scale, K, "init_scale")
        bstd = _as_member_tensor(bias_std, K, "bias_std")
        for k in range(K):
            g = torch.Generator().manual_seed(2 * int(seeds[k]))
            for s in self.specs:
                p = self.params[s.name]
                if s.name == "rbf.centres":
                    val = torch.randn(s.shape, generator=g, dtype=torch.float64)
                elif s.name == "rbf.widths":
                    val = torch.full(s.shape, self.arch.in_features**0.5, dtype=torch.float64)
                elif s.name.endswith("norm.weight"):
                    val = torch.ones(s.shape, dtype=torch.float64)
                elif s.name.endswith("norm.bias"):
                    val = torch.zeros(s.shape, dtype=torch.float64)
                elif s.name.endswith(".bias"):
                    val = torch.randn(s.shape, generator=g, dtype=torch.float64) * float(bstd[k])
                else:
                    val = self._init_weight(s.shape, inits[k], float(scale[k]), g)
                p[k].copy_(val.to(p.dtype))
        self._fix_lsuv(inits, scale, data_x)
        return self

    @staticmethod
    def _init_weight(shape: tuple[int, ...], scheme: str, scale: float, g: torch.Generator):
        fi, fo = shape
        if scheme in ("orthogonal", "lsuv"):
            w = torch.empty(fo, fi, dtype=torch.float64)
            torch.nn.init.orthogonal_(w, gain=1.0, generator=g)
            return w.T * (scale if scheme == "orthogonal" else 1.0)
        std = init(scheme).std(fi, fo)  # type: ignore[misc] (the Gaussian schemes have one)
        return torch.randn(fi, fo, generator=g, dtype=torch.float64) * (std * scale)

    def _fix_lsuv(self, inits: list[str], scale: torch.Tensor, data_x: torch.Tensor | None) -> None:
        mask = torch.tensor([s == "lsuv" for s in inits], device=self.device)
        if not bool(mask.any()):
            return
        if data_x is None:
            raise ValueError("init='lsuv' needs a data batch (data_x)")
        x = data_x.to(self.device, self.dtype)[: min(len(data_x), 512)]
        target = scale.to(self.device, self.dtype) ** 2
        names = [f"layers.{i}.linear" for i in range(self.arch.depth)] + ["head"]
        for name in names:
            w = self.params[f"{name}.weight"]
            for _ in range(LSUV_MAX_ITER):
                cache = self._forward(x.expand(self.K, *x.shape), train=True, keep=True)
                z = cache.z[name]
                var = z.reshape(self.K, -1).var(dim=1)
                need = mask & ((var - target).abs() >= LSUV_TOL)
                if not bool(need.any()):
                    break
                f = torch.where(need, (target / var.clamp_min(1e-12)).sqrt(), torch.ones_like(var))
                w.mul_(f.view(self.K, 1, 1))
        self._reset_running()  # LSUV's forwards must not leave running statistics behind

    def _reset_running(self) -> None:
        for n, v in self.running.items():
            v.fill_(0.0 if n.endswith("running_mean") else 1.0)
