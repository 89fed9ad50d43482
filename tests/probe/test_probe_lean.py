"""A probe without forward or backward statistics (weights only) records its steps through two
hooks on the model (backward.add_lean_hooks) once they have been seen to work; its records are
those of the full set of hooks, and it goes back to that set when a step's gradients escape
them. Also: healthy steps take their NaN/Inf counts from transfer._RowsPlan."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from signalprop.probe import Probe, core, transfer
from signalprop.record import MODEL


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _run(model, probe, opt, steps, *, clip=None, accum=1, whole=lambda s: True, seed=1,
         skip=()):
    g = torch.Generator().manual_seed(seed)
    seen = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            # whole(s) False: the loop runs the model's layers itself (the model is not called)
            out = model(x) if whole(s) else model[4](model[3](model[2](model[1](model[0](x)))))
            if s in skip:  # overflowing gradients (a finite loss), as a GradScaler skips on
                out.register_hook(lambda g: g * math.inf)
            loss = nn.functional.cross_entropy(out, y) / accum
            loss.backward()
            probe.log(loss=loss)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if s not in skip:  # (skipped: as a GradScaler the probe does not know would)
            opt.step()
        seen.append(probe._lean)
    return seen


def _records(monkeypatch, lean: bool, **run):
    """The record of a weights-only probe, with lean hooks allowed or not."""
    if not lean:
        monkeypatch.setattr(core.Probe, "_check_lean", lambda self: None)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    p = Probe(model, optimizer=opt, forward=False, backward=False).attach()
    seen = _run(model, p, opt, 6, **run)
    p.detach()
    monkeypatch.undo()
    return p.record, seen


@pytest.mark.parametrize("run", [{}, {"clip": 0.05}, {"accum": 3, "clip": 0.05}],
                         ids=["plain", "clipped", "accumulated"])
def test_lean_hooks_record_what_every_hook_records(monkeypatch, run):
    full, seen_full = _records(monkeypatch, False, **run)
    lean, seen = _records(monkeypatch, True, **run)
    assert seen_full == [False] * 6
    assert seen == [True] * 6  # lean from the step after the mapping step
    assert lean.steps == full.steps == list(range(6))
    assert lean.data == full.data  # every value, exactly (norms before clipping included)
    assert [repr(v) for v in lean.layers.values()] == [repr(v) for v in full.layers.values()]
    if "clip" in run:  # the norms are the pre-clip ones: above the clip
        assert all(lean.get(s, MODEL, "grad_norm_total") > 0.05 for s in lean.steps)


def test_a_skipped_step_is_noticed_as_with_every_hook(monkeypatch):
    full, _ = _records(monkeypatch, False, skip=(2,))
    lean, seen = _records(monkeypatch, True, skip=(2,))
    assert seen == [True] * 6
    assert full.get(2, MODEL, "skipped_step") == 1.0
    assert json.dumps(lean.data, sort_keys=True) == json.dumps(full.data, sort_keys=True)  # (NaN)


def test_lean_hook_is_one_and_unrecorded_steps_have_none():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt, forward=False, backward=False, schedule=2).attach()
    _run(model, p, opt, 3)  # steps 0 (mapping) and 2 recorded
    assert p._lean and p._fwd_handles == []  # step 3 is not recorded: no hooks
    _run(model, p, opt, 1)
    assert len(p._fwd_handles) == 1  # step 4 will be recorded: the model's hook
    p.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_gradients_no_hook_saw_bring_back_every_hook(monkeypatch):
    # steps 3 and 4 run the layers without calling the model: the output hook never fires,
    # so step 3's norms are read at the optimiser step (after clipping); from step 4 on the
    # hooks of every parameter see the backward again (pre-clip norms, as without lean hooks)
    whole = lambda s: s not in (3, 4)  # noqa: E731
    full, _ = _records(monkeypatch, False, clip=0.05, whole=whole)
    lean, seen = _records(monkeypatch, True, clip=0.05, whole=whole)
    assert seen == [True, True, True, False, False, True]
    for s in (0, 1, 2, 4, 5):
        assert lean.data[s] == full.data[s], s
    assert lean.get(3, MODEL, "grad_norm_total") == pytest.approx(0.05, rel=1e-4)  # clipped
    assert full.get(3, MODEL, "grad_norm_total") > 0.05


def test_model_never_called_whole_keeps_every_hook(monkeypatch):
    lean, seen = _records(monkeypatch, True, clip=0.05, whole=lambda s: False)
    assert seen == [False] * 6
    assert all(lean.get(s, MODEL, "grad_norm_total") > 0.05 for s in lean.steps)


@pytest.mark.parametrize("weights", [True, False])
def test_nonfinite_steps_are_counted_healthy_steps_count_zero(weights):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = Probe(model, optimizer=opt, weights=weights).attach()
    g = torch.Generator().manual_seed(0)
    for s in range(3):
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        if s == 1:
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        p.log(loss=loss)
        if s != 1:
            opt.step()
        else:
            p._opt_pre(0), p._opt_post(0)  # (a step that keeps the weights finite)
    p.detach()
    r = p.record
    for s in (0, 2):
        for layer in ("0", "1", "4"):
            assert r.get(s, layer, "out_nonfinite") == 0.0
        if weights:
            assert all(r.get(s, n, "grad_nonfinite") == 0.0 for n in ("0.weight", "4.bias"))
    assert r.get(1, "0", "out_nonfinite") == 16.0  # one NaN input: a row of 16 outputs
    if weights:
        assert r.get(1, "0.weight", "grad_nonfinite") > 0


def _ordered(record):
    """Every row as nested lists of items (key order included; NaN as a string)."""
    return {s: [(layer, [(k, "nan" if v != v else v) for k, v in d.items()])
                for layer, d in row.items()] for s, row in record.data.items()}


@pytest.mark.parametrize("case", ["plain", "clip", "skip", "nan", "scaler", "accum", "adamw"])
def test_rows_built_when_read_equal_rows_built_at_once(case):
    # a listener needs each step's dicts at once: the oracle for the rows a record builds
    # from flat values when it is read (transfer._to_dict, Record._add_flat)
    def run(listen):
        model = _mlp()
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if case == "adamw"
               else torch.optim.SGD(model.parameters(), lr=0.1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if case == "scaler" else None
        p = Probe(model, optimizer=opt, scaler=scaler,
                  on_record=[lambda s, v: None] if listen else None).attach()
        g = torch.Generator().manual_seed(3)
        for s in range(5):
            opt.zero_grad(set_to_none=True)
            for _ in range(3 if case == "accum" else 1):
                loss = _case_loss(model, g, case, s, nan_step=2)
                (scaler.scale(loss) if scaler else loss).backward()
                p.log(loss=loss)
            if case == "clip":
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if scaler:
                scaler.step(opt)
                scaler.update()
            elif not (case == "skip" and s == 2):
                opt.step()
        if not listen and case not in ("clip", "nan"):  # (such steps: dicts at once)
            assert p._record.__dict__["_flat"]  # (values waiting to be built)
        p.detach()
        return p.record

    eager, lazy = run(True), run(False)
    assert _ordered(lazy) == _ordered(eager)
    if case == "skip":
        assert lazy.get(2, MODEL, "skipped_step") == 1.0


def _case_loss(model: nn.Module, g: torch.Generator, case: str, s: int, nan_step: int
               ) -> torch.Tensor:
    """One batch's loss in scenario ``case`` at step ``s``: a NaN input at ``nan_step`` ("nan"),
    gradients that overflow at step 2 ("skip", as a GradScaler skips on)."""
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    if case == "nan" and s == nan_step:
        x[0, 0] = math.nan
    out = model(x)
    if case == "skip" and s == 2:
        out.register_hook(lambda grad: grad * math.inf)
    return nn.functional.cross_entropy(out, y)


def test_pending_builds_the_rows_of_the_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        p.gradients_ready()
        rows = p.pending()
        assert rows["0.weight"]["grad_nonfinite"] == 0.0 and "out_mean" in rows["0"]
        rows[MODEL]["extra"] = 7.0  # (extra values recorded with the step)
        opt.step()
    p.detach()
    assert p.record.get(1, MODEL, "extra") == 7.0
    assert p.record.get(1, "0.weight", "grad_norm") == rows["0.weight"]["grad_norm"]


@pytest.mark.parametrize("case", ["plain", "clip", "nan", "skip"])
def test_deferred_rows_built_when_read_equal_rows_built_on_landing(monkeypatch, case):
    # values queued on the device (flush_every > 1) land every few steps; a healthy step's
    # become dicts when the record is read, others at once (the oracle: every step at once)
    def run(at_once):
        if at_once:
            monkeypatch.setattr(transfer._RowsPlan, "deferred_healthy", lambda self, flat: False)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        p = Probe(model, optimizer=opt, flush_every=3).attach()
        g = torch.Generator().manual_seed(5)
        for s in range(7):
            opt.zero_grad(set_to_none=True)
            loss = _case_loss(model, g, case, s, nan_step=4)
            loss.backward()
            p.log(loss=loss)
            if case == "clip":
                nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            if not (case == "skip" and s == 2):
                opt.step()
        p.detach()
        monkeypatch.undo()
        waiting = {m for _, names, _ in p._record.__dict__["_flat"] for _, m in names}
        if case in ("plain", "skip"):  # (healthy: their dicts are not built yet)
            assert (waiting - {"update_ratio"} != set()) is (not at_once)
        return p.record

    eager, lazy = run(True), run(False)
    assert lazy.steps == list(range(7))
    if case == "skip":
        assert lazy.get(2, MODEL, "skipped_step") == 1.0
    assert _ordered(lazy) == _ordered(eager)
