"""Gradient clipping of a population, per member: by global norm, by value, adaptive (AGC)."""

from __future__ import annotations

import torch

CLIPS = ("none", "norm", "value", "agc")
#: Default clip thresholds (AGC: Brock et al. 2021's lambda).
CLIP_DEFAULTS = {"none": 0.0, "norm": 1.0, "value": 1.0, "agc": 0.01}
AGC_EPS = 1e-3


class _Clipper:
    """Part of :class:`~signalprop.engine.population.Population`: ``_clip_`` over the flat
    gradient buffer (each member clipped by its own threshold)."""

    def _clip_(self, norms: torch.Tensor | None = None) -> None:
        """Clip ``self.grad`` in place; ``norms``: its :meth:`member_norms`, when already taken."""
        if self.clip == "none":
            return
        thr = self.clip_threshold.to(self.device, self.dtype)
        if self.clip == "value":
            t = self._hp("clip_threshold", self.clip_threshold)
            if isinstance(t, torch.Tensor):
                torch.clamp(self.grad, min=-t, max=t, out=self.grad)
            else:
                self.grad.clamp_(-t, t)
        elif self.clip == "norm":
            # torch.nn.utils.clip_grad_norm_: g *= min(1, max_norm / (total_norm + 1e-6))
            gn = self.member_norms(self.grad) if norms is None else norms
            total = gn.square().sum(0).sqrt()
            coef = (thr / (total + 1e-6)).clamp_max(1.0).unsqueeze(1)
            gb = self.blocks(self.grad)
            torch._foreach_mul_(gb, [coef] * len(gb))
        else:  # agc, Brock et al. 2021, unit-wise; output layer excluded
            for s in self.specs:
                if s.module == "head":
                    continue
                g, w = self.grads[s.name], self.params[s.name]
                # weights [K, fan_in, fan_out]: one unit per output column (reduce over fan-in);
                # RBF centres [K, units, in]: one unit per row; vectors: the whole vector (as the
                # NFNets code's unitwise_norm does for biases and gains)
                if s.name == "rbf.centres":
                    dims: tuple[int, ...] = (2,)
                else:
                    dims = (1,) if s.shape[0] > 1 else (1, 2)
                wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True).clamp_min(AGC_EPS)
                gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
                lam = thr.view(self.K, 1, 1)
                maxn = lam * wn
                g.mul_(torch.where(gn > maxn, maxn / gn.clamp_min(1e-6), torch.ones_like(gn)))
