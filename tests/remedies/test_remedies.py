"""The REMEDY registry and the model transforms behind it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signalprop.remedies import (
    RBF,
    REMEDIES,
    TRANSFORMS,
    Highway,
    Remedy,
    Residual,
    Scaled,
    fewer_layers,
    get_remedy,
    highway,
    insert_norm,
    residual,
    swap_activation,
    weight_norm,
)


def _mlp(act: type[nn.Module] = nn.Tanh, depth: int = 4, width: int = 16, d_in: int = 8):
    layers: list[nn.Module] = [nn.Linear(d_in, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


class _SeqToOne(nn.Module):
    """A recurrent classifier for the remedies that act on recurrent modules."""

    def __init__(self, cls: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cls(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


#: remedy -> the recurrent module its test model needs
_RECURRENT = {"lstm": nn.RNN, "gru": nn.RNN, "orthogonal_recurrent_init": nn.RNN,
              "identity_recurrent_init": nn.RNN, "truncated_bptt": nn.RNN,
              "forget_gate_bias": nn.LSTM}


class _TinyPostLN(nn.Module):
    """A post-LN transformer classifier of 8 features seen as 2 tokens of 4 (for ``pre_ln``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.reshape(-1, 2, 4))).mean(1))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _theory_available() -> bool:
    try:
        from signalprop.theory.torch_adapter import critical_  # noqa: F401
    except ImportError:
        return False
    return True


def test_registry_names_are_the_diagnosis_contract() -> None:
    from signalprop.diagnosis.findings import REMEDY_NAMES

    assert sorted(REMEDIES.names()) == sorted(REMEDY_NAMES)


@pytest.mark.parametrize("name", sorted(REMEDIES.names()))
def test_every_remedy_applies_and_trains_one_step(name: str) -> None:
    from signalprop.train import make_optimizer

    if name == "critical_init" and not _theory_available():
        pytest.skip("signalprop.theory.torch_adapter.critical_ has not landed")
    torch.manual_seed(0)
    # pre_ln rewrites transformer layers, the recurrent remedies an RNN, every other an MLP
    if name == "pre_ln":
        model: nn.Module = _TinyPostLN()
    elif name in _RECURRENT:
        model = _SeqToOne(_RECURRENT[name])
    else:
        model = _mlp(nn.Tanh, depth=4)
    before_state, before_repr = _state(model), repr(model)
    x = torch.randn(32, 8) if name not in _RECURRENT else torch.randn(32, 5, 8)
    y = torch.randint(0, 3, (32,))
    rem = get_remedy(name)
    assert isinstance(rem, Remedy) and rem.name == name and rem.description
    new = rem.apply(model, x)
    # the input model is never modified
    assert repr(model) == before_repr
    for k, v in _state(model).items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)
    opt_name, lr, kw = rem.optimizer_config("sgd", 0.1, {})
    opt = make_optimizer(opt_name, new, lr, **kw)
    gt = rem.make_grad_transform()
    params_before = [p.detach().clone() for p in new.parameters()]
    loss = nn.functional.cross_entropy(new(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in new.parameters() if p.requires_grad)
    if gt is not None:
        gt(new)
    opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(params_before, new.parameters(),
                                                              strict=True))


def test_pre_ln_switches_post_ln_layers_and_refuses_others() -> None:
    from signalprop.remedies.transforms import pre_ln

    torch.manual_seed(0)
    post = _TinyPostLN()
    new = pre_ln(post)
    assert all(m.norm_first for m in new.modules() if isinstance(m, nn.TransformerEncoderLayer))
    assert not any(m.norm_first for m in post.modules()
                   if isinstance(m, nn.TransformerEncoderLayer))
    assert isinstance(new.encoder.norm, nn.LayerNorm)  # pre-LN stacks end with a norm
    x = torch.randn(5, 8)
    # same parameters, different placement: a different function of the input
    assert not torch.allclose(new(x), post(x))
    with pytest.raises(ValueError, match="already pre-LN"):
        pre_ln(new)
    with pytest.raises(ValueError, match="no torch.nn.TransformerEncoderLayer"):
        pre_ln(_mlp())


