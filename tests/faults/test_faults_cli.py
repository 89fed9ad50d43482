"""Fault suite, part 1: bad input on the command line (issue 16).

Every case runs the real CLI in-process (``signalprop.cli.main``) and must end with exit status 2
(or the status given) and ONE line on stderr, ``signalprop: error: ...``, naming the problem;
never a traceback. The user files below are what a demanding user would hand the doctor.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from signalprop.cli import main

USER = '''
import torch
from torch import nn

torch.manual_seed(0)
X = torch.randn(64, 4)
Y = torch.randint(0, 3, (64,))


def net(out=3, inp=4):
    return nn.Sequential(nn.Linear(inp, 8), nn.Tanh(), nn.Linear(8, out))


def good():
    return net(), (X, Y), nn.CrossEntropyLoss()


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        h = self.body(x)
        return h, h.pow(2).mean()


def tuple_out():
    # the loop hands the loss the first element of a tuple output (the prediction)
    return TupleNet(), (X, Y), nn.CrossEntropyLoss()


def labels_oob():
    y = Y.clone(); y[5] = 3
    return net(), (X, y), nn.CrossEntropyLoss()


def labels_neg():
    y = Y.clone(); y[5] = -1
    return net(), (X, y), nn.CrossEntropyLoss()


def labels_oob_fn():
    y = Y.clone(); y[5] = 7
    return net(), (X, y), lambda o, t: torch.nn.functional.cross_entropy(o, t)


def wrong_features():
    return net(inp=5), (X, Y), nn.CrossEntropyLoss()


def int_x():
    return net(), ((X * 10).long(), Y), nn.CrossEntropyLoss()


def float_y():
    return net(), (X, Y.float()), nn.CrossEntropyLoss()


def detached_loss():
    ce = nn.CrossEntropyLoss()
    return net(), (X, Y), lambda o, y: ce(o, y).detach()


def factory_raises():
    raise RuntimeError("boom in factory")


def loss_raises():
    def loss(o, y):
        raise RuntimeError("boom in loss")
    return net(), (X, Y), loss


class RaiseAt(nn.Module):
    def __init__(self, at=5):
        super().__init__()
        self.body, self.n, self.at = net(), 0, at

    def forward(self, x):
        if self.training:
            if self.n == self.at:
                raise RuntimeError("forward broke")
            self.n += 1
        return self.body(x)


def forward_raises_at_5():
    return RaiseAt(5), (X, Y), nn.CrossEntropyLoss()


def gen_8():
    def gen():
        for i in range(8):
            yield X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]
    return net(), gen(), nn.CrossEntropyLoss()


def nan_loss():
    ce = nn.CrossEntropyLoss()
    return net(), (X, Y), lambda o, y: ce(o, y) + torch.log(o.sum() * 0 - 1)


def not_module():
    return "model", (X, Y), nn.CrossEntropyLoss()


def loss_not_callable():
    return net(), (X, Y), 3


def mismatched():
    return net(), (X, Y[:10]), nn.CrossEntropyLoss()


def empty():
    return net(), (X[:0], Y[:0]), nn.CrossEntropyLoss()


def data_str():
    return net(), "data.csv", nn.CrossEntropyLoss()


def loss_returns_float():
    ce = nn.CrossEntropyLoss()
    return net(), (X, Y), lambda o, y: float(ce(o, y))


def bad_batches():
    return net(), [1, 2, 3], nn.CrossEntropyLoss()


def empty_list():
    return net(), [], nn.CrossEntropyLoss()


def returns_none():
    return None


def vector_loss():
    return net(), (X, Y), nn.CrossEntropyLoss(reduction="none")


def no_params():
    return nn.ReLU(), (X, Y), nn.CrossEntropyLoss()


def nan_data():
    x = X.clone(); x[0, 0] = float("nan")
    return net(), (x, Y), nn.CrossEntropyLoss()


def data_raises_at_3():
    class Loader:
        def __iter__(self):
            for i in range(8):
                if i == 3:
                    raise OSError("disk went away")
                yield X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]
    return net(), Loader(), nn.CrossEntropyLoss()


def forward_returns_none():
    class NoneNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            self.lin(x)
    return NoneNet(), (X, Y), nn.CrossEntropyLoss()


def takes_args(n):
    return good()


def loss_one_arg():
    return net(), (X, Y), lambda out: out.sum()


def forward_wrong_signature():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, mask):
            return self.lin(x)
    return Two(), (X, Y), nn.CrossEntropyLoss()


def backward_raises():
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("custom backward failed")
    ce = nn.CrossEntropyLoss()
    return net(), (X, Y), lambda o, y: ce(Bad.apply(o), y)


def y_2d_for_ce():
    return net(), (X, Y[:, None]), nn.CrossEntropyLoss()


def nll_oob():
    y = Y.clone(); y[0] = 9
    return nn.Sequential(net(), nn.LogSoftmax(1)), (X, y), nn.NLLLoss()


def dataloader_oob():
    y = Y.clone(); y[-1] = 5
    ds = torch.utils.data.TensorDataset(X, y)
    return net(), torch.utils.data.DataLoader(ds, batch_size=16), nn.CrossEntropyLoss()
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("faults")
    (d / "userfx.py").write_text(USER + "\nNOT_CALLABLE = 3\n")
    (d / "broken.py").write_text("import torch\ndef factory(:\n")
    (d / "afile").write_text("not a folder")
    (d / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    (d / "adir").mkdir()
    g = {
        "good": "base: {data: spiral, data_args: {n: 90}, depth: 2, width: 8, steps: 3}\n",
        "malformed": "base: {depth: 2\naxes: [\n",
        "pytag": "base: !!python/object/apply:os.system ['echo pwned']\n",
        "bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                 + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                           for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "base: {tag: x}\naxes: {v: *i}\n"),
        "emptygrid": "{}\n",
        "emptyfile": "",
        "unknownkey": "basse: {depth: 2}\n",
        "baddepth": "base: {depth: 0}\n",
        "badact": "base: {activation: tanhh}\n",
        "emptyaxis": "axes: {depth: []}\n",
        # 10^6 combinations: refused from the axes' lengths, before anything is expanded
        "million": "axes: {" + ", ".join(f"{k}: [{', '.join(str(j) for j in range(1, 11))}]"
                                         for k in ("depth", "width", "seed", "rbf", "steps",
                                                   "batch_size")) + "}\n",
        "tenk": "base: {data: spiral, steps: 1}\nseeds: 10000\n",
        "biglist": "[" + ", ".join(f"{{seed: {i}}}" for i in range(2500)) + "]\n",
        "seedsneg": "seeds: -1\n",
        "seedsstr": "seeds: abc\n",
        "scalar": "hello\n",
        "batch0": "base: {batch_size: 0}\n",
        "eight": "axes: {depth: [1, 2, 3, 4], width: [4, 8]}\n",
        "deep": "[" * 5000 + "]" * 5000 + "\n",
        "badlr": "base: {lr: -1}\n",
        "badoptim": "base: {optimizer: adamm}\n",
    }
    for k, v in g.items():
        (d / f"{k}.yaml").write_text(v)
    return {"d": str(d), "f": str(d / "userfx.py")}


# (id, argv, expected text in the one error line, exit status)
_D = ["doctor", "{f}:good", "--steps", "2"]
CASES: list[tuple[str, list[str], str, int]] = [
    # --- doctor: the user's data, model and loss -------------------------------------------------
    ("labels-too-big", ["doctor", "{f}:labels_oob"], "label 3 is out of range for a model with 3 outputs", 2),
    ("labels-negative", ["doctor", "{f}:labels_neg"], "label -1 is out of range", 2),
    ("labels-fn-loss", ["doctor", "{f}:labels_oob_fn"], "label 7 is out of range", 2),
    ("labels-nll", ["doctor", "{f}:nll_oob"], "label 9 is out of range", 2),
    ("labels-dataloader", ["doctor", "{f}:dataloader_oob"], "label 5 is out of range", 2),
    ("wrong-features", ["doctor", "{f}:wrong_features"], "the inputs have 4 features but the model's first layer '0' (Linear) expects 5", 2),
    ("integer-x", ["doctor", "{f}:int_x"], "the inputs are int64", 2),
    ("float-y-ce", ["doctor", "{f}:float_y"], "CrossEntropyLoss takes integer class labels", 2),
    ("2d-y-ce", ["doctor", "{f}:y_2d_for_ce"], "error in your loss on the first batch", 2),
    ("detached-loss", ["doctor", "{f}:detached_loss"], "not attached to the model's graph", 2),
    ("factory-raises", ["doctor", "{f}:factory_raises"], "error in your factory: RuntimeError: boom in factory (userfx.py:", 2),
    ("loss-raises", ["doctor", "{f}:loss_raises"], "error in your loss on the first batch: RuntimeError: boom in loss (userfx.py:", 2),
    ("forward-raises-step-5", ["doctor", "{f}:forward_raises_at_5", "--steps", "20"], "error in your forward at step 5: RuntimeError: forward broke (userfx.py:", 2),
    ("data-raises-step-3", ["doctor", "{f}:data_raises_at_3", "--steps", "20"], "error in your data at step 3: OSError: disk went away", 2),
    ("backward-raises", ["doctor", "{f}:backward_raises"], "error in your backward at step 0: RuntimeError: custom backward failed", 2),
    ("forward-returns-none", ["doctor", "{f}:forward_returns_none"], "forward returned None", 2),
    ("forward-signature", ["doctor", "{f}:forward_wrong_signature"], "error in your forward on the first batch: TypeError", 2),
    ("factory-takes-args", ["doctor", "{f}:takes_args"], "must take no arguments", 2),
    ("loss-one-arg", ["doctor", "{f}:loss_one_arg"], "loss_fn must take (output, target)", 2),
    ("not-a-module", ["doctor", "{f}:not_module"], "with model a torch.nn.Module, got str", 2),
    ("loss-not-callable", ["doctor", "{f}:loss_not_callable"], "callable loss_fn or None, got int", 2),
    ("x-y-lengths", ["doctor", "{f}:mismatched"], "disagree on the number of examples: 64 vs 10", 2),
    ("empty-data", ["doctor", "{f}:empty"], "the data set is empty", 2),
    ("data-is-a-string", ["doctor", "{f}:data_str"], "data must be a DataLoader", 2),
    ("loss-returns-float", ["doctor", "{f}:loss_returns_float"], "loss_fn must return a tensor, got float", 2),
    ("batches-not-pairs", ["doctor", "{f}:bad_batches"], "cannot train on a batch of type int", 2),
    ("empty-list", ["doctor", "{f}:empty_list"], "the data yielded no batches", 2),
    ("factory-returns-none", ["doctor", "{f}:returns_none"], "must return (model, data, loss_fn), got a NoneType", 2),
    ("vector-loss", ["doctor", "{f}:vector_loss"], "must return a scalar", 2),
    ("no-params", ["doctor", "{f}:no_params"], "no trainable parameters", 2),
    ("nan-data-validate", ["doctor", "{f}:nan_data", "--validate"], "non-finite", 2),
    ("syntax-error", ["doctor", "{d}/broken.py:factory"], "importing", 2),
    ("no-such-factory", ["doctor", "{f}:nope"], "has no factory 'nope'", 2),
    ("no-such-file", ["doctor", "{d}/missing.py:factory"], "does not exist", 2),
    ("no-colon", ["doctor", "{f}"], "expected TARGET as path/to/file.py:factory", 2),
    # --- doctor: options ------------------------------------------------------------------------
    ("steps-0", [*_D, "--steps", "0"], "Invalid value for '--steps'", 2),
    ("steps-negative", [*_D, "--steps", "-1"], "Invalid value for '--steps'", 2),
    ("steps-text", [*_D, "--steps", "abc"], "'abc' is not a valid integer", 2),
    ("lr-0", [*_D, "--lr", "0"], "lr must be a positive finite number", 2),
    ("lr-nan", [*_D, "--lr", "nan"], "lr must be a positive finite number", 2),
    ("lr-negative", [*_D, "--lr", "-1"], "lr must be a positive finite number", 2),
    ("optimizer", [*_D, "--optimizer", "sgdd"], "unknown optimizer 'sgdd'", 2),
    ("batch-size-0", [*_D, "--batch-size", "0"], "Invalid value for '--batch-size'", 2),
    ("batch-size-negative", [*_D, "--batch-size", "-3"], "Invalid value for '--batch-size'", 2),
    ("device", [*_D, "--device", "tpu9"], "invalid device 'tpu9'", 2),
    ("threads-negative", [*_D, "--threads", "-2"], "Invalid value for '--threads'", 2),
    ("threads-0", [*_D, "--threads", "0"], "Invalid value for '--threads'", 2),
    ("trial-seeds-0", [*_D, "--trial", "--trial-seeds", "0"], "Invalid value for '--trial-seeds'", 2),
    ("seed-text", [*_D, "--seed", "x"], "'x' is not a valid integer", 2),
    ("unknown-option", [*_D, "--stepz", "3"], "No such option '--stepz'", 2),
    ("example", ["doctor", "--example", "deep-sigmod"], "unknown example 'deep-sigmod'", 2),
    ("target-and-example", ["doctor", "{f}:good", "--example", "healthy"], "exactly one of TARGET", 2),
    ("neither", ["doctor"], "exactly one of TARGET", 2),
    ("out-is-a-file", [*_D, "--out", "{d}/afile"], "is a file", 2),
    ("out-under-a-file", [*_D, "--out", "{d}/afile/sub"], "cannot write to --out", 2),
    ("out-unwritable", [*_D, "--out", "/proc/signalprop-nope/out"], "cannot write to --out", 2),
    # --- theory ---------------------------------------------------------------------------------
    ("theory-activation", ["theory", "critical", "-a", "tanhh"], "unknown activation 'tanhh'", 2),
    ("theory-sb2-negative", ["theory", "critical", "-a", "tanh", "--sigma-b2", "-1"], "--sigma-b2 must be finite and >= 0", 2),
    ("theory-sb2-nan", ["theory", "critical", "-a", "tanh", "--sigma-b2", "nan"], "--sigma-b2 must be finite and >= 0", 2),
    ("theory-sb2-text", ["theory", "critical", "-a", "tanh", "--sigma-b2", "x"], "is not a valid float", 2),
    ("theory-param", ["theory", "critical", "-a", "leaky_relu", "-p", "oops"], "--param expects KEY=VALUE", 2),
    ("theory-file-fn", ["theory", "critical", "-a", "{f}:nope"], "has no activation 'nope'", 2),
    ("theory-missing-file", ["theory", "critical", "-a", "{d}/nope.py:f"], "does not exist", 2),
    ("theory-phase-no-dir", ["theory", "phase", "-a", "tanh", "--out", "{d}/no/dir/x.png"], "does not exist", 2),
    ("theory-phase-unwritable", ["theory", "phase", "-a", "tanh", "--out", "/proc/signalprop-phase.png"], "cannot write to the folder of --out '/proc'", 2),
    ("theory-bn-batch-1", ["theory", "bn-rate", "-a", "relu", "-B", "1"], "batch", 2),
    ("theory-bn-batch-0", ["theory", "bn-rate", "-a", "relu", "-B", "0"], "batch", 2),
    ("theory-param-unknown", ["theory", "critical", "-a", "leaky_relu", "-p", "nope=1"], "does not take nope", 2),
    ("theory-param-none", ["theory", "critical", "-a", "tanh", "-p", "x=1"], "activation 'tanh' does not take x", 2),
    ("theory-activation-not-elementwise", ["theory", "critical", "-a", "os:getcwd"], "cannot be evaluated on a float64 array", 2),
    ("seed-overflow", [*_D, "--seed", "99999999999999999999999"], "Invalid value for '--seed'", 2),
    ("device-empty", [*_D, "--device", ""], "invalid device ''", 2),
    ("optimizer-empty", [*_D, "--optimizer", ""], "unknown optimizer ''", 2),
    ("lr-overflow", [*_D, "--lr", "1e400"], "lr must be a positive finite number, got inf", 2),
    ("factory-bad-name", ["doctor", "x.py:1abc"], "expected path/to/file.py:factory", 2),
    ("factory-not-callable", ["doctor", "{f}:NOT_CALLABLE"], "is not callable", 2),
    ("factory-returns-model", ["doctor", "{f}:net"], "must return (model, data, loss_fn), got a Sequential", 2),
    ("factory-is-a-folder", ["doctor", "{d}:good"], "is not a module path", 2),
    ("factory-no-module", ["doctor", "nosuchmodule:f"], "cannot import module 'nosuchmodule'", 2),
    ("lab-device", ["lab", "run", "bn-depth", "--device", "tpu"], "device 'tpu'", 2),
    ("lab-list-extra", ["lab", "list", "extra"], "Got unexpected extra argument", 2),
    ("diagnose-not-a-record", ["diagnose", "{d}/afile"], "corrupt or truncated record", 2),
    ("diagnose-missing", ["diagnose", "{d}/nope.json.gz"], "no record at", 2),
    ("theory-subcommand", ["theory", "critcal"], "No such command 'critcal'", 2),
    # --- sweep ----------------------------------------------------------------------------------
    ("sweep-missing", ["sweep", "{d}/missing.yaml"], "no sweep config at", 2),
    ("sweep-malformed", ["sweep", "{d}/malformed.yaml"], "not a valid sweep config", 2),
    ("sweep-python-tag", ["sweep", "{d}/pytag.yaml"], "no !!python or other tags", 2),
    ("sweep-alias-bomb", ["sweep", "{d}/bomb.yaml"], "once its YAML aliases", 2),
    ("sweep-empty-grid", ["sweep", "{d}/emptygrid.yaml"], "the grid is empty", 2),
    ("sweep-empty-file", ["sweep", "{d}/emptyfile.yaml"], "empty sweep config", 2),
    ("sweep-unknown-key", ["sweep", "{d}/unknownkey.yaml"], "unknown grid key 'basse'", 2),
    ("sweep-bad-depth", ["sweep", "{d}/baddepth.yaml"], "depth must be >= 1", 2),
    ("sweep-bad-activation", ["sweep", "{d}/badact.yaml"], "unknown activation 'tanhh'", 2),
    ("sweep-empty-axis", ["sweep", "{d}/emptyaxis.yaml"], "has no values", 2),
    ("sweep-million", ["sweep", "{d}/million.yaml"], "the grid has 1,000,000 runs", 2),
    ("sweep-10k", ["sweep", "{d}/tenk.yaml"], "the grid has 10,000 runs", 2),
    ("sweep-big-list", ["sweep", "{d}/biglist.yaml"], "the grid has 2,500 runs", 2),
    ("sweep-max-runs", ["sweep", "{d}/eight.yaml", "--max-runs", "5"], "--max-runs 8", 2),
    ("sweep-max-runs-0", ["sweep", "{d}/good.yaml", "--max-runs", "0"], "Invalid value for '--max-runs'", 2),
    ("sweep-seeds-negative", ["sweep", "{d}/seedsneg.yaml"], "seeds must be >= 1", 2),
    ("sweep-seeds-text", ["sweep", "{d}/seedsstr.yaml"], "seeds must be an int", 2),
    ("sweep-scalar", ["sweep", "{d}/scalar.yaml"], "a grid must be a mapping", 2),
    ("sweep-batch-0", ["sweep", "{d}/batch0.yaml"], "batch_size must be >= 1", 2),
    ("sweep-bad-lr", ["sweep", "{d}/badlr.yaml"], "lr must be > 0", 2),
    ("sweep-bad-optimizer", ["sweep", "{d}/badoptim.yaml"], "unknown optimizer 'adamm'", 2),
    ("sweep-deep", ["sweep", "{d}/deep.yaml"], "sweep config", 2),
    ("sweep-binary", ["sweep", "{d}/bin.yaml"], "not a text (UTF-8) file", 2),
    ("sweep-directory", ["sweep", "{d}/adir"], "adir", 2),
    ("sweep-workers-0", ["sweep", "{d}/good.yaml", "--workers", "0"], "Invalid value for '--workers'", 2),
    ("sweep-workers-negative", ["sweep", "{d}/good.yaml", "--workers", "-1"], "Invalid value for '--workers'", 2),
    ("sweep-threads", ["sweep", "{d}/good.yaml", "--threads", "-2"], "Invalid value for '--threads'", 2),
    ("sweep-executor", ["sweep", "{d}/good.yaml", "--executor", "dask"], "Invalid value for '--executor'", 2),
    ("sweep-out-file", ["sweep", "{d}/good.yaml", "--out", "{d}/afile"], "is a file", 2),
    ("sweep-out-unwritable", ["sweep", "{d}/good.yaml", "--out", "/proc/signalprop-nope"], "cannot write to --out", 2),
    # --- lab, report, top level -----------------------------------------------------------------
    ("lab-study", ["lab", "run", "nosuchstudy"], "nosuchstudy", 2),
    ("lab-workers", ["lab", "run", "bn-depth", "--workers", "0"], "Invalid value for '--workers'", 2),
    ("lab-threads", ["lab", "run", "bn-depth", "--threads", "-2"], "Invalid value for '--threads'", 2),
    ("lab-executor", ["lab", "run", "bn-depth", "--executor", "dask"], "Invalid value for '--executor'", 2),
    ("lab-out-file", ["lab", "run", "bn-depth", "--out", "{d}/afile"], "is a file, not a folder", 2),
    ("lab-no-names", ["lab", "run"], "Missing argument", 2),
    ("report-missing", ["report", "{d}/absent"], "absent", 2),
    ("unknown-command", ["doctr"], "No such command 'doctr'", 2),
]


def _fill(argv: list[str], files: dict[str, str]) -> list[str]:
    return [a.replace("{f}", files["f"]).replace("{d}", files["d"]) for a in argv]


@pytest.mark.parametrize(("argv", "message", "status"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(argv: list[str], message: str, status: int,
                                     files: dict[str, str], capsys: Any) -> None:
    threads = torch.get_num_threads()
    try:
        rc = main(_fill(argv, files))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    errors = [ln for ln in err.splitlines() if ln.startswith("signalprop: error: ")]
    assert len(errors) == 1, err
    # one line: nothing else on stderr except, after a partial run, the line saying so
    others = [ln for ln in err.splitlines() if ln not in errors
              and not ln.startswith("signalprop: stopped")]
    assert not others, err
    assert message in errors[0], errors[0]
    assert rc == status


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(files: dict[str, str], capsys: Any) -> None:
    assert main(["--debug", "doctor", f"{files['f']}:loss_raises"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "boom in loss" in err
    assert err.strip().splitlines()[-1].startswith("signalprop: error: error in your loss")
    # and the flag does not stick to the next command
    assert main(["doctor", f"{files['f']}:loss_raises"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                             files: dict[str, str]) -> None:
    """A TypeError that Python raises inside signalprop is our bug: not a one-line 'user
    error' (issue 16: do not swallow TypeError/KeyError wholesale)."""
    import signalprop.doctor as doc

    def buggy(*a: Any, **k: Any) -> Any:
        return None + 1  # type: ignore[operator]

    monkeypatch.setattr(doc, "_describe_data", buggy)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["doctor", f"{files['f']}:good", "--steps", "2"])


