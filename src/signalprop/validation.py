"""Input checks: data that cannot work is refused before training, in one readable line.

The doctor calls :func:`check_inputs` before training so that data that cannot work (labels out of
range for the model's output width, wrong feature count, integer inputs, float class labels, a
loss detached from the graph) is refused up front with a message that names the value and the fix,
instead of a traceback from deep inside PyTorch at step 0 or, worse, at step 5000.

The error types and :class:`user_code` (errors inside the user's own code re-raised as
:class:`UserCodeError` naming the step and the file:line) live in :mod:`signalprop.errors`, below
the training loop; they are re-exported here under their old names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from signalprop.data import Dataset
from signalprop.errors import (  # the public names are re-exported: they were always here
    UserCodeError,
    UserError,
    _class_loss,
    _float_target_problem,
    _label_problem,
    check_batch_size,
    check_out_dir,
    check_positive_int,
    check_signature,
    debug_requested,
    deliberate,
    explain_forward_error,
    explain_loss_error,
    first_line,
    not_attached_message,
    print_debug,
    raised_in_signalprop,
    user_code,
    user_location,
)
from signalprop.train.batches import StepOutput, as_batches, forward_loss, to_device

__all__ = [
    "UserCodeError",
    "UserError",
    "check_batch_size",
    "check_inputs",
    "check_out_dir",
    "check_positive_int",
    "check_signature",
    "debug_requested",
    "deliberate",
    "explain_forward_error",
    "explain_loss_error",
    "first_line",
    "not_attached_message",
    "print_debug",
    "raised_in_signalprop",
    "user_code",
    "user_location",
]


def _all_targets(data: Any) -> torch.Tensor | None:
    """Every target when the data are tensors in memory (cheap to check in full)."""
    if isinstance(data, Dataset):
        return data.y_train
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        return data[-1]  # (x, ..., y)
    ds = getattr(data, "dataset", None)
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[-1]
    return None


def _peek(data: Any, batch_size: int, seed: int) -> Any | None:
    """The first batch of a re-iterable data source, or ``None`` for a one-shot iterator (a
    generator: peeking would consume a batch that training then misses)."""
    if isinstance(data, torch.utils.data.DataLoader):
        pass
    elif hasattr(data, "__next__") or (hasattr(data, "__iter__") and iter(data) is data):
        return None
    src = as_batches(data, batch_size=batch_size, seed=seed)
    with user_code("data", when=" on the first batch"):
        it = src()
        try:
            return next(it)
        except StopIteration:
            return None


def check_inputs(model: nn.Module, data: Any, loss_fn: Any = None, *, step_fn: Any = None,
                 batch_size: int = 64, seed: int = 0) -> None:
    """Check the data against the model and the loss before training: one forward pass and
    loss on the first batch, in eval mode (nothing is trained, no batch-norm statistics move,
    and the graph is dropped).

    Checked: the batch size; the signature of ``loss_fn``; that the first batch goes through the
    model (integer inputs and a wrong feature count are named as such); for cross-entropy/NLL,
    class labels within the output width (over all the targets when they are tensors in
    memory) and of an integer type; that the loss is a scalar tensor attached to the graph (not
    ``.detach()``-ed or computed under ``no_grad``); that ``forward`` returned something.

    One-shot generators are not peeked at (that would lose a batch): the training loop reports
    their errors with the step.

    Raises:
        UserError: naming the problem and the fix (:class:`UserCodeError` when the user's forward
            or loss raised something else).
    """
    check_batch_size(batch_size)
    if step_fn is None and loss_fn is not None and callable(loss_fn) and not isinstance(
            loss_fn, nn.Module):
        check_signature(loss_fn, 2, "loss_fn", "take (output, target)")
    batch = _peek(data, batch_size, seed)
    if batch is None:
        return
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = to_device(batch, dev)
    was_training = model.training
    model.eval()  # no batch-norm statistics updated, no dropout randomness consumed
    try:
        with torch.enable_grad():
            so: StepOutput = forward_loss(model, batch, loss_fn, step_fn, when=" on the first batch")
    finally:
        model.train(was_training)
    if step_fn is not None:
        return
    if so.pred is None:
        raise UserError("your model's forward returned None on the first batch: does it end "
                        "with a return statement?")
    cls = _class_loss(loss_fn)
    if cls is not None and isinstance(so.pred, torch.Tensor):
        whole = _all_targets(data)
        y = whole if whole is not None else so.target
        problem = _float_target_problem(loss_fn, so.pred, y) or _label_problem(so.pred, y, cls[1])
        if problem:
            raise UserError(problem)
