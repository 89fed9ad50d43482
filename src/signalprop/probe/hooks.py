"""The probe's hooks: module forward hooks and gradient hooks, the hot path of a recorded step.

Every hook holds a weak reference to its probe and does the least it can: stash a sample or a
norm for the end of the step (see :mod:`signalprop.probe.core` for the cost model).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module_mod

from signalprop import stats
from signalprop.probe import recurrent
from signalprop.probe.functional import ProbeMode
from signalprop.probe.sites import _NORMS, MAX_SITES, _active_units, _Site, hook_leaf, repeated_pass
from signalprop.probe.wrappers import _AttrPatch, _call, _EagerPatch, _ForwardPatch

if TYPE_CHECKING:  # pragma: no cover
    from signalprop.probe.core import Probe


def add_step_hooks(p: Probe) -> None:
    """The hooks of a recorded step (removed at its end)."""
    ref, add = p._ref, p._fwd_handles.append
    for cm in p._compiled:
        add(_EagerPatch(cm))
    add(p.model.register_forward_pre_hook(partial(_root_pre_hook, ref)))
    if p._use_mode:
        add(p.model.register_forward_hook(partial(_root_post_hook, ref), always_call=True))
        for m in p.model.modules():
            if m is not p.model and not isinstance(m, torch.jit.ScriptModule):
                add(m.register_forward_pre_hook(partial(_push_hook, ref)))
                add(m.register_forward_hook(partial(_pop_hook, ref), always_call=True))
    if not p._use_mode and p._fn_patches:
        for mod, attr, func, where, kind, fname in p._fn_patches:
            add(_AttrPatch(mod, attr, partial(_functional_call, ref, func, where, kind, fname)))
    if p.backward:
        for name in p._blocks:
            mod = p.model.get_submodule(name)
            add(mod.register_forward_pre_hook(partial(_block_pre_hook, ref, name)))
    looped: set[int] = set()
    for seq, entries in p._seq_plan:
        add(_ForwardPatch(seq, partial(_sequential_forward, ref, seq, entries)))
        looped.update(i for _, i in entries if i is not None)
    for i, (_, m) in enumerate(p._mods):
        if i not in looped:
            add(m.register_forward_hook(partial(_fwd_hook, ref, i)))
    for i, (_, m) in enumerate(p._mods):
        if recurrent.kind_of(m) is not None and recurrent.unsupported(m) is None:
            # step-by-step forward on recorded steps: dL/dh_t and the gates
            fn = recurrent.unrolled_rnn if isinstance(m, nn.RNNBase) else \
                recurrent.unrolled_cell
            add(_ForwardPatch(m, partial(fn, m, partial(_rnn_stash, ref, i))))
    if p.forward and p.max_forward_samples is None:
        # (sampled outputs are copies taken as the module returns: nothing to guard)
        for m in p.model.modules():
            if getattr(m, "inplace", False) is True and not isinstance(m, torch.jit.ScriptModule):
                # an in-place activation overwrites the output of the layer before
                # it: keep that layer's recorded output intact
                add(m.register_forward_pre_hook(partial(_inplace_pre_hook, ref)))
    if p.weights and not p.backward:
        # the end of every backward pass: parameter gradients before any clipping
        # (with output hooks, the first of them queues it: no hook per parameter)
        for _, prm in p.params:
            add(prm.register_post_accumulate_grad_hook(partial(_param_hook, ref)))


def _sequential_forward(ref: weakref.ref, seq: nn.Sequential,
                        entries: list[tuple[nn.Module, int | None]], input: Any) -> Any:
    # nn.Sequential.forward on a recorded step, calling what each child's forward hook would
    # (children without one of their own run on PyTorch's fast call path)
    if len(seq._modules) != len(entries) or any(
            c is not m for c, (m, _) in zip(seq._modules.values(), entries, strict=False)):
        p = ref()
        if p is not None:  # the container changed since mapping: hooks from the next step on
            p._seq_plan = [(s, e) for s, e in p._seq_plan if s is not seq]
        return nn.Sequential.forward(seq, input)
    p = ref()
    if p is None or not (p.backward and p._active and torch.is_grad_enabled()):
        for module, i in entries:
            out = module(input)
            if i is not None:
                _fwd_hook(ref, i, module, (input,), out)
            input = out
        return input
    # a child's site whose gradient hook waits for the next child: (site, the node that made
    # its output, which output of it; taken now, before any in-place op of the next child)
    pending: tuple[_Site, Any, int] | None = None
    kinds = p._kinds
    for module, i in entries:
        out = module(input)
        if pending is not None and i is not None and kinds[i] is not None and \
                type(out) is torch.Tensor and _pairable(module, out, pending):
            # an activation of the previous child's output (its only consumer in this loop):
            # ONE hook on the activation's backward node sees both gradients, dL/dh (its
            # output) and dL/dy (its input, the previous child's output)
            s = _record_call(ref, i, module, (input,), out, grad=False)
            if s is not None:
                out.grad_fn.register_hook(partial(_pair_hook, ref, pending[0].ograds,
                                                  s.ograds, [-1]))
            else:
                _hook_grad(ref, *pending)
            pending = None
        else:
            if pending is not None:
                _hook_grad(ref, *pending)
                pending = None
            if i is not None:
                s = _record_call(ref, i, module, (input,), out, grad=False)
                t = out if type(out) is torch.Tensor else _output_tensor(out)
                if s is not None and t is not None and t.requires_grad:
                    pending = (s, t.grad_fn, t.output_nr)
                    if pending[1] is None:  # a leaf output: a tensor hook at once
                        hook_leaf(s, t, partial(_out_grad_hook, ref, s.ograds, None))
                        pending = None
                    elif module._forward_hooks:  # (another hook may use the output elsewhere)
                        _hook_grad(ref, *pending)
                        pending = None
        input = out
    if pending is not None:
        _hook_grad(ref, *pending)
    return input


def _pairable(module: nn.Module, h: torch.Tensor, prev: tuple[_Site, Any, int]) -> bool:
    """Whether ``h = module(y)`` came from one backward node whose only input is the previous
    child's output ``y`` (``prev``: its site, node, output index), with no other hook on the
    way that could have used ``y`` elsewhere."""
    if module._forward_hooks or module._forward_pre_hooks or not h.requires_grad or \
            _global_hooks():
        return False
    fn = h.grad_fn
    if fn is None:
        return False
    nxt = fn.next_functions
    return len(nxt) == 1 and nxt[0][0] is prev[1] and nxt[0][1] == prev[2]


def _global_hooks() -> bool:
    return bool(_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)


def _hook_grad(ref: weakref.ref, s: _Site, fn: Any, k: int) -> None:
    """The gradient hook :func:`_record_output` registers, on the node that made output
    ``k`` (no time steps)."""
    fn.register_prehook(partial(_out_node_hook, ref, s.ograds, None, k, [-1]))


def _pair_hook(ref: weakref.ref, store_in: list[tuple[Any, Any]], store_out: list[tuple[Any, Any]],
               seen: list[int], grad_inputs: tuple[torch.Tensor | None, ...],
               grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
    # (runs once per layer pair in every recorded backward: the CPU case inline)
    if _repeated(ref, seen, (grad_outputs[0], store_out), (grad_inputs[0], store_in)):
        return
    p = ref()
    if p is not None and not p._cb_queued:
        _backward_started(ref)
    for g, store in ((grad_outputs[0], store_out), (grad_inputs[0], store_in)):
        if g is None:
            continue
        nrm = stats.HOST_NORMS.get(g.dtype) if g.is_cpu else None
        if nrm is None or g.requires_grad:
            _out_grad_hook(ref, store, None, g)
        else:
            store.append(_host_norm(nrm, g))


def _functional_call(ref: weakref.ref, func: Callable[..., Any], where: str, kind: str,
                     fname: str, *args: Any, **kwargs: Any) -> Any:
    # an activation function called through a module attribute, patched on recorded steps
    out = func(*args, **kwargs)
    p = ref()
    if p is not None and p._active and isinstance(out, torch.Tensor):
        p._functional_site(where, kind, fname, args, out)
    return out


def _root_pre_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    # a new forward pass of the whole model: call sites are counted from here
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    if p._root_watched:
        # the model is itself one watched module (a bare cell or layer): each call is one of
        # its calls or time steps, not a new forward pass
        if p.forward:
            p._inputs.append(args[0].detach()) if args and isinstance(args[0], torch.Tensor) else None
        return
    if p._grads_seen and p._witness is not None and \
            p._witness.grad is None and p.optimizers and not p._stepped_opts and \
            p._pending is None:
        # a backward happened, then the gradients were zeroed without an optimiser step: the
        # step was skipped (e.g. a GradScaler not given to the probe found inf/NaN gradients)
        bound = vars(module).get("forward")  # the forward this call already runs
        p._skip_step()
        if not p._active:
            return
        for seq, entries in p._seq_plan:
            if seq is module and not (isinstance(bound, partial) and
                                      bound.func is _sequential_forward):
                # the new step records the model's children through its loop, but this call
                # runs the forward bound before the loop was installed: hooks, for this step
                for child, i in entries:
                    if i is not None:
                        p._fwd_handles.append(child.register_forward_hook(
                            partial(_fwd_hook, ref, i)))
    p._nforward += 1
    p._calls.clear()
    p._new_pass = False
    if p._use_mode:
        if p._mode is None:
            p._mode = ProbeMode(p)
            p._mode.__enter__()
            p._stack = []
        p._mode_depth += 1
    if p.forward and args and isinstance(args[0], torch.Tensor):
        p._inputs.append(args[0].detach())


def _root_post_hook(ref: weakref.ref, module: nn.Module, args: tuple, out: Any) -> None:
    p = ref()
    if p is None or p._mode is None:
        return
    p._mode_depth -= 1
    if p._mode_depth == 0:
        p._mode.__exit__(None, None, None)
        p._mode = None
        p._stack = []


def _push_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    p = ref()
    if p is None or p._mode is None:
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    name = p._names.get(id(module), type(module).__name__)
    p._stack.append((name, module, x if p._mapping else None))
    if p._mapping:
        p._entry.setdefault(name, len(p._path))
        if name in p._blocks and p.backward and x is not None and x.requires_grad:
            # a block found in an earlier forward of this step (micro-batches)
            hook_block_input(p._block_grads.setdefault(name, []), x)


def _pop_hook(ref: weakref.ref, module: nn.Module, args: tuple, out: Any) -> None:
    p = ref()
    if p is None or p._mode is None or not p._stack:
        return
    name = p._stack.pop()[0]
    if p._mapping and name in p._blocks:
        p._block_done(name, out)
    elif p._mapping and p._stack and isinstance(module, _NORMS):
        for n, _, _ in p._stack:
            if n in p._blocks:
                p._blocks[n]["has_norm"] = True


def _block_pre_hook(ref: weakref.ref, name: str, module: nn.Module, args: tuple) -> None:
    # the residual stream: ||dL/dx|| at the block's input
    p = ref()
    if p is None or not p._active or not torch.is_grad_enabled():
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is not None and x.requires_grad and _call_index(p, name) is not None:
        hook_block_input(p._block_grads.setdefault(name, []), x)


def hook_block_input(store: list[tuple[Any, Any]], x: torch.Tensor) -> None:
    """||dL/dx|| of a residual block's input into ``store`` (see ``sites.repeated_pass``)."""
    if x.grad_fn is None:
        x.register_hook(partial(_grad_hook, store, None))
    else:  # (on the node that made x: what a tensor hook sees, at less cost)
        x.grad_fn.register_prehook(partial(_block_node_hook, store, x.output_nr, [-1]))


