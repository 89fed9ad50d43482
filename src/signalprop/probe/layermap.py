"""The layer map: call sites in first-firing order, residual blocks, parameters placed on the
signal path, and their declaration in the record (what the torch-function mode reports lands
here too)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from signalprop.probe import recurrent
from signalprop.probe.functional import ProbeMode
from signalprop.probe.hooks import _call_index, _grad_hook, _record_output
from signalprop.probe.modules import activation_kind, scripted, watched_modules
from signalprop.probe.sites import _CELLS, MAX_SITES, _Site
from signalprop.record import LayerInfo


class LayerMap:
    """Mixin of :class:`~signalprop.probe.core.Probe`: the map of the signal path."""

    def _init_map(self, modules: Callable[[str, nn.Module], bool] | None) -> None:
        """The watched modules and the (empty) layer map, drawn on the first recorded step."""
        model = self.model
        mods = watched_modules(model)
        if modules is not None:
            mods = [(n, m) for n, m in mods if modules(n, m)]
        self._mods = mods
        self._root_watched = any(m is model for _, m in mods)
        self._kinds = [activation_kind(m) for _, m in mods]
        # recurrent cells are called once per time step: their calls are the time steps of one
        # layer; any other module called several times in one forward pass has one call site
        # (one layer of the signal path) per call
        self._loop = [isinstance(m, _CELLS) for _, m in mods]
        self._recurrent = [recurrent.kind_of(m) is not None for _, m in mods]
        # the layer map: call sites in first-firing order, kept across steps
        self._sites: list[_Site] = []
        self._site_of: dict[tuple[Any, int], int] = {}
        self._declared = 0  # sites already declared in the record
        self._params_declared = False
        # what module hooks cannot see (functional activations, residual adds, norm placement,
        # parameters used outside a module call) is read by a torch-function mode around the
        # forward: on the first recorded step (the mapping step), then only if needed
        self._names = {id(m): n for n, m in model.named_modules()}
        self._watched = {id(m): i for i, (_, m) in enumerate(mods)}
        self._path: list[str] = []  # sites and free parameters in first-use order
        self._mapping = True
        self._use_mode = self.forward or self.backward
        self._mode: ProbeMode | None = None
        self._mode_depth = 0
        self._stack: list[tuple[str, nn.Module, Any]] = []
        self._fn_found = False
        self._inplace_seen = False
        watched_names = {n for n, _ in mods}
        self._free_params = {
            id(prm): n for n, prm in self.params
            if (n.rsplit(".", 1)[0] if "." in n else "") not in watched_names
        }
        self._param_slot: dict[str, tuple[int, str]] = {}  # free param -> (path slot, where)
        # id of an add/norm output -> (which, a weak reference to it: the map must not keep
        # the forward's tensors alive)
        self._producer: dict[int, tuple[str, weakref.ref]] = {}
        self._blocks: dict[str, dict[str, Any]] = {}  # residual block -> facts
        self._block_grads: dict[str, list[tuple[Any, Any]]] = {}
        self._conv_context = False
        # what a module's call says of the units that follow (True: conv channels; False:
        # features; None: unchanged), looked up once rather than in every hook call
        self._ctx = [True if isinstance(m, nn.modules.conv._ConvNd) else False
                     if isinstance(m, nn.Linear | nn.Embedding | nn.MultiheadAttention |
                                   nn.RNNBase) else None for _, m in mods]
        self._entry: dict[str, int] = {}  # module -> path position when first entered
        self._infer: dict[int, tuple[str, torch.Tensor]] = {}  # module -> (kind, its output)
        # functional activations: where they were called, how often per forward pass, and the
        # attribute patches that see them after mapping (None: the mode)
        self._fn_seen: dict[tuple[str, Any], tuple[str, str]] = {}
        self._fn_counts: dict[str, int] = {}
        self._fn_expected: dict[str, float] = {}
        self._fn_patches: list[tuple[nn.Module, str, Any, str, str, str]] | None = None
        # after mapping: nn.Sequential loops that record their children (see _sequential_plan)
        self._seq_plan: list[tuple[nn.Module, list[tuple[nn.Module, int | None]]]] = []

    @property
    def layer_map(self) -> list[str]:
        """Names of the recorded call sites in forward execution order (the signal path)."""
        return [s.name for s in self._sites]

    def _new_site(self, i: int, k: int) -> int:
        name, m = self._mods[i]
        site = _Site(
            name=name if k == 0 else f"{name}#{k + 1}",
            module=name,
            type=type(m).__name__,
            kind=self._kinds[i],
            call=k,
            loop=self._loop[i],
        )
        return self._add_site(site, (i, k))

    def _add_site(self, site: _Site, key: Any) -> int:
        site.depth = len(self._path)
        site.conv = self._conv_context
        self._path.append(site.name)
        self._sites.append(site)
        j = len(self._sites) - 1
        self._site_of[key] = j
        return j

    # ---- the torch-function mode's callbacks ------------------------------------------------------
    def _functional_activation(self, kind: str, fname: str, args: tuple, out: torch.Tensor,
                               func: Any = None) -> None:
        """An activation called as a function (F.relu, torch.sigmoid, x.tanh() ...)."""
        grad = torch.is_grad_enabled()
        if not grad and not self._mapping:
            return
        # (without grad mode on the mapping step it is still noted for the patch plan: a
        # segment under reentrant activation checkpointing runs without it, then again with it
        # inside backward, where only a patched attribute sees the call)
        enclosing, mod = (self._stack[-1][0], self._stack[-1][1]) if self._stack else ("", None)
        if mod is not None:
            i = self._watched.get(id(mod))
            if isinstance(mod, nn.RNNBase | nn.RNNCellBase):
                return  # the gates and states of a recurrent layer (measured as such)
            if i is not None and self._kinds[i] is not None:
                return  # inside an activation module (nn.ReLU calls F.relu): its hook records it
            if i is not None and next(mod.parameters(recurse=False), None) is None and \
                    next(mod.children(), None) is None:
                # a parameter-free leaf module calling an activation function: it IS that
                # activation if it returns the function's output (checked in its forward
                # hook); otherwise the function is an intermediate step of its own activation
                if grad:
                    self._infer[i] = (kind, out)
                return
        self._fn_found = True
        if self._mapping:
            # (where it was called, what): attribute patches replace the mode after mapping
            self._fn_seen.setdefault((enclosing, func), (kind, fname))
        if grad:
            self._functional_site(enclosing or type(self.model).__name__, kind, fname, args, out)

    def _functional_site(self, where: str, kind: str, fname: str, args: tuple,
                         out: torch.Tensor) -> None:
        """Record one call of activation function ``fname`` inside module ``where``."""
        if not torch.is_grad_enabled():
            return
        base = f"{where}/{fname}"
        key = ("fn", base)
        k = _call_index(self, key)  # type: ignore[arg-type]
        if k is None:  # (recomputed by activation checkpointing: recorded when it ran)
            return
        self._fn_counts[base] = self._fn_counts.get(base, 0) + 1
        k = min(k, MAX_SITES - 1)
        j = self._site_of.get((key, k))  # type: ignore[arg-type]
        if j is None:
            site = _Site(name=base if k == 0 else f"{base}#{k + 1}", module=base,
                         type=f"functional {fname}", kind=kind, call=k, loop=False)
            j = self._add_site(site, (key, k))
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        _record_output(self, j, self._sites[j], out, inp, -1)

    def _fn_patch_plan(self) -> list[tuple[nn.Module, str, Any, str, str, str]] | None:
        """After mapping: how to see the functional activations without the torch-function
        mode, i.e. every one of them is called through an attribute of its module (as
        ``nn.TransformerEncoderLayer`` calls ``self.activation``): (module, attribute,
        function, where, kind, name) to patch on recorded steps; ``None``: keep the mode."""
        plan = []
        for (enclosing, func), (kind, fname) in self._fn_seen.items():
            if func is None:
                return None
            mod = self.model.get_submodule(enclosing) if enclosing else self.model
            attrs = [a for a, v in vars(mod).items() if v is func]
            if len(attrs) != 1:
                return None
            plan.append((mod, attrs[0], func, enclosing or type(self.model).__name__, kind,
                         fname))
        return plan

    def _fn_calls_per_pass(self) -> dict[str, float]:
        return {k: v / max(1, self._nforward) for k, v in self._fn_counts.items()}

    def _seen_add(self, args: tuple, out: Any) -> None:
        ops = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        for name, mod, x in reversed(self._stack):
            if x is not None and next(mod.children(), None) is not None and any(
                    a is x for a in ops):
                if name not in self._blocks:
                    self._blocks[name] = {"type": type(mod).__name__,
                                          "depth": self._entry.get(name, 0),
                                          "norm_placement": None}
                    if self.backward and x.requires_grad:  # the mapping step's own stream
                        x.register_hook(partial(
                            _grad_hook, self._block_grads.setdefault(name, []), None))
                break
        if isinstance(out, torch.Tensor):
            self._producer[id(out)] = ("add", weakref.ref(out))

    def _seen_norm(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._producer[id(out)] = ("norm", weakref.ref(out))

    def _seen_params(self, args: tuple, kwargs: dict) -> None:
        for a in (*args, *kwargs.values()):
            n = self._free_params.get(id(a)) if isinstance(a, torch.Tensor) else None
            if n is not None and n not in self._param_slot:
                where = self._stack[-1][0] if self._stack else ""
                self._param_slot[n] = (len(self._path), where)
                self._path.append(n)

    def _block_done(self, name: str, out: Any) -> None:
        """A residual block's forward returned: its output says where it normalises."""
        b = self._blocks.get(name)
        if b is None or b.get("seen"):
            return
        b["seen"] = True
        if isinstance(out, tuple | list) and out:
            out = out[0]
        prod = self._producer.get(id(out)) if isinstance(out, torch.Tensor) else None
        if prod is not None and prod[1]() is out:
            # norm(x + f(x)): post-LN; x + f(norm(x)) with norms inside: pre-LN
            b["norm_placement"] = "post" if prod[0] == "norm" else (
                "pre" if b.get("has_norm") else None)

    def _declare_layers(self) -> None:
        """Declare the sites first seen since the last declaration (forward order), then, once,
        every parameter, placed at the first site of the module that owns it."""
        for j in range(self._declared, len(self._sites)):
            s = self._sites[j]
            shape = list(s.shape) if s.shape is not None else None
            self._record.add_layer(
                LayerInfo(
                    name=s.name,
                    type=s.type,
                    depth=s.depth,
                    activation=s.kind,
                    module=s.module,
                    shape=shape,
                    site=s.call,
                    time_steps=len(s.tgrads) or None,
                    unchecked=s.unchecked,
                )
            )
        self._declared = len(self._sites)
        if self._params_declared or not self._sites:
            return
        first_site: dict[str, int] = {}
        for s in self._sites:
            first_site.setdefault(s.module, s.depth)
        for pname, p in self.params:
            self._record.add_layer(self._param_info(pname, p, first_site))
        self._params_declared = True
        self._declare_blocks()

    def _param_info(self, pname: str, p: torch.Tensor, first_site: dict[str, int]) -> LayerInfo:
        """A parameter's layer entry, placed at the first site of the module that owns it."""
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        info = LayerInfo(name=pname, type="Parameter", role="param", module=owner or None,
                         shape=list(p.shape))
        if owner in first_site:
            info.depth = first_site[owner]
        elif pname in self._param_slot and (not owner or owner not in self._names.values()
                                             or self._param_slot[pname][1] == ""):
            # a parameter used directly in a forward (a positional embedding): it acts at
            # the point of the path where it was first used
            slot, where = self._param_slot[pname]
            info.depth = slot
            info.module = pname
            info.placement = (f"used directly in the forward of {where or 'the model'!r}"
                              ", placed where it is first used")
        else:
            # the owning module is never called (e.g. MultiheadAttention's out_proj, used
            # functionally inside its parent): place the parameter where it acts, at the
            # nearest enclosing module that is called
            anc = owner
            while anc and anc not in first_site:
                anc = anc.rsplit(".", 1)[0] if "." in anc else ""
            if anc:
                info.depth = first_site[anc]
                info.module = anc
                info.placement = (
                    f"acts inside {anc!r}" + (f" (module {owner!r} is never called)"
                                               if owner else "")
                )
            else:
                # used outside any recorded module call (a root-level nn.Parameter such as
                # a positional embedding): kept off the signal path rather than guessed
                info.depth = len(self._path)
                info.on_path = False
                info.module = owner or type(self.model).__name__
                info.placement = "used outside any module call: not placed on the signal path"
        return info

    def _declare_blocks(self) -> None:
        """Residual blocks found on the mapping step, and what the record's meta says of them."""
        if not self._blocks:
            return
        for name, b in self._blocks.items():
            self._record.add_layer(LayerInfo(
                name=name, type=b["type"], role="block", depth=b["depth"] or 0,
                module=name, residual=True, norm_placement=b["norm_placement"]))
        # measured: a block added its own input to its output
        self._record.meta["residual"] = True
        self._record.meta["residual_blocks"] = list(self._blocks)
        places = {b["norm_placement"] for b in self._blocks.values() if b["norm_placement"]}
        if places:
            self._record.meta["norm_placement"] = places.pop() if len(places) == 1 else "mixed"

    def _map_drawn(self) -> None:
        """After the mapping step: keep the function mode only where module hooks cannot see
        (functional activations); residual blocks get their input hooks from now on."""
        for name in scripted(self.model):
            self._record.meta.setdefault("unchecked", {})[name] = (
                "a TorchScript module (torch.jit.script): it runs as one compiled graph that "
                "takes no hooks, so the layers inside it are not observed")
        if self._nforward == 0 and not self._root_watched and self._use_mode:
            self._record.meta.setdefault("unchecked", {})[type(self.model).__name__] = (
                "the model itself was never called (the loop calls its submodules): "
                "functional activations, residual additions and parameters used outside "
                "module calls were not observed")
        self._mapping = False
        self._use_mode = self._fn_found or self._inplace_seen
        if self._fn_found and not self._inplace_seen:
            # functional activations called through a module attribute are seen by patching
            # that attribute on recorded steps: no torch-function mode around every op
            self._fn_patches = self._fn_patch_plan()
            self._fn_expected = self._fn_calls_per_pass()
            self._use_mode = self._fn_patches is None
        self._seq_plan = self._sequential_plan()
        self._set_active(False)

    def _sequential_plan(self) -> list[tuple[nn.Module, list[tuple[nn.Module, int | None]]]]:
        """After mapping: the ``nn.Sequential`` containers whose watched children are recorded
        by running the container's loop on recorded steps (children then take PyTorch's fast
        call path: a forward hook costs ~10 us per module in a CPU step) rather than by a
        forward hook per child. A child qualifies when it is a plain watched module that
        appears once in the model and was called once per forward pass on the mapping step
        (so every call of it is a call from this loop), and the container itself was called
        (a parent calling ``seq[0]``, ``seq[1]`` ... or ``for m in seq`` bypasses the loop:
        with the children's hooks moved into it, nothing of them was recorded after the
        mapping step); others keep their hooks."""
        if self._use_mode or self._compiled or self._root_watched:
            return []
        called = set(self._entry)  # (modules entered on the mapping step; the root is not
        # pushed: called unless the loop called its submodules)
        count: dict[int, int] = {}
        for _, m in self.model.named_modules(remove_duplicate=False):
            count[id(m)] = count.get(id(m), 0) + 1
        plan = []
        for seq in self.model.modules():
            if not isinstance(seq, nn.Sequential) or isinstance(seq, torch.jit.ScriptModule):
                continue
            if type(seq).forward is not nn.Sequential.forward or "forward" in vars(seq) or \
                    count[id(seq)] != 1 or id(seq) in self._watched:
                continue
            if (self._nforward == 0 if seq is self.model else self._names[id(seq)] not in called):
                continue
            entries: list[tuple[nn.Module, int | None]] = []
            for child in seq._modules.values():
                i = self._watched.get(id(child)) if child is not None else None
                ok = (i is not None and count[id(child)] == 1 and not self._loop[i]
                      and not self._recurrent[i] and (i, 0) in self._site_of
                      and (i, 1) not in self._site_of)
                entries.append((child, i if ok else None))
            if any(i is not None for _, i in entries):
                plan.append((seq, entries))
        return plan

    def _check_fn_patches(self) -> None:
        """A recorded step with attribute patches saw fewer functional activation calls than
        the mapping step (some are called directly): the mode again from the next step on."""
        seen = self._fn_calls_per_pass()
        if self._fn_patches is not None and not self._use_mode and self._used and any(
                seen.get(k, 0.0) < v for k, v in self._fn_expected.items()):
            self._fn_patches = None
            self._use_mode = True
            self._set_active(False)
