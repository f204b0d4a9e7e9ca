"""RMSNorm with its gradient in closed form: the Llama-family norm, fewer passes in backward.

The norm of Llama and of ~140 decoders transformers ships (Mistral, Qwen2/3, Phi-3, ...) computes,
per token row x (h values) of dtype d, in float32:

    y = w ⊙ x̂.to(d),   x̂ = x r,   r = (mean(x²) + ε)^(-1/2)

Autograd differentiates it operation by operation (pow, mean, rsqrt, the two products, the casts):
seven (N, h) allocations in backward (the profiler's count, float32), each a pass over memory. Its
gradient, with a = (g ⊙ w).to(d) in float32 (g = dL/dy; a is dL/dx̂ as autograd forms it), is

    dL/dx = r a - x r³ (a · x) / h

one product, one row-wise dot and two in-place updates: two (N, h) allocations. The forward is
transformers' own, operation for operation, so outputs are bit-identical; backward keeps what
autograd keeps (x in float32 and r), so memory and the planner's count are unchanged; gradients
agree to float32 rounding.

`make_lean(model)` switches this on (lean.py) for every module whose forward is exactly that
expression (its source is compared). It steps aside, computing the original, where it would not
pay or not be right: no gradient (inference), under torch.compile, and when the norm's own weight
trains (autograd's backward then keeps the normalized input for dL/dw, as the planner counts it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import lean

# transformers' LlamaRMSNorm.forward body as lean.forward_code writes it (its input renamed x)
_LLAMA_NORM = ("input_dtype=x.dtypehidden_states=x.to(torch.float32)variance=x.pow(2).mean(-1,keepdim=True)"
               "x=x*torch.rsqrt(variance+self.variance_epsilon)returnself.weight*x.to(input_dtype)")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x32, r, weight)
        ctx.input_dtype = x.dtype
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x32, r, weight = ctx.saved_tensors
        a = torch.mul(grad, weight).to(ctx.input_dtype).to(torch.float32)  # dL/dx̂, as autograd casts it
        coefficient = torch.linalg.vecdot(a, x32).unsqueeze(-1).mul_(r.pow(3)).div_(x32.shape[-1])  # r³ (a · x) / h
        grad_x = a.mul_(r).addcmul_(x32, coefficient, value=-1)  # r a - x r³ (a · x) / h, in a's buffer
        return grad_x.to(ctx.input_dtype), None, None


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm forward with the closed-form backward (see the module docstring)."""
    if not (torch.is_grad_enabled() and x.requires_grad) or self.weight.requires_grad or \
            torch.compiler.is_compiling():
        return type(self).plain_forward(self, x)
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def is_llama_norm(module: nn.Module) -> bool:
    """Does `module`'s class compute transformers' LlamaRMSNorm forward (its source read)?"""
    return isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon") and \
        _computes_llama_norm(type(module))


@functools.lru_cache(maxsize=None)
def _computes_llama_norm(cls: type) -> bool:
    return lean.forward_code(cls) == _LLAMA_NORM


def make_lean(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm of `model` the closed-form backward; returns how many have it."""
    return lean.make_lean(model, is_llama_norm, _lean_forward)


def is_lean(module: nn.Module) -> bool:
    return lean.is_lean(module, _lean_forward)
