"""The initialisation and normalisation vocabularies: each face agrees with the others, aliases
resolve everywhere, unknown names fail clearly (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signalprop import init as public_init
from signalprop.engine import Arch, Population
from signalprop.engine.reference import MLP
from signalprop.remedies.transforms import insert_norm
from signalprop.sweep.config import validate_config
from signalprop.vocab import INITS, NORMS, init, norm_module

GAUSSIAN = [n for n in INITS.names() if init(n).std is not None]
FI, FO = 400, 300


@pytest.mark.parametrize("name", GAUSSIAN)
def test_gaussian_schemes_torch_and_engine_agree_on_the_std(name: str) -> None:
    """The empirical std of 120,000 weights from each face is the std face's value within 2%
    (the sampling error of a std from n normals is 1/sqrt(2n) = 0.2%)."""
    want = init(name).std(FI, FO)
    w = torch.empty(FO, FI)
    torch.manual_seed(0)
    init(name)(w, **INITS.defaults(name))  # the in-place torch face, as apply_init calls it
    assert float(w.std()) == pytest.approx(want, rel=0.02)
    g = torch.Generator().manual_seed(0)
    engine_w = Population._init_weight((FI, FO), name, 1.0, g)
    assert float(engine_w.std()) == pytest.approx(want, rel=0.02)


@pytest.mark.parametrize("name", INITS.names())
def test_every_torch_face_runs_on_a_model(name: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in m.parameters()]
    args = (torch.randn(32, 8),) if name == "lsuv" else ()
    public_init.apply_init(name, m, *args)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    changed = any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert changed == (name not in ("default", "scale"))  # scale's default factor is 1


def test_orthogonal_faces_have_unit_singular_values() -> None:
    w = torch.empty(64, 64)
    init("orthogonal")(w)
    g = torch.Generator().manual_seed(0)
    for m in (w, Population._init_weight((64, 64), "orthogonal", 1.0, g)):
        torch.testing.assert_close(torch.linalg.svdvals(m.double()), torch.ones(64, dtype=torch.float64),
                                   rtol=0, atol=1e-5)


def test_init_aliases_resolve_everywhere() -> None:
    assert INITS.aliases() == {"gaussian": "lecun", "he": "kaiming"}
    assert init("He").name == "kaiming" and public_init.INITS.get("gaussian").name == "lecun"
    assert validate_config({"init": "he"})["init"] == "kaiming"
    pop = Population(Arch(4, 2, depth=2, width=8), 2)
    pop.init_([0, 1], ["he", "gaussian"])  # the engine takes the aliases too
    with pytest.raises(ValueError, match=r"unknown initialisation 'glorot' valid choices: critical, "
                                         r"default, kaiming, lecun, lsuv, orthogonal, scale, xavier"):
        init("glorot")
    with pytest.raises(ValueError, match="unknown init 'scale'"):
        pop.init_([0, 1], "scale")  # a torch-only scheme: the engine names its own choices


@pytest.mark.parametrize("name, shape, cls", [
    ("none", (5,), nn.Identity), ("batch", (5,), nn.BatchNorm1d), ("batch", (5, 7), nn.BatchNorm1d),
    ("batch", (5, 7, 7), nn.BatchNorm2d), ("batch", (5, 3, 3, 3), nn.BatchNorm3d),
    ("layer", (5,), nn.LayerNorm), ("layer", (5, 7, 7), nn.GroupNorm),
])
def test_norm_module_face(name: str, shape: tuple[int, ...], cls: type) -> None:
    m = norm_module(name, shape)
    assert type(m) is cls
    x = torch.randn(16, *shape)
    y = m.train()(x)
    assert y.shape == x.shape
    if name != "none":  # normalised: zero mean, unit variance over the normalised axes (1e-4)
        dims = (0, *range(2, x.dim())) if name == "batch" else tuple(range(1, x.dim()))
        torch.testing.assert_close(y.mean(dims), torch.zeros_like(y.mean(dims)), atol=1e-5, rtol=0)
        torch.testing.assert_close(y.var(dims, unbiased=False), torch.ones_like(y.mean(dims)),
                                   atol=1e-3, rtol=0)


def test_norm_aliases_and_unknown_names() -> None:
    assert NORMS.aliases() == {"batchnorm": "batch", "bn": "batch", "layernorm": "layer",
                               "ln": "layer"}
    assert validate_config({"norm": "bn", "batch_size": 8})["norm"] == "batch"
    assert Arch(4, 2, norm="ln").norm == "layer"
    assert isinstance(MLP(4, 2, 2, 8, norm="bn").layers[0].norm, nn.BatchNorm1d)
    m = insert_norm(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), kind="layer")
    assert any(isinstance(x, nn.LayerNorm) for x in m.modules())
    with pytest.raises(ValueError, match=r"unknown norm 'group'.* valid choices: batch, layer, none"):
        norm_module("group", 4)
    with pytest.raises(ValueError, match="unknown norm kind 'none'"):
        insert_norm(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), kind="none")