def _block_node_hook(store: list, k: int, seen: list[int], grad_outputs: tuple) -> None:
    if (g := grad_outputs[k]) is not None and not repeated_pass(seen, _task_id(), ((g, store),)):
        _grad_hook(store, None, g)


def _fwd_hook(ref: weakref.ref, i: int, module: nn.Module, inp: tuple, out: Any) -> None:
    # the forward hook of a watched module (returns None: a hook's result replaces the output)
    _record_call(ref, i, module, inp, out)


def _record_call(ref: weakref.ref, i: int, module: nn.Module, inp: tuple, out: Any,
                 grad: bool = True) -> _Site | None:
    # Hot path: runs for every watched module on every forward of a recorded step. Checks in
    # order of cost; module facts (conv or not) were looked up once when the map was made.
    # (grad=False: the caller hooks the output's gradient itself; returns the site recorded)
    p = ref()
    if p is None or not p._active:
        return None
    if type(out) is not torch.Tensor:
        out = _output_tensor(out)
        if out is None:
            return None
    if not torch.is_grad_enabled():
        return None
    k = _call_index(p, i)
    if k is None:
        return None
    cand = _inferred_kind(p, i, out) if p._infer else None
    if p._loop[i]:
        t, k = k, 0
    else:
        t, k = -1, (k if k < MAX_SITES else MAX_SITES - 1)
    j = p._site_of.get((i, k))
    if j is None:
        j = p._new_site(i, k)
    s = p._sites[j]
    if cand is not None and s.kind is None and s.unchecked is None:
        s.unchecked = (f"a custom activation (it calls {cand[0]} inside): no saturation or "
                       "dead-unit check is defined for its function")
    if p._recurrent[i]:
        if not s.used:
            s.used = True
            p._used.append(j)
        _attach_time(p, i, s, module)
    ctx = p._ctx[i]
    if ctx is not None:
        p._conv_context = ctx
    _record_output(p, j, s, out, inp[0] if inp and isinstance(inp[0], torch.Tensor) else None, t,
                   grad)
    return s


