"""The LoRA update of a linear layer as one autograd function that stores less for backward.

    out = y + scale · B A dropout(x),   y = base(x),  dropout(x) = x ⊙ m / (1 - p),  m ~ Bernoulli(1 - p)

Written with a dropout module and two nn.Linear (layer.LoraLinear's plain path), autograd keeps,
per adapter, the dropped input dropout(x), a full-precision copy of x (with nn.Dropout, also the
noise m / (1 - p): a second one). Three adapters reading the same x (q, k, v projections) keep
three. This function keeps x itself (one tensor shared by every adapter reading it; for a 16-bit
base, in 16 bits) and the dropout sample (dropout.py: the dropped positions on the CPU, ~0.4 bytes
per element at p = 0.05; a 1-byte mask on CUDA), and recomputes x ⊙ m in backward (a copy and a
sparse fill). It also adds the update to y inside the matrix multiply (addmm) instead of
materialising scale · B A h. `lora_linear` also computes the frozen base y = x Wᵀ + b, so that its
backward accumulates the base's input gradient g W into the adapter's (one addmm) instead of
autograd summing two (N, in) tensors.

The gradients, with u = (x ⊙ m) Aᵀ / (1 - p)  (N, r) and g = dL/dout  (N, out):
    dL/dy = g
    dL/dB = scale · gᵀ u                               (out, r)
    dL/dA = scale / (1 - p) · (g B)ᵀ (x ⊙ m)           (r, in)
    dL/dx = scale / (1 - p) · ((g B) A) ⊙ m  [+ g W]   (N, in)
    dL/db = Σ_N g                                      (out,), a trainable bias of the base

A 4-bit base (`lora_linear` given an nf4.NF4State): W is dequantized in forward for x Wᵀ and freed
when forward returns; backward dequantizes it again only for g W (skipped when x needs no
gradient), so what is kept between them is the 4-bit state (the layer's buffers), as
nf4.NF4Linear keeps it, and the base's and the adapter's input gradients still share one addmm.

The sample is drawn as the plain path's dropout.Dropout draws it (the same function, from the
global generator, in the same order), so under the same seed both paths drop the same elements and
give the same loss and gradients (tests/test_fused.py).
"""

from __future__ import annotations

import torch

from .dropout import dropped_copy, inverse_keep, sample, zero_dropped
from .nf4 import NF4State, dequantize


def _dropped_input(x2: torch.Tensor, dtype: torch.dtype, dropped: torch.Tensor | None) -> torch.Tensor:
    """x ⊙ m in the adapters' dtype (a contiguous copy), or x itself in that dtype without dropout."""
    return x2.to(dtype) if dropped is None else dropped_copy(x2, dropped, dtype)


