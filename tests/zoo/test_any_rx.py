"""Zoo: prescriptions that fit the architecture. Never what is already there (skips on a
residual net, batch norm where it exists), never what cannot be applied (block rewrites on a
model without an ``nn.Sequential`` of blocks); the trial of such a remedy says why not."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from signalprop.doctor import doctor
from signalprop.trial import trial

from .zoo_helpers import finding

D, C = 16, 4


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class ResNet(nn.Module):
    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(8, D)
        self.blocks = nn.ModuleList(ResBlock() for _ in range(depth))
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class FunctionalCNN(nn.Module):
    """Convolutions with functional activations: no nn.Sequential of (layer, activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(1, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(64, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x.unsqueeze(1)))))
        return self.head(h.flatten(1))


def _noise_batches(n: int = 80, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labels independent of the inputs, a fresh batch every step: nothing to learn."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, C, (32,), generator=g))
            for _ in range(n)]


def _all_rx(report) -> set[str]:  # noqa: ANN001
    return {p.remedy for f in report.findings for p in f.prescriptions}


def test_residual_bn_net_is_not_prescribed_skips_or_batch_norm() -> None:
    torch.manual_seed(0)
    model = ResNet()
    # truth by construction and by measurement: each block adds its input to its output
    blk, x = model.blocks[0].eval(), torch.randn(5, D)
    torch.testing.assert_close(blk(x) - x, blk.inner(x))
    r = doctor(model, _noise_batches(), nn.CrossEntropyLoss(), steps=40, lr=0.1,
               progress=False)
    f = finding(r.findings, "not_learning")
    assert f.prescriptions
    rx = _all_rx(r)
    assert not rx & {"residual", "highway", "batchnorm"}, rx
    assert r.record.meta["residual"] is True


def test_functional_cnn_gets_no_block_rewrites_and_trials_say_why() -> None:
    torch.manual_seed(0)
    batches = _noise_batches()
    r = doctor(FunctionalCNN(), batches, nn.CrossEntropyLoss(), steps=40, lr=0.1,
               progress=False)
    finding(r.findings, "not_learning")
    rx = _all_rx(r)
    assert not rx & {"residual", "highway", "batchnorm", "layernorm", "fewer_layers"}, rx
    # asked for anyway, the structural remedies are listed as not applicable, with a reason;
    # the others run on this model
    t = trial(FunctionalCNN, batches, F.cross_entropy,
              remedies=["residual", "batchnorm", "xavier_init", "clip_norm", "adam"],
              steps=5, seeds=1, probe=False)
    for name in ("residual", "batchnorm"):
        assert t[name].verdict == "not applicable" and t[name].error
        assert f"{name}: not applicable: " in str(t)
    for name in ("xavier_init", "clip_norm", "adam"):
        assert t[name].error is None and t[name].seeds == 1


def test_each_architecture_fact_removes_what_cannot_apply() -> None:
    from signalprop.diagnosis import Thresholds
    from signalprop.diagnosis.architecture import architecture_facts
    from signalprop.diagnosis.context import Context
    from signalprop.diagnosis.prescriptions import not_applicable, rx_saturation, rx_vanishing

    facts = architecture_facts(FunctionalCNN())
    assert facts["activation_modules"] is False and facts["sequential_blocks"] is False
    assert facts["residual"] is None  # a custom forward: unknown, never guessed
    assert architecture_facts(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))["residual"] is False
    nums = {"initial_fraction": 0.0, "mean_fraction": 0.9}
    free = Context(activations={"a": "tanh"})
    stuck = Context(activations={"a": "tanh"}, activation_modules=False, sequential_blocks=False,
                    residual=True, has_bn=True)
    assert {"relu", "batchnorm"} <= {p.remedy for p in rx_saturation(free, nums, Thresholds())}
    got = {p.remedy for p in rx_saturation(stuck, nums, Thresholds())}
    assert not got & {"relu", "scaled_activation", "batchnorm", "layernorm"}, got
    got = {p.remedy for p in rx_vanishing(stuck, {}, Thresholds())}
    assert not got & {"residual", "highway", "batchnorm", "fewer_layers", "relu"}, got
    for remedy in ("relu", "residual", "batchnorm", "fewer_layers"):
        assert not_applicable(stuck, remedy)  # each comes with its reason
        assert not_applicable(free, remedy) is None