#: The id of the autograd graph task running on this thread (-1: none, not inside backward).
_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _call_index(p: Probe, key: Any) -> int | None:
    """Which call of ``key`` (a module index, a functional site's key) this is in the current
    forward pass; ``None``: not a call to record. A call inside backward is activation
    checkpointing recomputing a segment: without reentrance its outputs were recorded when it
    first ran, and gradients flow through those (left out: pooled in, every output would count
    twice); with reentrance the first run had no grad mode and the recomputed graph is the one
    backward runs through (recorded, counted apart from the forward pass's calls)."""
    if _task_id() >= 0:
        calls = p._bw_calls
        k = calls.get(key, 0)
        calls[key] = k + 1
        return None if key in p._fwd_keys else k
    if p._new_pass:
        # the first call after a backward pass (a micro-batch of gradient accumulation, also
        # when the loop calls submodules rather than the model): call sites count from here
        p._new_pass = False
        p._calls.clear()
    k = p._calls.get(key, 0)
    p._calls[key] = k + 1
    if not k:
        p._fwd_keys.add(key)
    return k


def _output_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module's output stands for: the first floating-point (or complex) tensor of
    a tuple, list, dict (a Hugging Face ``ModelOutput``) or dataclass (RNN (output, h_n), cells'
    (h, c): the first). Integer tensors (indices, codes: ``(argmax, values)``) are skipped:
    their "mean" is no signal and no gradient reaches them."""
    if isinstance(out, tuple | list):
        items: Any = out
    elif isinstance(out, dict):
        items = out.values()
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = (getattr(out, f.name) for f in dataclasses.fields(out))
    else:
        items = (out,)
    for t in items:
        if isinstance(t, nn.utils.rnn.PackedSequence):
            t = t.data
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            return t
    return None


def _inferred_kind(p: Probe, i: int, out: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """A parameter-free leaf module that called an activation function: it IS that activation
    if it returned the function's output (then ``None``); else the candidate, for a note."""
    cand = p._infer.pop(i, None)
    if cand is not None and cand[1] is out and p._kinds[i] is None:
        p._kinds[i] = cand[0]
        for st in p._sites:
            if st.module == p._mods[i][0]:
                st.kind = cand[0]
        return None
    return cand