class _LoraUpdate(torch.autograd.Function):
    """out = y + scale · B A dropout(x), where y is given, or (a frozen weight given) y = x Wᵀ + b
    computed here too; W is a tensor (weight), or a 4-bit state (layout and state_tensors, see
    nf4.NF4State.without_tensors) dequantized when needed."""

    @staticmethod
    def forward(ctx, y, x, a, b, scale: float, p: float, weight, bias, layout: NF4State | None, *state_tensors):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        w = weight if layout is None else dequantize(layout.with_tensors(state_tensors), x.dtype)  # (out, in)
        if w is not None:  # y = x Wᵀ + b (..., out), written into a tensor of that shape (see below)
            y = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
            y2 = y.view(-1, w.shape[0])
            torch.mm(x2, w.t(), out=y2) if bias is None else torch.addmm(bias, x2, w.t(), out=y2)
        del w  # a dequantized weight is freed here; backward rebuilds it from the 4-bit state
        dropped = sample(x2.numel(), p, x.device) if p > 0 else None
        h = _dropped_input(x2, a.dtype, dropped)  # adapters may be float32 on a 16-bit base: compute in theirs
        u = h @ a.t()  # (N, r)
        if dropped is not None:
            u.mul_(inverse_keep(p))
        # The output is a tensor of its own, never a view (F.linear's 3-D output and any reshape of
        # a 2-D result are views): models add onto it in place (Falcon's mlp_output +=
        # attention_output), which autograd forbids on a view made inside a custom Function.
        frozen = weight is not None or layout is not None
        if y.dtype != a.dtype:  # as the plain path: the update is rounded to the base's dtype, then added
            out = y + (scale * (u @ b.t())).to(y.dtype).view(y.shape)
        elif frozen:  # y is ours: add the update into it
            out = y
            y2.addmm_(u, b.t(), alpha=scale)
        else:
            out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
            torch.addmm(y.reshape(-1, y.shape[-1]), u, b.t(), alpha=scale, out=out.view(-1, y.shape[-1]))
        # Saved once, read once in backward (non-reentrant checkpointing allows one unpack each).
        ctx.save_for_backward(x, dropped, u, a, b, weight, *state_tensors)
        ctx.scale, ctx.p, ctx.layout = scale, p, layout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, dropped, u, a, b, weight, *state_tensors = ctx.saved_tensors
        need_y, need_x, need_a, need_b, _, _, _, need_bias = ctx.needs_input_grad[:8]
        g_out = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        g = g_out.to(a.dtype)
        grad_a = grad_b = grad_x = grad_bias = None
        if need_b:
            grad_b = (g.t() @ u).mul_(ctx.scale)  # (out, r)
        if need_a or need_x:
            factor = ctx.scale * (inverse_keep(ctx.p) if dropped is not None else 1.0)
            gu = (g @ b).mul_(factor)  # (N, r): dL/d(x ⊙ m A^T)
            if need_a:
                grad_a = gu.t() @ _dropped_input(x.reshape(-1, x.shape[-1]), a.dtype, dropped)  # (r, in)
            if need_x:
                gx = gu @ a  # (N, in), contiguous
                if dropped is not None:
                    zero_dropped(gx, dropped)
                if ctx.layout is not None:  # the 4-bit weight, dequantized again for g W only
                    weight = dequantize(ctx.layout.with_tensors(state_tensors), x.dtype)  # (out, in)
                if weight is not None and gx.dtype == weight.dtype:
                    gx.addmm_(g_out, weight)  # + g W: the base's input gradient, into the same buffer
                elif weight is not None:
                    gx = (g_out @ weight) + gx.to(x.dtype)
                grad_x = gx.to(x.dtype).view(x.shape)
        if need_bias:
            grad_bias = g_out.sum(0)
        no_grads = (None,) * (1 + len(state_tensors))  # the layout and the 4-bit state: frozen
        return grad_out if need_y else None, grad_x, grad_a, grad_b, None, None, None, grad_bias, *no_grads


class _Rescale(torch.autograd.Function):
    """out = z ⊙ g, g: (out,) one factor per output feature (DoRA's m / ||W + ΔW||).

    The gradients, dL/dz = g ⊙ dL/dout and dL/dg = Σ_N z ⊙ dL/dout, are written one after the other
    into one (N, out) buffer: autograd's product would allocate two, and on the CPU every fresh buffer
    of that size costs page faults (see nf4.dequantize)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, g)
        return z * g

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, g = ctx.saved_tensors
        need_z, need_g = ctx.needs_input_grad
        buffer = torch.mul(grad_out, z) if need_g else None
        grad_g = buffer.reshape(-1, buffer.shape[-1]).sum(0) if need_g else None
        grad_z = None
        if need_z:
            grad_z = torch.mul(grad_out, g, out=buffer) if buffer is not None else grad_out * g
        return grad_z, grad_g


def rescale(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """z ⊙ g for z: (..., out) and g: (out,) of z's dtype; backward allocates one buffer of z's size."""
    if z.dtype != g.dtype or g.dim() != 1 or g.shape[0] != z.shape[-1]:
        return z * g
    return _Rescale.apply(z, g)


def lora_update(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                p: float) -> torch.Tensor:
    """y + scale · dropout_p(x) @ a.T @ b.T, for x: (..., in), y: (..., out), a: (r, in), b: (out, r).

    p is the dropout probability to apply now (0 outside training). See the module docstring.
    """
    return _LoraUpdate.apply(y, x, a, b, float(scale), float(p), None, None, None)


def lora_linear(x: torch.Tensor, weight: torch.Tensor | NF4State, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, p: float) -> torch.Tensor:
    """F.linear(x, W, bias) + scale · dropout_p(x) @ a.T @ b.T for a frozen weight W (out, in):
    a tensor, or a 4-bit NF4State (W = nf4.dequantize(state, x.dtype), as nf4.NF4Linear computes).

    The same as lora_update(F.linear(x, W, bias), ...), but backward writes the base's input
    gradient g W into the adapter's, in one addmm, instead of autograd adding two (N, in) tensors.
    """
    if isinstance(weight, NF4State):
        return _LoraUpdate.apply(None, x, a, b, float(scale), float(p), None, bias, weight.without_tensors(),
                                 *weight.tensors())
    if weight.requires_grad:
        raise ValueError("lora_linear needs a frozen weight (requires_grad=False); use lora_update")
    return _LoraUpdate.apply(None, x, a, b, float(scale), float(p), weight, bias, None)
