"""Ask the doctor about your own model.

``signalprop.doctor`` trains a *copy* of the model briefly under a probe, diagnoses the record,
and returns a report: findings with evidence, ranked prescriptions, the record and an HTML page.
The model here is a classic failure: 20 sigmoid layers with PyTorch's default init, whose
gradient shrinks by a constant factor per layer going backwards (chi_1 < 1) while the units
saturate.

    python examples/doctor_own_model.py [--steps 200] [--trial] [--out examples-out/doctor]

The same from the shell, with a factory file:
``signalprop doctor examples/doctor_own_model.py:factory --steps 200 --out report``.
"""

from __future__ import annotations

import torch
from _common import mlp_layers, parser
from torch import nn

import signalprop


class DeepSigmoid(nn.Module):
    """Any nn.Module works; nothing here knows about signalprop."""

    def __init__(self, d_in: int, n_classes: int, depth: int = 20, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(*mlp_layers(d_in, depth, width, nn.Sigmoid))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def factory() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], nn.Module]:
    """The model, the data and the loss (the form ``signalprop doctor file.py:factory`` takes)."""
    data = signalprop.load_dataset("digits")
    model = DeepSigmoid(data.x_train.shape[1], data.num_classes)
    return model, (data.x_train, data.y_train), nn.CrossEntropyLoss()


def main() -> None:
    ap = parser(__doc__, 200, "examples-out/doctor")
    ap.add_argument("--trial", action="store_true", help="also train the top remedies")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, data, loss_fn = factory()
    report = signalprop.doctor(
        model, data, loss_fn, steps=args.steps, optimizer="sgd", lr=0.1,
        trial=args.trial, progress=False,
    )
    print(report)
    for f in report.findings:
        print(f"\n{f.kind} ({f.severity}) in {len(f.layers)} layer(s): {f.evidence}")
        for p in f.prescriptions[:3]:
            print(f"  {p.rank}. {p.remedy}: {p.reason}")
    paths = report.save(args.out)
    print(f"\nreport: {paths['html']}  json: {paths['json']}")


if __name__ == "__main__":
    main()
