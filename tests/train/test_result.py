"""The one divergence policy's pieces (signalprop.train.result)."""

from __future__ import annotations


def test_a_finite_float64_gradient_above_float32_range_is_finite() -> None:
    """The divergence policy's gradient check keeps float64 norms in float64 (a norm of 1e40 is
    finite; it used to be summed in float32 and read as overflow)."""
    import math

    import torch

    from signalprop.train.result import _grads_finite

    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([1e40, 0.0, 0.0], dtype=torch.float64)
    assert _grads_finite([p])
    p.grad = torch.tensor([math.inf, 0.0, 0.0], dtype=torch.float64)
    assert not _grads_finite([p])
    q = torch.zeros(2, requires_grad=True)
    q.grad = torch.tensor([math.nan, 1.0])
    assert not _grads_finite([q])


def test_sparse_gradients_are_checked_by_their_values() -> None:
    """nn.Embedding(sparse=True) gives sparse gradients, which torch's norm kernels reject: the
    package's training loop (doctor, trials) used to crash on them."""
    import math

    import torch

    from signalprop.train.result import _grads_finite

    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    assert emb.weight.grad.is_sparse and _grads_finite([emb.weight])
    emb.weight.grad = torch.sparse_coo_tensor([[2]], [[math.nan, 0.0, 0.0]], (5, 3),
                                              check_invariants=True)
    assert not _grads_finite([emb.weight])
