"""Per-layer values under DDP and FSDP are combined across ranks before they are recorded:
2 CPU processes (gloo) give the record a single process gives on the whole global batch."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from signalprop.probe import Probe
from signalprop.record import MODEL, Record

from ..helpers import train_probed

WORLD = 2
STEPS = 3
TIMEOUT = 120


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(model: nn.Module, probe: Probe, opt: torch.optim.Optimizer, x, y) -> None:
    train_probed(model, probe, opt, [(x, y)] * STEPS)


PROBE_KW = dict(max_forward_samples=None, max_percentile_samples=None)


def _worker(rank: int, tmp: str) -> None:
    # one pair of processes runs DDP, then FSDP (process start-up dominates the cost)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                                world_size=WORLD)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from signalprop.integrations.distributed import distributed_probe, save_on_rank_zero

        for kind in ("ddp", "fsdp"):
            net = _model()
            if kind == "ddp":
                model = nn.parallel.DistributedDataParallel(net)
            else:
                model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = _data()
            half = x.shape[0] // WORLD
            mine = slice(rank * half, (rank + 1) * half)
            probe = distributed_probe(model, optimizer=opt, **PROBE_KW)
            _train(model, probe, opt, x[mine], y[mine])
            probe.record.save(Path(tmp) / f"{kind}-rank{rank}.json.gz")  # to compare ranks
            save_on_rank_zero(probe.record, Path(tmp) / f"{kind}.json.gz")
        dist.destroy_process_group()
    except Exception:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, Record]:
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {TIMEOUT} s")
    except mp.ProcessRaisedException as e:
        errs = "\n".join(p.read_text() for p in tmp.glob("error*.txt"))
        pytest.fail(f"a worker failed:\n{errs or e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = {}
    for kind in ("ddp", "fsdp"):
        r0 = Record.load(tmp / f"{kind}-rank0.json.gz")
        r1 = Record.load(tmp / f"{kind}-rank1.json.gz")
        assert r0.data == r1.data, kind  # every rank recorded the same combined values
        out[kind] = Record.load(tmp / f"{kind}.json.gz")  # written by rank 0
    return out


def _single() -> Record:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, optimizer=opt, **PROBE_KW)
    _train(model, probe, opt, *_data())
    return probe.record


def _compare(rec: Record, ref: Record, metrics: list[str], rel: float = 1e-5) -> int:
    n = 0
    assert rec.steps == ref.steps == list(range(STEPS))
    for s in ref.steps:
        for layer, d in ref.data[s].items():
            for m in metrics:
                if m not in d:
                    continue
                got = rec.get(s, layer, m)
                assert got == pytest.approx(d[m], rel=rel, abs=1e-9), (s, layer, m, got, d[m])
                n += 1
    return n


@pytest.mark.slow
def test_ddp_record_equals_single_process(records) -> None:
    rec = records["ddp"]
    ref = _single()
    n = _compare(rec, ref, ["grad_norm", "weight_norm", "update_ratio", "out_grad_norm",
                            "out_mean", "out_std", "saturated_frac", "grad_norm_total",
                            "loss", "input_mean", "input_std", "input_absmax"])
    assert n > 60
    assert rec.meta["world_size"] == WORLD and rec.meta["sharded_params"] is False


@pytest.mark.slow
def test_fsdp_parameter_norms_are_whole_tensors(records) -> None:
    rec = records["fsdp"]
    ref = _single()
    assert rec.meta["sharded_params"] is True
    n = _compare(rec, ref, ["grad_norm", "weight_norm", "update_ratio", "loss"])
    assert n >= STEPS * 3 * 6
    s = ref.steps[-1]
    assert rec.get(s, MODEL, "grad_norm_total") == pytest.approx(
        ref.get(s, MODEL, "grad_norm_total"), rel=1e-5)


def test_reducer_needs_torch_distributed() -> None:
    from signalprop.integrations.distributed import DistributedReducer, auto_reducer

    assert auto_reducer(_model()) is None
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_process_group"):
            DistributedReducer()