def test_warmup_remedy_reaches_fit() -> None:
    from signalprop.trial import trial

    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    rem = get_remedy("warmup")
    assert rem.warmup == pytest.approx(0.1) and get_remedy("warmup+adam").warmup == 0.1
    seen: list[float] = []

    def opt(params, lr):  # noqa: ANN001, ANN202 -- records the rate of every step
        o = torch.optim.SGD(params, lr=lr)
        o.register_step_pre_hook(lambda o, *a: seen.append(o.param_groups[0]["lr"]))
        return o

    trial(lambda: _mlp(), (x, y), nn.functional.cross_entropy, remedies=["warmup"], steps=20,
          seeds=1, baseline=False, optimizer=opt, lr=0.1, probe=False)
    # 10% of 20 steps = 2 warm-up steps: 0.05, then 0.1
    assert seen[:3] == pytest.approx([0.05, 0.1, 0.1])


def test_combinations_and_overrides() -> None:
    r = get_remedy("batchnorm+adam")
    assert r.name == "batchnorm+adam"
    m = r.apply(_mlp(), torch.randn(16, 8))
    assert any(isinstance(c, nn.BatchNorm1d) for c in m.modules())
    assert r.optimizer_config("sgd", 0.1) == ("adam", 1e-3, {})
    # learning-rate multipliers compose with a switched optimiser
    assert get_remedy("adam+lower_lr").optimizer_config("sgd", 0.1)[1] == pytest.approx(1e-4)
    assert get_remedy("lower_lr", factor=0.5).optimizer_config("sgd", 0.2)[1] == pytest.approx(0.1)
    # grad transforms chain
    gt = get_remedy("agc+clip_norm").make_grad_transform()
    assert [type(t).__name__ for t in gt.transforms] == ["AdaptiveClip", "ClipByGlobalNorm"]
    with pytest.raises(ValueError, match="both choose an optimiser"):
        get_remedy("adam+rmsprop")
    with pytest.raises(ValueError, match="single remedy"):
        get_remedy("adam+agc", lr=1.0)


def test_unknown_remedy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="did you mean 'batchnorm'") as e:
        get_remedy("batchnrm")
    assert "fewer_layers" in str(e.value)
    with pytest.raises(ValueError, match="unknown remedy"):
        get_remedy("batchnorm+nope")
    with pytest.raises(ValueError, match="malformed"):
        get_remedy("batchnorm+")


@pytest.mark.parametrize("kind, cls", [("batchnorm", nn.BatchNorm1d), ("layernorm", nn.LayerNorm)])
@pytest.mark.parametrize("position", ["before", "after"])
def test_insert_norm_positions(kind, cls, position) -> None:
    m = _mlp(nn.Sigmoid, depth=3)
    for batch in (torch.randn(8, 8), None):  # shapes from data, or from the Linear widths
        new = insert_norm(m, batch, kind=kind, position=position)
        mods = list(new.children())
        acts = [i for i, c in enumerate(mods) if isinstance(c, nn.Sigmoid)]
        assert len(acts) == 3
        for i in acts:
            neighbour = mods[i - 1] if position == "before" else mods[i + 1]
            assert isinstance(neighbour, cls)
        assert new(torch.randn(5, 8)).shape == (5, 3)


def test_norm_on_conv_maps() -> None:
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(6, 1, 8, 8)
    bn = insert_norm(cnn, x, "batchnorm")
    assert sum(isinstance(c, nn.BatchNorm2d) for c in bn.modules()) == 2
    ln = insert_norm(cnn, x, "layernorm")
    assert sum(isinstance(c, nn.GroupNorm) for c in ln.modules()) == 2
    assert bn(x).shape == ln(x).shape == (6, 2)


def test_norm_on_rbf_distance() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(RBF(8, 32), nn.Linear(32, 3))
    x = torch.randn(64, 8)
    new = insert_norm(m, x, "batchnorm", position="before")
    rbf = new[0]
    assert isinstance(rbf.norm, nn.BatchNorm1d)
    seen = {}
    rbf.norm.register_forward_hook(lambda mod, i, o: seen.setdefault("u", o.detach()))
    new(x)
    # the squared distances reach the kernel standardised per unit (train-mode batch norm)
    torch.testing.assert_close(seen["u"].mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["u"].var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="already has a norm"):
        insert_norm(new, x, "layernorm")
    after = insert_norm(m, x, "layernorm", position="after")
    assert isinstance(after[1], nn.LayerNorm)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = self.act(lin(x))
        return x