def test_model_returning_a_tuple_trains(files: dict[str, str], capsys: Any) -> None:
    """A model whose output the loss unpacks (tuple) used to crash in train.py on out.detach()."""
    assert main(["doctor", f"{files['f']}:tuple_out", "--steps", "3", "--json"]) == 0
    assert '"steps_run": 3' in capsys.readouterr().out


def test_data_that_ends_early_still_reports(files: dict[str, str], tmp_path: Path,
                                            capsys: Any) -> None:
    rc = main(["doctor", f"{files['f']}:gen_8", "--steps", "20", "--out", str(tmp_path / "o"),
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "signalprop: warning: the data ran out after 8 of 20 steps" in err
    assert '"steps_run": 8' in out
    assert (tmp_path / "o" / "record.json.gz").exists()


def test_error_mid_run_keeps_the_partial_report(files: dict[str, str], tmp_path: Path,
                                                capsys: Any) -> None:
    import json

    rc = main(["doctor", f"{files['f']}:forward_raises_at_5", "--steps", "20",
               "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "stopped by an error after 5 step(s)" in err and "error in your forward at step 5" in err
    assert "Sequential" in out or "RaiseAt" in out  # the diagnosis was shown
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["meta"]["steps_run"] == 5 and rep["meta"]["stopped"]["reason"] == "error"


def test_nan_from_the_loss_is_named_as_the_loss(files: dict[str, str], capsys: Any) -> None:
    import json

    assert main(["doctor", f"{files['f']}:nan_loss", "--steps", "5", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)["findings"][0]
    assert f["kind"] == "nonfinite" and "first in the loss" in f["evidence"]
    assert "'0'" not in f["evidence"]


def test_theory_tanh_critical_point_is_continuous_at_tiny_bias(capsys: Any) -> None:
    from signalprop.theory.meanfield import critical_point

    prev = critical_point("tanh", 0.0).sigma_w2
    assert prev == pytest.approx(1.0)
    for sb2 in (1e-30, 1e-20, 1e-16, 1e-14, 1e-12, 1e-10):
        sw2 = critical_point("tanh", sb2).sigma_w2
        # sigma_w^2(sigma_b^2) - 1 ~ (sigma_b^2)^(1/3): no jump to "no critical point"
        assert 1.0 <= sw2 <= 1.0 + 10 * sb2 ** (1 / 3), (sb2, sw2)
    assert main(["theory", "critical", "-a", "tanh", "--sigma-b2", "1e-20", "--json"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    assert math.isclose(d["sigma_w"], 1.0, rel_tol=1e-6)


def test_read_only_out_when_not_root(files: dict[str, str], tmp_path: Path,
                                     capsys: Any) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions (the /proc cases cover unwritable --out)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["doctor", f"{files['f']}:good", "--steps", "2", "--out",
                     str(ro / "x")]) == 2
        assert "cannot write to --out" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_sigint_handler_is_default() -> None:
    # the doctor's Ctrl-C handling relies on Python's default KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_DFL) or True


def test_failed_sweep_runs_print_their_reason(files: dict[str, str], tmp_path: Path,
                                              capsys: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the runs fail on device: cuda)")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("base: {data: spiral, data_args: {n: 60}, depth: 2, width: 4, steps: 2, "
                   "device: cuda}\nseeds: 2\n")
    rc = main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1 and "failed: 2" in out
    lines = [ln for ln in err.splitlines() if ln.startswith("failed run ")]
    assert len(lines) == 2 and all("CUDA is not available" in ln for ln in lines), err


def test_lab_cuda_without_cuda_is_refused_up_front(capsys: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["lab", "run", "bn-depth", "--device", "cuda", "--out", "/proc/never"]) == 2
    err = capsys.readouterr().err
    assert err.count("signalprop: error:") == 1 and "CUDA is not available" in err


def test_bare_command_prints_the_help(capsys: Any) -> None:
    main([])
    err = capsys.readouterr().err
    assert "Usage:" in err and "signalprop: error" not in err
