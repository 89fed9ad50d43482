"""benchmarks/probe_floor.py, the cheapest hook-based recording rung by rung: smoke runs of both
models (so the script cannot rot), and the transformer ladder checked against the probe it
claims to mirror (same sites, same gradients, same samples)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from signalprop import stats

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "probe_floor.py")


@pytest.fixture(scope="module")
def floor():
    spec = importlib.util.spec_from_file_location("probe_floor", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_probe_floor_benchmark_runs_and_computes_its_verdicts(floor, capsys, model):
    threads = torch.get_num_threads()
    try:
        args = ["--model", model, "--steps", "1", "--repeats", "1", "--threads", str(threads)]
        assert floor.main(args + (["--phases"] if model == "transformer" else [])) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    ladder = floor.Ladder if model == "mlp" else floor.TransformerLadder
    for rung in ladder.RUNGS:
        assert f"\n{ladder.LABELS.get(rung, rung)} " in out
    assert out.count("target every") == 2
    assert ("watched as signalprop's probe watches it" in out) == (model == "transformer")
    assert ("\nper phase, ms" in out) == (model == "transformer")


def test_probe_floor_bad_arguments_fail_with_one_line(floor, capsys):
    for bad in (["--model", "transformer", "--steps", "0"], ["--model", "mlp", "--phases"]):
        assert floor.main(bad) == 2
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        floor.main(["--model", "gpt"])


@pytest.mark.parametrize("host", [True, False])
def test_transformer_ladder_records_what_the_probe_records(floor, host):
    # with lr 0 every step sees the same weights: the ladder's steps must see the probe's
    # sites, its gradient norms and its samples (host=False: the accelerators' torch path, as
    # on CUDA, run on the CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lad = floor.TransformerLadder("cpu")
        if not host:
            lad.cpu, lad.nrm2 = False, None
        for g in lad.opt.param_groups:
            g["lr"] = 0.0
        lad.setup("signalprop")()
        lad.teardown("signalprop")
        rec = lad.probe.record
        step = rec.steps[-1]
        for rung in lad.RUNGS[1:-1]:  # (every rung runs; the last one's values are checked)
            lad.setup(rung)()
            lad.teardown(rung)
        lad.setup("stats")()
        lad.teardown("stats")
    finally:
        torch.set_num_threads(threads)
    sites = rec.at(step, "out_mean")
    assert len(sites) == len(lad.sites) == len(lad.samples) > 0
    assert len(lad.blocks) == len(rec.at(step, "in_grad_norm")) > 0
    ref = sorted([*rec.at(step, "out_grad_norm").values(), *rec.at(step, "in_grad_norm").values()])
    assert len(lad.gnorms) == len(ref)
    np.testing.assert_allclose(sorted(float(g) for g in lad.gnorms), ref, rtol=1e-5)
    mean, std = stats.moments_host(torch.stack(lad.samples).numpy())
    np.testing.assert_allclose(sorted(mean), sorted(sites.values()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sorted(std), sorted(rec.at(step, "out_std").values()), rtol=1e-5)