def _record_output(p: Probe, j: int, s: _Site, out: torch.Tensor, inp: torch.Tensor | None,
                   t: int, grad: bool = True) -> None:
    if not s.used:
        s.used = True
        p._used.append(j)
    if p.forward and (s.shape is None or s.shape == out.shape[1:]) and out.numel():
        # (an empty output, e.g. an empty batch, has no values to describe: left out)
        # pooled over micro-batches and time steps when their shapes agree; an output of
        # another shape (dynamic padding) is left out of the forward statistics
        o = out.detach()
        s.shape = o.shape[1:]
        if o.is_complex():  # (a spectral layer: its values are the real and imaginary parts)
            o = torch.view_as_real(o)
        if p.max_forward_samples is None:  # exact: keep the output until the end of the step
            s.outs.append(o)
            s.versions.append(out._version)
            p._stash[out.data_ptr()] = j
            if s.needs_input and inp is not None:
                s.ins.append(inp.detach())
        else:  # a small copy now: nothing of the output is kept alive or seen overwritten
            n = o.numel()
            key = (n, o.get_device())  # (an int: cheaper than comparing device objects)
            if s.idx_n != key:
                s.idx, s.idx_n = p._sample_index(o), key
            s.outs.append(torch.take(o, s.idx))
            s.numel += n
            kind = s.kind
            if kind is not None:
                if kind in _NEEDS_INPUT and inp is not None:
                    s.ins.append(p._sample(inp.detach()))
                if kind in stats.RECTIFIERS:
                    s.alive.append(_active_units(o, s.conv or o.dim() >= 4))
    if grad and p.backward and out.requires_grad:
        tstore = None
        if t >= 0:
            while len(s.tgrads) <= t:
                s.tgrads.append([])
            tstore = s.tgrads[t]
        fn = out.grad_fn
        if fn is None:  # a leaf
            hook_leaf(s, out, partial(_out_grad_hook, p._ref, s.ograds, tstore))
        else:
            # a pre-hook on the node that made the output: the same gradient a tensor hook
            # sees (also when the output is later modified in place), at a third less cost
            fn.register_prehook(partial(_out_node_hook, p._ref, s.ograds, tstore,
                                        out.output_nr, [-1]))

