"""Gated MLPs that keep two intermediate-size tensors for backward instead of four.

The MLP of Llama and of most decoders transformers ships (Mistral, Qwen2/3, Gemma, ...) is

    out = down(act(gate(x)) ⊙ up(x))                           gate(x), up(x): (N, I), I ~ 2.7-4 h

and autograd keeps four (N, I) tensors of it per layer for backward: gate(x) (act's input),
act(gate(x)) and up(x) (the product's), and the product h = act(gate(x)) ⊙ up(x) (down's input, for
its adapter's or weight's gradient). With I ≈ 3h these four are about half of what a decoder layer
keeps. Here the product is one autograd function that keeps gate(x) and up(x) only, and
recomputes act(gate(x)) in its backward; down's copy of h is replaced, while down saves it, by a
note to recompute it from the same two tensors (torch.autograd.graph.saved_tensors_hooks). The
recomputations are the forward's own elementwise operations on the same tensors, so the loss and
every gradient are bit-identical; the cost is one act and one product more per layer in backward.

    dL/dup   = g ⊙ act(gate)              g = dL/dh
    dL/dgate = act'(gate) ⊙ (g ⊙ up)      (act's own backward, run on the recomputed act)

`keep_less(model)` switches this on for every MLP of the model whose forward is exactly that
expression (its source is compared, so a model that computes anything else is left as it is): the
module becomes a lean module (lean.py: its class a subclass of its own whose forward is the lean
one); `lean.restore(model)` switches it off. The leaner forward steps aside, computing the
original, wherever its bookkeeping would be wrong or useless: no gradient (inference), under
torch.compile, and inside another saved-tensor hook (non-reentrant activation checkpointing
recomputes the layer anyway, and activation offloading moves what is saved: both must see what
autograd saves).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import lean

# The body of the MLP forward this module replaces, whitespace removed (transformers' LlamaMLP and
# the ~140 modules copied from it).
_GATED_FORWARDS = ("returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",
                   "down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj")


class _GatedProduct(torch.autograd.Function):
    """h = act(gate) ⊙ up, keeping gate and up; act(gate) is recomputed in backward, once: by the
    _Recompute that stands for h in down's saved tensors when down's backward needs h (it keeps
    act(gate) for this backward), else here."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: nn.Module, recompute: _Recompute | None = None):
        ctx.act, ctx.recompute = act, recompute
        ctx.save_for_backward(gate, up)
        return _times(act(gate), up, gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        leaf, activated = ctx.recompute.take_activated() if ctx.recompute is not None else (None, None)
        if activated is None:
            leaf, activated = _act_for_backward(ctx.act, gate)
        grad_gate = None
        # dL/dgate first: g ⊙ up is freed before dL/dup exists (four (N, I) tensors at most, not five)
        if need_gate and leaf is None:  # SiLU
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        elif need_gate:
            grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0]
        grad_up = _times(activated.detach(), grad, gate) if need_up else None
        return grad_gate, grad_up, None, None


def _act_for_backward(act, gate: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(leaf, act(gate)) recomputed for the product's backward: act applied to a leaf on gate, so that
    act's own backward runs through autograd from it; for SiLU (leaf None) without a graph, since its
    backward (silu_backward, the call autograd makes) reads gate only."""
    if _is_silu(act):
        with torch.no_grad():
            return None, _recomputed_act(act, gate)
    with torch.enable_grad():
        leaf = gate.detach().requires_grad_()
        return leaf, _recomputed_act(act, leaf)


def _times(a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """a ⊙ b, written into a when a is a fresh tensor of the product's shape and dtype (an activation
    the act just computed, not gate itself or a view of it): one (N, I) buffer fewer to allocate,
    the same values (the product commutes)."""
    fresh = a._base is None and a.untyped_storage().data_ptr() != gate.untyped_storage().data_ptr()
    if fresh and a.shape == b.shape and a.dtype == b.dtype:  # a: computed without a graph (forward, or detached)
        return a.mul_(b)
    return a * b


def _is_silu(act) -> bool:
    """Is act SiLU as torch or transformers computes it (forward F.silu; an in-place one never gets
    here: the lean forward steps aside for it)?"""
    forward = getattr(type(act), "forward", None)
    return forward in _SILU_FORWARDS and "forward" not in vars(act)


def _silu_forwards() -> frozenset:
    forwards = {nn.SiLU.forward}
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return frozenset(forwards)
    return frozenset(forwards | {SiLUActivation.forward})


_SILU_FORWARDS = _silu_forwards()


def _recomputed_act(act, gate: torch.Tensor) -> torch.Tensor:
    """act(gate) computed again in backward, without the module's hooks: they observed the forward
    once already, and a global one (FlopCounterMode's module tracker) would hang a gradient hook on
    the leaf, which autograd.grad inside backward refuses."""
    return act.forward(gate) if isinstance(act, nn.Module) else act(gate)


def gated_product(gate: torch.Tensor, up: torch.Tensor, act: nn.Module,
                  recompute: _Recompute | None = None) -> torch.Tensor:
    """act(gate) ⊙ up, keeping gate and up for backward (not act(gate)); `recompute`, if down's
    saved copy of the product is that _Recompute, hands its act(gate) to this backward."""
    return _GatedProduct.apply(gate, up, act, recompute)


def _other_hooks_active() -> bool:
    """Is another saved-tensor hook (checkpointing, offloading) in force here?"""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) ⊙ up(x)), keeping gate(x) and up(x) only (see the module docstring)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _other_hooks_active() or \
            getattr(self.act_fn, "inplace", False):  # an in-place act would overwrite the gate(x) kept
        return type(self).plain_forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (gate.requires_grad or up.requires_grad):  # nothing to keep: the class's expression, on these
        return self.down_proj(self.act_fn(gate) * up)
    recompute = _Recompute(gate, up, self.act_fn)
    h = gated_product(gate, up, self.act_fn, recompute)
    product = id(h)  # not h itself: each tensor saved below keeps these hooks alive

    def pack(t: torch.Tensor):
        return recompute if id(t) == product else t

    def unpack(saved):
        return saved.tensor() if isinstance(saved, _Recompute) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(h)


class _Recompute:
    """A saved act(gate) ⊙ up, computed again when backward asks for it. The act(gate) it computes
    (with act's graph, see _act_for_backward) is kept for the product's own backward (_GatedProduct),
    which runs next and needs it too."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, act: nn.Module):
        self.gate, self.up, self.act = gate, up, act
        self.leaf: torch.Tensor | None = None
        self.activated: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        self.leaf, self.activated = _act_for_backward(self.act, self.gate)
        with torch.no_grad():
            return self.activated.detach() * self.up

    def take_activated(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(leaf, act(gate)) as tensor() computed them, handed over once ((None, None) if not computed)."""
        taken = self.leaf, self.activated
        self.leaf = self.activated = None
        return taken


def is_gated_mlp(module: nn.Module) -> bool:
    """Does `module`'s class compute exactly down(act(gate(x)) ⊙ up(x)) in its forward (its source
    read, the docstring and the input's name aside)?"""
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
        _computes_gated_product(type(module))


@functools.lru_cache(maxsize=None)
def _computes_gated_product(cls: type) -> bool:
    return lean.forward_code(cls) in _GATED_FORWARDS


def keep_less(model: nn.Module) -> int:
    """Make every gated MLP of `model` keep gate(x) and up(x) only for backward (lean.make_lean);
    returns how many are lean."""
    return lean.make_lean(model, is_gated_mlp, _lean_forward)


def is_lean(module: nn.Module) -> bool:
    """Does keep_less's forward run this module?"""
    return lean.is_lean(module, _lean_forward)
