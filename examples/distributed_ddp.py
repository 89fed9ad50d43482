"""signalprop under DistributedDataParallel: two CPU processes (gloo), each with half of every
batch. The probe combines each recorded step's per-layer values across ranks before recording
(norms add in squares, counts add up), so the record is the whole global batch's; rank 0 writes
it. The script then trains the same model in one process on the whole batch and prints the
largest relative difference between the two records' gradient norms.

    python examples/distributed_ddp.py [--steps 5] [--out examples-out/ddp]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import parser
from torch import nn

from signalprop.integrations.distributed import distributed_probe, save_on_rank_zero
from signalprop.probe import Probe
from signalprop.record import Record
from signalprop.train import fit

WORLD = 2


def make() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)


def worker(rank: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank,
                            world_size=WORLD)
    net, x, y = make()
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    half = slice(rank * 32, (rank + 1) * 32)
    probe = distributed_probe(model, optimizer=opt)
    fit(model, (x[half], y[half]), nn.functional.cross_entropy, steps=steps, optimizer=opt,
        batch_size=32, probe=probe)
    save_on_rank_zero(probe.record, Path(out) / "record.json.gz")
    dist.destroy_process_group()


def main() -> None:
    args = parser(__doc__, 5, "examples-out/ddp").parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store").unlink(missing_ok=True)
    mp.spawn(worker, args=(args.steps, str(args.out.resolve())), nprocs=WORLD, join=True)
    ddp = Record.load(args.out / "record.json.gz")

    model, x, y = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    single = Probe(model, optimizer=opt)
    fit(model, (x, y), nn.functional.cross_entropy, steps=args.steps, optimizer=opt,
        batch_size=64, probe=single)
    worst = max(abs(ddp.get(s, n, m) / single.record.get(s, n, m) - 1)
                for s in single.record.steps for n in single.record.layer_names(role="param")
                for m in ("grad_norm", "update_ratio"))
    worst_h = max(abs(ddp.get(s, n, "out_grad_norm") / single.record.get(s, n, "out_grad_norm")
                      - 1) for s in single.record.steps
                  for n in single.record.layer_names(metric="out_grad_norm"))
    print(f"DDP on {WORLD} processes vs one process on the whole batch, {args.steps} steps:")
    print(f"  largest relative difference of ||dL/dW|| and update ratios: {worst:.1e}")
    print(f"  largest relative difference of ||dL/dh||: {worst_h:.1e}")
    print(f"record (written by rank 0): {args.out / 'record.json.gz'}")


if __name__ == "__main__":
    main()