def _rnn_stash(ref: weakref.ref, i: int, hs: list[list[torch.Tensor]],
               gates: dict[str, list[torch.Tensor]]) -> None:
    p = ref()
    if p is not None and p._active and torch.is_grad_enabled():
        p._rnn_tmp[i] = (hs, gates)


def _attach_time(p: Probe, i: int, s: _Site, module: nn.Module) -> None:
    """Hook the hidden states of one unrolled recurrent call (per-time-step dL/dh_t)."""
    tmp = p._rnn_tmp.pop(i, None)
    if tmp is None:
        if not s.loop and s.unchecked is None:
            s.unchecked = recurrent.unsupported(module) or (
                "no per-time-step gradients: packed sequences are not unrolled")
        return
    hs, gates = tmp
    if p.forward:
        for g, v in gates.items():
            s.gates.setdefault(g, []).extend(v)
    if not p.backward:
        return
    while len(s.tgrads) < len(hs):
        s.tgrads.append([])
    for t, hl in enumerate(hs):
        for h in hl:
            if h.requires_grad:
                h.register_hook(partial(_grad_hook, s.tgrads[t], None))

def _inplace_pre_hook(ref: weakref.ref, module: nn.Module, args: tuple) -> None:
    p = ref()
    if p is None or not p._active or not args or not isinstance(args[0], torch.Tensor):
        return
    p.save_before_inplace(args[0])


def _param_hook(ref: weakref.ref, param: torch.Tensor) -> None:
    _backward_started(ref)


