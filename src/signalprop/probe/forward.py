"""Forward statistics of a recorded step: the strided sample each call site keeps, then every
statistic computed in bulk at the end of the step (sites of one shape stacked: one launch per
metric family)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from signalprop import stats
from signalprop.probe.sites import _Metrics, _Site
from signalprop.probe.update import host_tensor
from signalprop.record import MODEL


class ForwardStats:
    """Mixin of :class:`~signalprop.probe.core.Probe`: outputs, inputs and gates."""

    #: CPU samples go through the NumPy host kernels (False: the torch kernels, their reference)
    _host_kernels: bool = True

    def save_before_inplace(self, x: torch.Tensor) -> None:
        """``x`` is about to be modified in place: if it is a recorded output of this step,
        record a copy instead (one copy, only on recorded steps)."""
        j = self._stash.get(x.data_ptr())
        if j is None:
            return
        self._inplace_seen = True
        s = self._sites[j]
        for k, o in enumerate(s.outs):
            if o.data_ptr() == x.data_ptr() and o._version == s.versions[k]:
                s.outs[k] = o.clone()
        del self._stash[x.data_ptr()]

    def _sample(self, t: torch.Tensor) -> torch.Tensor:
        """A fixed strided sample of at most ``max_forward_samples`` values of ``t``, copied
        with one gather (row-major order, any layout)."""
        return torch.take(t, self._sample_index(t))

    def _sample_index(self, t: torch.Tensor) -> torch.Tensor:
        """The flat indices of :meth:`_sample` (cached per size, row length and device)."""
        k = self.max_forward_samples
        assert k is not None
        n = t.numel()
        key = (n, t.shape[-1] if t.dim() else 1, t.device)
        idx = self._stride_cache.get(key)
        if idx is None:
            # a stride of at least n / k coprime with n (so with the row length too): the
            # sample visits every unit position rather than the same few units of each example.
            # Positions wrap around (modulo n; distinct, as the stride is coprime with n), so
            # every output of at least k values gives exactly k: the samples of all such sites
            # stack into one group (one launch per statistic at the end of the step)
            step = max(1, -(-n // k))
            while step > 1 and math.gcd(step, n) != 1:
                step += 1
            idx = torch.arange(min(n, k), device=t.device) * step % max(n, 1)
            self._stride_cache[key] = idx
        return idx

    def _forward_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        groups: dict[tuple, list[int]] = {}
        sites = self._sites
        for j in self._used:
            s = sites[j]
            # (one sample, never modified in place: the usual case, without the checks)
            t = s.outs[0] if len(s.outs) == 1 and not s.versions else self._pooled_output(s)
            if t is not None:
                groups.setdefault((t.shape, t.dtype, t.get_device()), []).append(j)
        for idx in groups.values():
            x = torch.stack([self._sites[j].outs[0] for j in idx])  # [G, k] samples, or outputs
            xf = stats.flat_rows(x)
            if xf.device.type == "cpu" and self.max_forward_samples is not None and \
                    self._host_kernels:
                # the samples of a CPU step: the host kernels (a fraction of torch's per-op cost)
                self._host_group_stats(idx, xf, values, names)
                continue
            if self._deferring and self.max_forward_samples is not None:
                # the stack holds the samples now; nothing later reads the per-site copies, and
                # on an accelerator this step's memory peaks about here (gradients alive)
                for j in idx:
                    self._sites[j].outs = []
            mean, std = stats.moments(xf)
            pct = stats.percentiles(xf, self.percentiles, self.max_percentile_samples)
            values += [mean, std, pct.T.reshape(-1)]
            names += self._group_names(tuple(idx))
            if self._deferring and self.max_forward_samples is not None:
                # NaN/Inf in the samples, scaled to the outputs' size (tensors gone by the
                # time the host sees the values)
                sc = host_tensor([self._sites[j].numel / xf.shape[1] for j in idx],
                                 torch.float64, xf.device)
                values.append(stats.nonfinite_count(xf).double() * sc)
                names += [(self._sites[j].name, "out_nonfinite") for j in idx]
            self._activation_stats(idx, x, xf, values, names)

    def _early_forward_stats(self) -> None:
        """The forward statistics of a deferred (accelerator) step, computed as its backward
        begins rather than at its end, so the forward samples are freed before the peak of the
        step's memory (late in backward, with every parameter gradient alive).

        Only when the last recorded step had one forward pass, and this step's has run: with
        gradient accumulation (several forwards per step) the samples of all micro-batches are
        pooled at the end of the step as before. Should a step still see another forward pass
        after this (the loop changed its pattern), that pass's statistics replace these."""
        if (self._early is not None or self._passes != 1 or self._nforward != 1
                or not self.forward or self.max_forward_samples is None or self._mapping
                or not self._deferring):
            return
        values: list[torch.Tensor] = []
        names: _Metrics = []
        self._forward_stats(values, names)
        for j in self._used:  # consumed: the end of the step sees only later passes
            s = self._sites[j]
            s.outs, s.ins, s.alive = [], [], []
        self._early = (values, names)

    def _host_group_stats(self, idx: list[int], xf: torch.Tensor, values: list[torch.Tensor],
                          names: _Metrics) -> None:
        """Moments, percentiles, saturated and off fractions of one group of CPU samples in
        NumPy, as ONE float64 tensor (the torch kernels of :mod:`signalprop.stats` are the
        reference: same formulas, sums in float64). Dead fractions and saturation measured on
        the input take the torch path (:meth:`_activation_stats`) on their sites only."""
        a = xf.numpy()
        k = self.max_percentile_samples
        a_pct = a if k is None else a[:, stats.subsample_index(a.shape[1], k)]
        mean, std = stats.moments_host(a)
        pct = stats.percentiles_host(a_pct, self.percentiles)
        parts = [mean, std, pct.T.reshape(-1)]
        kinds = tuple(self._sites[j].kind for j in idx)  # (a kind can be inferred later)
        deferring = self._deferring
        key = (tuple(idx), kinds, deferring)
        plan = self._host_plans.get(key)
        if plan is None:
            plan = self._host_plans[key] = self._host_plan(idx, deferring)
        todo, labels, rest, rest_rows = plan
        if deferring:
            # NaN/Inf in the samples, scaled to the outputs' size (tensors gone by the time
            # the host sees the values)
            size = np.asarray([self._sites[j].numel for j in idx], dtype=np.float64)
            parts.append(np.count_nonzero(~np.isfinite(a), axis=1) * (size / a.shape[1]))
        for kind, rows, sat in todo:
            sub = a if rows is None else a[rows]
            if sat:
                parts.append(stats.saturated_fraction_host(sub, kind, self.saturation_ratio))
            else:  # off = output <= 0 for this example (on the sample): rectifiers
                parts.append(np.count_nonzero(sub <= 0, axis=1) / sub.shape[1])
        values.append(torch.from_numpy(np.concatenate(parts).astype(np.float64, copy=False)))
        names += labels
        if rest:
            sub = xf if rest_rows is None else xf[rest_rows]
            self._activation_stats(rest, sub, sub, values, names, host=True)

    def _host_plan(self, idx: list[int], deferring: bool
                   ) -> tuple[list[Any], _Metrics, list[int], Any]:
        """What :meth:`_host_group_stats` computes for a group: (kind, rows, saturated or off)
        items, all their labels, and the sites (with their rows) left to the torch path."""
        labels = list(self._group_names(tuple(idx)))
        if deferring:
            labels += [(self._sites[j].name, "out_nonfinite") for j in idx]
        by_kind: dict[str, list[int]] = {}
        for r, j in enumerate(idx):
            k = self._sites[j].kind
            if k is not None:
                by_kind.setdefault(k, []).append(r)
        todo: list[Any] = []
        rest_r: list[int] = []
        for kind, rows in by_kind.items():
            layer = [self._sites[idx[r]].name for r in rows]
            sel = None if len(rows) == len(idx) else np.asarray(rows)
            host_sat = stats.host_saturation(kind)
            if host_sat:
                todo.append((kind, sel, True))
                labels += [(n, "saturated_frac") for n in layer]
            if kind in stats.RECTIFIERS:
                todo.append((kind, sel, False))
                labels += [(n, "off_frac") for n in layer]
            if kind in stats.RECTIFIERS or (kind in stats.SATURATING and not host_sat):
                rest_r += rows
        rest_r.sort()
        rest = [idx[r] for r in rest_r]
        rows_t = None if len(rest_r) == len(idx) else torch.tensor(rest_r, dtype=torch.long)
        return todo, labels, rest, rows_t

    @staticmethod
    def _pooled_output(s: _Site) -> torch.Tensor | None:
        """The site's outputs of this step as one tensor (None: nothing usable recorded)."""
        if not s.outs:
            return None
        if s.versions and any(
            t._version != v for t, v in zip(s.outs, s.versions, strict=True)
        ):
            # overwritten in place after it was recorded (an in-place op the probe did not
            # see coming): its statistics would describe another tensor
            s.unchecked = "its output was modified in place after it was recorded"
            s.outs, s.ins = [], []
            return None
        t = s.outs[0]
        if len(s.outs) > 1:
            # micro-batches, time steps of a recurrent cell (same trailing shape; samples
            # are 1-D)
            t = torch.cat(s.outs, 0)
            if s.ins:
                same_in = all(x.shape[1:] == s.ins[0].shape[1:] for x in s.ins)
                s.ins = [torch.cat(s.ins, 0) if same_in else s.ins[0]]
        s.outs = [t]
        return t

    def _group_names(self, idx: tuple[int, ...]) -> _Metrics:
        # the (layer, metric) labels of a group's moments and percentiles; cached because the
        # same groups recur every step and building ~10 labels per layer is measurable
        cached = self._name_cache.get(idx)
        if cached is None:
            layer = [self._sites[j].name for j in idx]
            cached = [(n, "out_mean") for n in layer] + [(n, "out_std") for n in layer]
            for q in self.percentiles:
                key = stats.percentile_key(q)
                cached += [(n, key) for n in layer]
            self._name_cache[idx] = cached
        return cached

    def _input_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        # the model's own input: badly scaled inputs are a common cause of first-layer saturation
        xs = [x for x in self._inputs if x.is_floating_point() and x.numel()]
        if not xs:
            return
        x = xs[0] if len(xs) == 1 else torch.cat([t.reshape(-1) for t in xs])
        x = x.reshape(1, -1)  # three cheap passes over the whole input; NaN propagates
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and \
                self._host_kernels:
            a = x.detach().numpy()
            mean, std = stats.moments_host(a)
            with np.errstate(invalid="ignore"):
                absmax = np.abs(a).max(axis=1).astype(np.float64)
            values.append(torch.from_numpy(np.concatenate([mean, std, absmax])))
        else:
            mean, std = stats.moments(x)
            values += [mean, std, x.abs().amax(dim=1)]
        names += [(MODEL, "input_mean"), (MODEL, "input_std"), (MODEL, "input_absmax")]

    def _activation_stats(
        self,
        idx: list[int],
        x: torch.Tensor,
        xf: torch.Tensor,
        values: list[torch.Tensor],
        names: _Metrics,
        host: bool = False,
    ) -> None:
        """Saturated, off and dead fractions of a group's sites by activation kind (``host``:
        the host kernels took the saturated fractions on the output and the off fractions)."""
        by_kind: dict[str, list[int]] = {}
        for j, i in enumerate(idx):
            k = self._sites[i].kind
            if k is not None:
                by_kind.setdefault(k, []).append(j)
        for kind, js in by_kind.items():
            sites = [self._sites[idx[j]] for j in js]
            layer = [s.name for s in sites]
            if kind in stats.SATURATING and not (host and stats.host_saturation(kind)):
                self._saturation(kind, js, len(idx), xf, sites, values, names)
            if kind in stats.RECTIFIERS and not host:
                # off = output <= 0 for this example: a unit off per example, averaged over the
                # batch (on the forward sample); a unit is dead only when off for every example
                src = xf if len(js) == len(idx) else xf.index_select(
                    0, host_tensor(js, torch.long, xf.device))
                values.append((src <= 0).float().mean(dim=1))
                names += [(n, "off_frac") for n in layer]
            if kind in stats.RECTIFIERS and all(s.alive for s in sites):
                # dead = inactive for the WHOLE batch: active units were noted in the hook
                dead = [
                    1.0 - (s.alive[0] if len(s.alive) == 1 else torch.stack(s.alive).any(0))
                    .float().mean()
                    for s in sites
                ]
                values.append(torch.stack(dead))
                names += [(n, "dead_frac") for n in layer]
            elif kind in stats.RECTIFIERS:
                self._dead_exact(sites, values, names)

    def _saturation(self, kind: str, js: list[int], ngroup: int, xf: torch.Tensor,
                    sites: list[_Site], values: list[torch.Tensor], names: _Metrics) -> None:
        """Saturated fractions of one activation kind's sites in a group."""
        if stats.SATURATING[kind][0]:
            src = xf if len(js) == ngroup else xf.index_select(
                0, host_tensor(js, torch.long, xf.device))  # (a list index syncs)
        else:
            ins = [s.ins[0] if s.ins else None for s in sites]
            ok = [j for j, t in zip(js, ins, strict=True) if t is not None
                  and t.shape == ins[0].shape]
            if len(ok) != len(js) or ins[0] is None:
                for s in sites:
                    s.unchecked = s.unchecked or "its input was not available"
                return
            src = torch.stack(ins)
        values.append(stats.saturated_fraction(src, kind, self.saturation_ratio).float())
        names += [(s.name, "saturated_frac") for s in sites]

    @staticmethod
    def _dead_exact(sites: list[_Site], values: list[torch.Tensor], names: _Metrics) -> None:
        """Dead fractions from whole outputs (exact mode): every row, not the subsample."""
        chan = [s.conv or s.outs[0].dim() >= 4 for s in sites]
        for flag in (True, False):
            sub = [s for s, c in zip(sites, chan, strict=True) if c == flag]
            if not sub:
                continue
            h = torch.stack([s.outs[0] for s in sub])
            if h.dim() > 3 and flag:  # conv maps [G, B, C, ...]: a unit is a channel
                h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], -1).transpose(1, 2)
                h = h.reshape(h.shape[0], -1, h.shape[-1])
            elif h.dim() > 3:  # sequences [G, B, T, F]: a unit is a feature
                h = h.reshape(h.shape[0], -1, h.shape[-1])
            values.append(stats.dead_fraction(h).float())
            names += [(s.name, "dead_frac") for s in sub]

    def _gate_stats(self, values: list[torch.Tensor], names: _Metrics) -> None:
        # recurrent gates (sigmoid): saturated fraction and mean over batch, units, time steps
        for j in self._used:
            s = self._sites[j]
            for g, vals in s.gates.items():
                v = torch.cat([t.reshape(-1) for t in vals]).unsqueeze(0)
                values.append(stats.saturated_fraction(v, "sigmoid", self.saturation_ratio))
                values.append(v.float().mean(dim=1))
                names += [(s.name, f"gate_{g}_saturated_frac"), (s.name, f"gate_{g}_mean")]