def test_transforms_refuse_what_they_cannot_do() -> None:
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="functionally"):
        insert_norm(_Functional(), x)
    with pytest.raises(ValueError, match="called 3 times"):
        insert_norm(_Reused(), x)
    with pytest.raises(ValueError, match="no nn.Sequential"):
        residual(_Functional(), x)
    funnel = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="equal input and output widths"):
        residual(funnel, torch.randn(3, 8))
    with pytest.raises(ValueError, match="no block keeps its width"):
        fewer_layers(funnel, torch.randn(3, 8))
    with pytest.raises(ValueError, match="functionally"):
        swap_activation(_Functional())
    with pytest.raises(ValueError, match="cannot infer the activation"):
        get_remedy("critical_init").apply(_Functional(), x)
    with pytest.raises(ValueError, match="example input batch"):
        get_remedy("lsuv_init").apply(_mlp(), None)
    with pytest.raises(ValueError, match="norm position"):
        insert_norm(_mlp(), None, position="inside")


def test_non_sequential_parent_gets_wrapped() -> None:
    m = _Functional()
    m.act = nn.Tanh()  # an attribute activation in a custom module ...

    class WithAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(x)))

    new = insert_norm(WithAct(), torch.randn(5, 4), "layernorm")
    assert isinstance(new.act, nn.Sequential) and isinstance(new.act[0], nn.LayerNorm)
    assert new(torch.randn(2, 4)).shape == (2, 2)


def test_residual_computes_x_plus_block() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    new = residual(m, torch.randn(3, 4), alpha=0.5)
    assert isinstance(new[2], Residual) and not isinstance(new[0], Residual)
    x = torch.randn(5, 4)
    h = torch.tanh(m[0](x))
    expected = m[4](h + 0.5 * torch.tanh(m[2](h)))
    torch.testing.assert_close(new(x), expected)


def test_highway_starts_near_identity_with_closed_gate() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    new = highway(m, None, gate_bias=-30.0)
    assert isinstance(new[2], Highway)
    x = torch.randn(5, 4)
    torch.testing.assert_close(new(x), m[4](torch.tanh(m[0](x))), atol=1e-6, rtol=0)


def test_fewer_layers_and_weightnorm_and_swaps() -> None:
    torch.manual_seed(0)
    m = _mlp(nn.Sigmoid, depth=10)
    small = fewer_layers(m, torch.randn(4, 8), fraction=0.3)
    assert sum(isinstance(c, nn.Linear) for c in small.modules()) == 3 + 1
    assert small(torch.randn(4, 8)).shape == (4, 3)
    assert sum(isinstance(c, nn.Linear) for c in fewer_layers(m, None, keep=1).modules()) == 2
    wn = weight_norm(m)
    x = torch.randn(6, 8)
    torch.testing.assert_close(wn(x), m(x), atol=1e-6, rtol=1e-5)  # same function at init
    assert all(hasattr(c, "parametrizations") for c in wn.modules() if isinstance(c, nn.Linear))
    relu = swap_activation(m, None, "relu")
    assert sum(isinstance(c, nn.ReLU) for c in relu.modules()) == 10
    assert not any(isinstance(c, nn.Sigmoid) for c in relu.modules())
    sc = TRANSFORMS.build("scaled_activation", model=m)
    assert sum(isinstance(c, Scaled) for c in sc.modules()) == 10
    with pytest.raises(ValueError, match="unknown activation"):
        swap_activation(m, None, "rleu")


@pytest.mark.parametrize("name", sorted(TRANSFORMS.names()))
def test_every_model_transform_builds_a_working_model(name: str) -> None:
    m = _TinyPostLN() if name == "pre_ln" else _mlp(nn.Tanh, depth=4)
    x = torch.randn(16, 8)
    new = TRANSFORMS.build(name, model=m, example_batch=x)
    assert new is not m
    new(x).sum().backward()
    assert all(p.grad is not None for p in new.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["xavier", "kaiming", "orthogonal", "lsuv", "scale", "critical"])
def test_every_init_name_runs(name: str) -> None:
    from signalprop.init import INITS, apply_init

    if name == "critical" and not _theory_available():
        pytest.skip("signalprop.theory.torch_adapter.critical_ has not landed")
    assert name in INITS
    m = _mlp(nn.Tanh, depth=4)
    x = torch.randn(32, 8)
    args = (x,) if name == "lsuv" else ()
    kw = {"activation": "tanh"} if name == "critical" else {}
    apply_init(name, m, *args, **kw)
    out = m(x)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_every_grad_transform_name_runs() -> None:
    from signalprop.remedies import GRAD_TRANSFORMS

    for name in GRAD_TRANSFORMS.names():
        m = _mlp(nn.Tanh, depth=2)
        m(torch.randn(4, 8)).pow(2).sum().backward()
        t = GRAD_TRANSFORMS.build(name)
        t(m)
        assert set(t.stats()) == {"norm_before", "norm_after"}