def _out_node_hook(ref: weakref.ref, store: list[tuple[Any, Any]], tstore: list | None,
                   k: int, seen: list[int], grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
    g = grad_outputs[k]  # (None: no gradient reached this output; as a tensor hook, nothing)
    if g is not None and not _repeated(ref, seen, (g, store), (g, tstore)):
        _out_grad_hook(ref, store, tstore, g)


def _repeated(ref: weakref.ref, seen: list[int], *entries: tuple[Any, list | None]) -> bool:
    """Whether this pass's gradients of an output are left out (``sites.repeated_pass``)."""
    task = _task_id()
    if seen[0] == -1 and len(seen) == 1 and not torch.is_grad_enabled():
        seen[0] = task  # (the usual case, inline: the first pass, without create_graph)
        return False
    if not repeated_pass(seen, task, entries):
        return False
    if (p := ref()) is not None and not p._cb_queued:  # (this pass's end reads the grads)
        _backward_started(ref)
    return True


def _out_grad_hook(ref: weakref.ref, store: list[tuple[Any, Any]], tstore: list | None,
                   g: torch.Tensor) -> None:
    p = ref()
    if p is not None and not p._cb_queued:
        _backward_started(ref)
    # (the CPU case of _grad_hook inline: this runs once per watched output in every backward)
    nrm2 = stats.HOST_NORMS.get(g.dtype) if g.is_cpu else None
    if nrm2 is None or g.requires_grad or tstore is not None:
        _grad_hook(store, tstore, g)
        if p is not None and tstore is None and isinstance(store[-1][0], torch.Tensor):
            _pack(p, store)
        return
    store.append(_host_norm(nrm2, g))


#: Device norms of this many sites are packed into one tensor (see :func:`_pack`).
PACK: int = 16


def _pack(p: Probe, store: list[tuple[Any, Any]]) -> None:
    """Note a site's fresh device norm; every :data:`PACK` of them are stacked into one
    tensor and the sites keep views of it. A 0-dim tensor per site would each hold a whole
    allocator block (512 bytes on CUDA: 20 KiB for 40 sites, alive through backward, where
    a step's memory peaks), for 8 bytes of value."""
    loose = p._loose
    loose.append((store, len(store) - 1))
    if len(loose) < PACK:
        return
    packed = torch.stack([st[k][0] for st, k in loose])
    for i, (st, k) in enumerate(loose):
        st[k] = (packed[i], st[k][1])
    loose.clear()


def _backward_started(ref: weakref.ref) -> None:
    p = ref()
    if p is None or not p._active:
        return
    p._grads_seen = True
    p._new_pass = True
    p._bw_calls.clear()
    if not p._cb_queued:
        p._cb_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(partial(_requeue_end, ref))
        p._early_forward_stats()


def _requeue_end(ref: weakref.ref) -> None:
    # at the end of backward: queue the real work behind every callback queued during the
    # pass, so DDP's all-reduce finalisation has written the averaged gradients before we read
    # them (final callbacks may queue more; they run in order)
    torch.autograd.Variable._execution_engine.queue_callback(
        partial(_call, ref, "_on_backward_end")
    )


def _host_norm(nrm2: Callable[[np.ndarray], float], g: torch.Tensor) -> tuple[float, float]:
    """(||g||, NaN/Inf count) of a CPU gradient on the host: BLAS dot or nrm2 (see
    :func:`signalprop.stats.dot_norm` and :func:`_grad_hook`), the exact count only when the norm is not
    finite."""
    a = (g if g.is_contiguous() else g.contiguous()).numpy().ravel()
    n = nrm2(a)
    return n, 0.0 if n < math.inf else float(np.count_nonzero(~np.isfinite(a)))


def _grad_hook(store: list[tuple[Any, Any]], tstore: list | None, g: torch.Tensor) -> None:
    # Runs inside backward for every watched output: reduce to a norm now, keep no tensor.
    # Float32 squares underflow below ~1e-19 (vanishing gradients are exactly what is measured)
    # and the gradient is gone by the time a host sees the norm, so the norm must be robust
    # here. On the CPU: BLAS dot, or the scaled nrm2 where squares could underflow or
    # overflow (:func:`signalprop.stats.dot_norm`; no temporary; ~1 us for 16k values), whose result is a host
    # float: the CPU is the host, there is no device to wait
    # for, and a NaN/Inf norm is followed by an exact count at once. On an accelerator: a
    # float64 norm and the NaN/Inf count on the device, no host synchronisation.
    nrm2 = stats.HOST_NORMS.get(g.dtype) if g.is_cpu else None
    if nrm2 is not None and not g.requires_grad:
        v = _host_norm(nrm2, g)
    else:
        # the NaN/Inf count costs launches and a bool temporary of g's size (412 MB for a
        # GPT-2 logit gradient), so it is only taken once some probe has seen a non-finite
        # value (None: not counted; recorded as NaN if the norm turns out non-finite)
        v = (
            stats.norm64(g),
            (~torch.isfinite(g)).sum() if _COUNT_NONFINITE[0] else None,
        )
    store.append(v)
    if tstore is not None:
        tstore.append(v)


#: Activation kinds whose saturation is measured on the input (the hook samples it too).
_NEEDS_INPUT = frozenset(k for k, v in stats.SATURATING.items() if not v[0])

#: Whether gradient hooks on an accelerator count NaN/Inf entries: switched on for good once a
#: probe has seen a non-finite norm (a diverging run), off while training is healthy.
_COUNT_NONFINITE = [False]
