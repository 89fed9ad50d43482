"""One instrumented training loop, :func:`fit`, shared by ``doctor``, ``trial`` and the lab.

It trains any ``nn.Module`` on any batch form:

- ``(x, y)`` or ``(x1, x2, ..., y)`` tuples: ``model(*xs)``, then ``loss_fn(prediction, y)``;
- dict batches (Hugging Face style): ``model(**batch)``, then ``loss_fn(prediction, batch)``, or,
  with ``loss_fn=None``, the loss the model returns (``output.loss`` / ``output["loss"]``);
- anything else through ``step_fn(model, batch) -> loss``.

The *prediction* handed to ``loss_fn`` is the output itself when it is a tensor, its ``.logits``
(``ModelOutput``) or ``["logits"]`` entry, or the first element of a tuple.

One divergence policy (:func:`divergence_reason`): a non-finite loss or gradient, or a loss above
``diverge_factor x max(first loss, 1)``, stops the run; divergence is an outcome recorded in the
:class:`FitResult`, never an exception. Ctrl-C stops the run too and returns what was trained
(``interrupted=True``).

Summary numbers have one definition each: :func:`signalprop.stats.grad_ratio` and friends on the
record, :attr:`FitResult.final_loss` on the losses, and the *trivial baseline*
(:class:`TrivialBaseline`): the loss of the best constant prediction under the run's own loss,
computed from the data (entropy of the label frequencies for classification, ln C when balanced;
the target variance for squared-error regression).

The package is split by responsibility: :mod:`~signalprop.train.batches` (data forms, devices,
the forward pass and its loss), :mod:`~signalprop.train.optim` (optimisers),
:mod:`~signalprop.train.baseline` (the trivial baseline), :mod:`~signalprop.train.result` (the
divergence policy and :class:`FitResult`) and :mod:`~signalprop.train.loop` (:func:`fit`); every
name is importable from ``signalprop.train`` as before.
"""

from signalprop.train.baseline import TrivialBaseline
from signalprop.train.batches import (
    TARGET_KEYS,
    DataLike,
    LossFn,
    StepFn,
    StepOutput,
    as_batches,
    batch_tensors,
    check_finite_data,
    example_inputs,
    forward_loss,
    model_loss,
    prediction,
    target_of,
    to_device,
)
from signalprop.train.batches import _split_batch as _split_batch  # kept for old callers
from signalprop.train.loop import fit, train
from signalprop.train.optim import OptimizerSpec, make_optimizer, make_optimizers, optimizer_name
from signalprop.train.result import DIVERGE_FACTOR, FitResult, TrainResult, divergence_reason

__all__ = [
    "DIVERGE_FACTOR",
    "TARGET_KEYS",
    "DataLike",
    "FitResult",
    "LossFn",
    "OptimizerSpec",
    "StepFn",
    "StepOutput",
    "TrainResult",
    "TrivialBaseline",
    "as_batches",
    "batch_tensors",
    "check_finite_data",
    "divergence_reason",
    "example_inputs",
    "fit",
    "forward_loss",
    "make_optimizer",
    "make_optimizers",
    "model_loss",
    "optimizer_name",
    "prediction",
    "target_of",
    "to_device",
    "train",
]
