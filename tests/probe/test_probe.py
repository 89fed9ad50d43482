"""Probe statistics against direct computations (autograd, NumPy), schedules, hook hygiene."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from signalprop import stats
from signalprop.probe import Probe, at_steps, every, log_spaced
from signalprop.record import MODEL

from ..helpers import train_probed


def _mlp(act=nn.Tanh, depth=3, width=16, d_in=8, d_out=3):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def _direct(model, x, y, loss_fn=nn.functional.cross_entropy):
    """Reference: retain every module output and its gradient by hand."""
    outs, grads = {}, {}
    h = x
    for name, m in model.named_children():
        h = m(h)
        h.retain_grad()
        outs[name] = h
    loss = loss_fn(h, y)
    loss.backward()
    for name, h in outs.items():
        grads[name] = h.grad
    return outs, grads, loss


@pytest.mark.parametrize("act,kind", [(nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.ReLU, "relu")])
def test_every_statistic_matches_direct_computation(act, kind):
    torch.manual_seed(1)
    model = _mlp(act).double()
    x = torch.randn(32, 8, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (32,))
    ref = _mlp(act).double()
    ref.load_state_dict(model.state_dict())
    outs, grads, ref_loss = _direct(ref, x, y)

    with Probe(model, max_percentile_samples=None, max_forward_samples=None) as p:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        p.step(loss)
    r = p.record
    assert r.steps == [0]
    assert r.get(0, MODEL, "loss") == pytest.approx(ref_loss.item(), rel=1e-6)
    for name, h in outs.items():
        hn = h.detach().numpy()
        assert r.get(0, name, "out_mean") == pytest.approx(hn.mean(), rel=1e-5, abs=1e-7)
        assert r.get(0, name, "out_std") == pytest.approx(hn.std(), rel=1e-5)
        for q in stats.PERCENTILES:
            assert r.get(0, name, stats.percentile_key(q)) == pytest.approx(
                np.percentile(hn, q), rel=1e-5, abs=1e-6
            )
        assert r.get(0, name, "out_grad_norm") == pytest.approx(
            grads[name].norm().item(), rel=1e-5
        )
        assert r.get(0, name, "out_nonfinite") == 0.0
    for pname, prm in ref.named_parameters():
        assert r.get(0, pname, "grad_norm") == pytest.approx(prm.grad.norm().item(), rel=1e-5)
        assert r.get(0, pname, "weight_norm") == pytest.approx(prm.norm().item(), rel=1e-5)
    # activation-specific statistics, against autograd / the definition
    for i in range(3):
        name = str(2 * i + 1)
        z = outs[str(2 * i)].detach().clone().requires_grad_(True)
        (d,) = torch.autograd.grad(act()(z).sum(), z)
        if kind in stats.SATURATING:
            dmax = stats.SATURATING[kind][2]
            expect = (d.abs() < stats.SATURATION_DERIVATIVE_RATIO * dmax).double().mean().item()
            assert r.get(0, name, "saturated_frac") == pytest.approx(expect, abs=1e-12)
            assert math.isnan(r.get(0, name, "dead_frac"))
        else:
            h = outs[name].detach()
            expect = 1.0 - (h > 0).any(0).double().mean().item()
            assert r.get(0, name, "dead_frac") == pytest.approx(expect, abs=1e-12)
            assert math.isnan(r.get(0, name, "saturated_frac"))


def test_update_ratio_and_layers_order():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    with Probe(model, optimizer=opt) as p:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        p.log(loss=loss)
        opt.step()
    r = p.record
    for n, q in model.named_parameters():
        expect = (q.detach() - before[n]).norm() / before[n].norm()
        assert r.get(0, n, "update_ratio") == pytest.approx(expect.item(), rel=1e-4)
    assert r.layer_names(role="module") == [str(i) for i in range(7)]
    depths = [r.layers[n].depth for n in r.layer_names(role="module")]
    assert depths == sorted(depths)
    assert r.layers["0.weight"].module == "0" and r.layers["0.weight"].depth == 0
    assert r.layers["1"].activation == "tanh"


def test_schedule_records_only_scheduled_steps_and_hooks_are_removed():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    p = train_probed(model, Probe(model, optimizer=opt, schedule=at_steps([0, 3, 4])), opt,
                     [(x, y)] * 6)
    assert p.record.steps == [0, 3, 4]
    assert not p.attached
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    # training after detaching records nothing more
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert p.record.steps == [0, 3, 4]


def test_schedules():
    assert [s for s in range(10) if every(3)(s)] == [0, 3, 6, 9]
    sched = log_spaced(1000, 10)
    steps = [s for s in range(1000) if sched(s)]
    assert steps[0] == 0 and steps[-1] == 999 and 8 <= len(steps) <= 12
    with pytest.raises(ValueError):
        every(0)


def test_nonfinite_values_are_counted_not_dropped():
    model = _mlp()
    x = torch.randn(8, 8)
    x[0, 0] = float("nan")
    with Probe(model) as p:
        out = model(x)
        loss = out.sum()
        loss.backward()
        p.step(loss)
    r = p.record
    assert r.get(0, "0", "out_nonfinite") == 16.0  # one NaN row of 16 units
    assert r.get(0, "0.weight", "grad_nonfinite") > 0
    assert math.isnan(r.get(0, MODEL, "loss"))


def test_model_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters"):
        Probe(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module"):
        Probe("not a model")  # type: ignore[arg-type]


def test_multiple_calls_per_step_are_pooled():
    cell = nn.RNNCell(4, 6)
    with Probe(cell, max_percentile_samples=None, max_forward_samples=None) as p:
        h = torch.zeros(5, 6)
        hs = []
        for _ in range(3):
            h = cell(torch.randn(5, 4), h)
            hs.append(h)
        loss = h.pow(2).sum()
        loss.backward()
        p.step(loss)
    pooled = torch.cat([t.detach() for t in hs])
    assert p.record.get(0, "RNNCell", "out_mean") == pytest.approx(pooled.mean().item(), rel=1e-5)


def test_conv_dead_fraction_counts_channels():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with torch.no_grad():
        conv[0].bias[:] = torch.tensor([-100.0, 0.0, 0.0, 0.0])  # channel 0 always dead
    with Probe(conv) as p:
        out = conv(torch.randn(2, 1, 6, 6))
        out.sum().backward()
        p.step(out.sum())
    assert p.record.get(0, "1", "dead_frac") == pytest.approx(0.25)


def test_train_records_divergence_without_crashing():
    from signalprop.train import train

    torch.manual_seed(0)
    model = _mlp(nn.ReLU, depth=4, width=32)
    x, y = torch.randn(64, 8), torch.randn(64, 3)
    res = train(model, (x, y), nn.functional.mse_loss, steps=50, lr=1e4, batch_size=64)
    assert res.diverged and res.diverged_step is not None
    assert res.steps == res.diverged_step + 1
    last = res.record.steps[-1]
    assert last == res.diverged_step
    assert not math.isfinite(res.record.get(last, MODEL, "loss")) or any(
        res.record.get(last, n, "grad_nonfinite", 0.0) > 0 for n in res.record.layer_names("param")
    )


def test_train_rejects_non_scalar_loss_and_bad_data():
    from signalprop.train import train

    model = _mlp()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="scalar"):
        train(model, (x, y), nn.CrossEntropyLoss(reduction="none"), steps=2)
    with pytest.raises(ValueError, match="disagree"):
        train(model, (x, y[:5]), nn.functional.cross_entropy, steps=2)
    with pytest.raises(TypeError, match="data must be"):
        train(model, 42, nn.functional.cross_entropy, steps=2)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(model, (x, y), nn.functional.cross_entropy, steps=2, optimizer="adamm")


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "user-hook-uses-output"])
def test_sequential_loop_after_mapping_matches_autograd(capture):
    # after the mapping step an nn.Sequential's children are recorded by the container's own
    # loop, and a child followed by an activation shares ONE gradient hook with it (dL/dy and
    # dL/dh from the activation's backward node). lr 0: the same weights every step, so every
    # recorded step must equal the direct autograd computation; an in-place ReLU included.
    # With a user hook that adds a layer's output to the loss, y has a second consumer: the
    # probe must not pair that layer (its gradient is the sum over both consumers).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(inplace=True),
                          nn.Linear(16, 12), nn.Sigmoid(), nn.Linear(12, 3)).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    extra: list[torch.Tensor] = []
    if capture:
        model[4].register_forward_hook(lambda m, i, o: extra.append(o))

    def loss_of(out):
        loss = nn.functional.cross_entropy(out, y)
        return loss + 0.1 * extra.pop().pow(2).mean() if capture else loss

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Probe(model, optimizer=opt) as p:
        for _ in range(3):
            opt.zero_grad()
            loss_of(model(x)).backward()
            opt.step()
        assert p._seq_plan  # the loop ran on steps 1 and 2
    # the oracle: every output retained, the same loss
    outs = {}
    h = x
    for name, m in model.named_children():
        h = torch.relu(h) if isinstance(m, nn.ReLU) else m(h)  # (out of place: keeps y)
        h.retain_grad()
        outs[name] = h
    loss = loss_of(h)
    loss.backward()
    grads = {n: t.grad for n, t in outs.items()}
    r = p.record
    for step in (0, 1, 2):  # (step 0: the mapping step, with a hook per module)
        for name in ("0", "1", "2", "3", "4", "5", "6"):
            assert r.get(step, name, "out_grad_norm") == pytest.approx(
                grads[name].norm().item(), rel=1e-9), (step, name)


class _Split(nn.Module):  # a leaf returning a tuple (its first element is what is recorded)
    def forward(self, x):
        return x * 2.0, x


class _First(nn.Module):
    def forward(self, t):
        return t[0] - t[1]


def test_sequential_loop_records_what_the_hooks_record():
    # lr 0 and a fixed batch: every step is the same computation, so the steps recorded by the
    # container's loop (1, 2) must equal the mapping step's, recorded by a hook per module (0)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), _Split(), _First(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Probe(model, optimizer=opt) as p:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert p._seq_plan
    r = p.record
    assert r.get(0, "3", "out_grad_norm") > 0  # the tuple-returning leaf is recorded
    for step in (1, 2):
        assert r.data[step].keys() == r.data[0].keys()
        for layer, metrics in r.data[0].items():
            assert r.data[step][layer].keys() == metrics.keys(), (step, layer)
            for k, v in metrics.items():
                if k in ("update_ratio",):
                    continue
                assert r.data[step][layer][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (
                    step, layer, k)


@pytest.mark.parametrize("path", ["host", "torch", "deferred"])
def test_an_empty_batch_is_recorded_without_crashing_training(monkeypatch, path):
    # an empty batch (a filtered data set's last batch, a bucket with no examples) used to
    # crash the user's backward inside the probe's gradient hook (BLAS rejects empty arrays)
    if path != "host":
        monkeypatch.setattr(stats, "HOST_NORMS", {})  # the accelerators' kernels, on the CPU
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    p = Probe(model, optimizer=opt, flush_every=2 if path == "deferred" else None).attach()
    for bs in (5, 0, 5):
        opt.zero_grad()
        loss = model(torch.randn(bs, 4)).sum()
        loss.backward()
        p.log(loss=loss)
        opt.step()
    r = p.record
    assert r.steps == [0, 1, 2]
    for layer in ("0", "1", "4"):  # nothing flowed back: every output gradient is exactly 0
        assert r.get(1, layer, "out_grad_norm") == 0.0
        assert r.get(1, layer, "out_grad_nonfinite") == 0.0
        assert "out_mean" not in r.data[1][layer]  # no values to describe: left out
        assert r.get(2, layer, "out_grad_norm") > 0  # the next batch is recorded as usual
        assert math.isfinite(r.get(2, layer, "out_mean"))
    assert r.get(1, "0.weight", "grad_norm") == 0.0
    assert "input_mean" not in r.data[1][MODEL]


@pytest.mark.parametrize("path", ["host", "torch"])
@pytest.mark.parametrize("opt_name", ["sgd", "sparse_adam"])
def test_sparse_embedding_gradients_are_measured_as_their_dense_tensor(monkeypatch, path, opt_name):
    # nn.Embedding(sparse=True) gives sparse COO gradients (repeated indices stored twice):
    # torch's norm kernels reject them, which used to crash the user's optimiser step
    if path == "torch":
        monkeypatch.setattr(stats, "HOST_NORMS", {})
    torch.manual_seed(0)
    emb = nn.Embedding(12, 5, sparse=True)
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(5, 3))
    params = list(emb.parameters()) if opt_name == "sparse_adam" else list(model.parameters())
    opt = (torch.optim.SparseAdam(params, lr=1e-2) if opt_name == "sparse_adam"
           else torch.optim.SGD(params, lr=0.1))
    p = Probe(model, optimizer=opt).attach()
    x = torch.tensor([[1, 3, 3], [7, 1, 1]])  # repeated indices: coalescing sums them
    for step in range(2):
        opt.zero_grad()
        model[2].zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        assert emb.weight.grad.is_sparse
        dense = emb.weight.grad.to_dense().double()
        before = emb.weight.detach().double().clone()
        p.log(loss=loss)
        opt.step()
        r = p.record
        assert r.get(step, "0.weight", "grad_norm") == pytest.approx(
            float(dense.norm()), rel=1e-6)
        assert r.get(step, "0.weight", "grad_nonfinite") == 0.0
        want = float((emb.weight.detach().double() - before).norm() / before.norm())
        assert r.get(step, "0.weight", "update_ratio") == pytest.approx(want, rel=1e-5)


def test_a_gradient_penalty_step_is_recorded_without_crashing():
    # WGAN-GP / R1 style: torch.autograd.grad(..., create_graph=True) inside the step gives
    # gradients that require grad (device norms on the CPU) beside the loss's own backward
    # (host floats): pooling the two used to crash the optimiser step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    p = Probe(model, optimizer=opt).attach()
    for _ in range(2):
        opt.zero_grad()
        x = torch.randn(4, 6, requires_grad=True)
        out = model(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        loss = out.pow(2).mean() + g.pow(2).sum()
        loss.backward()
        want = float(model[0].weight.grad.double().norm())
        p.log(loss=loss)
        opt.step()
    r = p.record
    assert r.steps == [0, 1]
    assert r.get(1, "0.weight", "grad_norm") == pytest.approx(want, rel=1e-6)
    for layer in ("0", "1", "2"):
        assert math.isfinite(r.get(1, layer, "out_grad_norm")) and r.get(1, layer, "out_grad_norm") > 0


class _Checkpointed(nn.Module):
    """Two pre-LN transformer blocks (functional GELU inside), each run under activation
    checkpointing (``mode``: use_reentrant) or not (``None``)."""

    def __init__(self, mode: bool | None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(2))
        self.head = nn.Linear(8, 3)
        self.mode = mode

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        for b in self.blocks:
            x = b(x) if self.mode is None else checkpoint(b, x, use_reentrant=self.mode)
        return self.head(x)


@pytest.mark.parametrize("mode", [False, True])
def test_activation_checkpointing_records_what_the_plain_model_records(mode):
    # the recomputation inside backward used to be pooled in as another call (every sample
    # twice: percentiles off by a few percent); reentrant checkpointing records the recomputed
    # graph, the only one with grad mode
    recs = []
    for m in (None, mode):
        model = _Checkpointed(m)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        p = Probe(model, optimizer=opt).attach()
        torch.manual_seed(1)
        # (reentrant checkpointing needs an input that requires grad: every run has one)
        xs = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(4)]
        for step in range(2):
            opt.zero_grad()
            for x in xs[2 * step: 2 * step + 2]:  # two micro-batches a step
                model(x).pow(2).mean().backward()
            opt.step()
        recs.append({(layer, k): v for layer, d in p.record.data[1].items() for k, v in d.items()})
    plain, ck = recs
    assert any(k[1] == "out_p95" and "/gelu" in k[0] for k in plain)  # the functional sites
    assert set(plain) == set(ck)
    for k, v in plain.items():
        assert ck[k] == pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), k


@pytest.mark.parametrize("opt_name", ["lbfgs", "sgd"])
def test_a_closure_step_records_its_first_evaluation(opt_name):
    # LBFGS.step(closure) runs forward and backward inside the step, several times at moving
    # weights: the step pre-hook used to fire before any of them (records shifted by a step,
    # forward statistics lost). Recorded now: the first evaluation, at the step's own weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = (torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4) if opt_name == "lbfgs"
           else torch.optim.SGD(model.parameters(), lr=0.1))
    p = Probe(model, optimizer=opt, schedule=[0, 2]).attach()
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        calls.append(1)
        return loss

    for step in range(3):
        ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        ref.load_state_dict(model.state_dict())
        h = ref[1](ref[0](x))
        h.retain_grad()
        loss = (ref[2](h) - y).pow(2).mean()
        loss.backward()
        before = model[0].weight.detach().double().clone()
        opt.step(closure)
        if step in (0, 2):
            r = p.record
            assert r.get(step, MODEL, "loss") == pytest.approx(float(loss.detach()), rel=1e-6)
            assert r.get(step, "0.weight", "grad_norm") == pytest.approx(
                float(ref[0].weight.grad.double().norm()), rel=1e-5)
            assert r.get(step, "1", "out_grad_norm") == pytest.approx(
                float(h.grad.double().norm()), rel=1e-5)
            assert r.get(step, "1", "out_mean") == pytest.approx(float(h.detach().double().mean()), rel=1e-5)
            want = float((model[0].weight.detach().double() - before).norm() / before.norm())
            assert r.get(step, "0.weight", "update_ratio") == pytest.approx(want, rel=1e-4)
    assert p.record.steps == [0, 2]
    assert len(calls) > 3 if opt_name == "lbfgs" else len(calls) == 3


def test_parametrized_layers_are_watched_and_their_parametrizations_are_not():
    # weight_norm / spectral_norm move a layer's weight into a `parametrizations` child: the
    # modules computing the weight used to be watched as layers (the weight's values recorded
    # as an output), and a bias-free parametrized layer, no longer a leaf, was not watched
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 2))
    parametrizations.weight_norm(model[0])
    parametrizations.spectral_norm(model[2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    x = torch.randn(5, 6)
    y0 = model[0](x)
    y0.retain_grad()
    model[2](model[1](y0)).pow(2).mean().backward()
    want = float(y0.grad.double().norm())
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    layers = [n for n, info in p.record.layers.items() if info.role != "param"]
    assert not [n for n in layers if "parametrizations" in n], layers
    assert {"0", "1", "2"} <= set(layers)
    assert p.record.get(0, "0", "out_grad_norm") == pytest.approx(want, rel=1e-5)
    assert p.record.get(0, "0", "out_mean") == pytest.approx(float(y0.detach().mean()), rel=1e-5)


class _Fft(nn.Module):
    def forward(self, h):
        return torch.fft.rfft(h, dim=-1)


class _Fourier(nn.Module):
    """A Fourier layer with complex weights (FNO-style): rfft -> complex matmul -> irfft."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lift = nn.Linear(8, 8)
        self.fft = _Fft()
        self.w = nn.Parameter(torch.randn(5, 5, dtype=torch.cfloat) * 0.3)
        self.head = nn.Linear(8, 2)

    def spectrum(self, x):
        return self.fft(torch.tanh(self.lift(x)))

    def finish(self, z):
        return self.head(torch.fft.irfft(z @ self.w, n=8, dim=-1))

    def forward(self, x):
        return self.finish(self.spectrum(x))


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_complex_outputs_gradients_and_weights_are_measured(opt_name):
    # a complex gradient used to crash the user's backward inside the probe's hook (a float64
    # norm of a complex tensor); complex values count as their real and imaginary parts
    model = _Fourier()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2))
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 8)
        ref = _Fourier()
        ref.load_state_dict(model.state_dict())
        z = ref.spectrum(x)
        z.retain_grad()
        ref.finish(z).pow(2).mean().backward()
        want_z = float(torch.view_as_real(z.grad).double().norm())
        want_mean = float(torch.view_as_real(z.detach()).double().mean())
        want_g = float(torch.view_as_real(ref.w.grad).double().norm())
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        before = torch.view_as_real(model.w.detach()).double().clone()
        opt.step()
        r = p.record
        assert r.get(step, "fft", "out_grad_norm") == pytest.approx(want_z, rel=1e-5)
        assert r.get(step, "fft", "out_mean") == pytest.approx(want_mean, rel=1e-4, abs=1e-7)
        assert r.get(step, "w", "grad_norm") == pytest.approx(want_g, rel=1e-5)
        after = torch.view_as_real(model.w.detach()).double()
        assert r.get(step, "w", "update_ratio") == pytest.approx(
            float((after - before).norm() / before.norm()), rel=1e-4)


def test_half_precision_parameter_norms_on_the_cpu_are_not_rounded():
    # bfloat16 parameters' norms on the CPU were taken in bfloat16 (3 significant digits:
    # 0.29883 for 0.29793); found by the architecture zoo
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    loss = model(torch.randn(8, 16, dtype=torch.bfloat16)).float().pow(2).mean()
    loss.backward()
    want_g = float(model[0].weight.grad.double().norm())
    want_w = float(model[0].weight.detach().double().norm())
    opt.step()
    assert p.record.get(0, "0.weight", "grad_norm") == pytest.approx(want_g, rel=1e-6)
    assert p.record.get(0, "0.weight", "weight_norm") == pytest.approx(want_w, rel=1e-6)
