"""Adapters that start from the frozen weight: W (out, in) is split into a residual and a rank-r part,

    W = W_res + scale · B A,        B: (out, r),  A: (r, in)

and the layer keeps W_res as its frozen weight, so the adapted model starts as the base model.

PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"):
    W = U S Vᵀ,  B = U_r √(S_r / scale),  A = √(S_r / scale) V_rᵀ,
so scale · B A = U_r S_r V_rᵀ is W's best rank-r approximation (Eckart–Young) and W_res keeps the
minor components. With `niter`, U_r S_r V_r come from a randomized SVD (Halko et al. 2011,
torch.svd_lowrank) with `niter` subspace iterations: much faster on large weights, approximate.

OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"):  W = Q R,  B = Q[:, :r]
(orthonormal columns), A = R[:r];  W_res = W - scale · B A.

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"): W_res is a 4-bit weight Q
and the equality is approximate; alternating, from B A = 0,
    Q_t = NF4(W - scale · B_{t-1} A_{t-1})            (nf4.quantize_nf4)
    B_t, A_t = the rank-r SVD of W - deq(Q_t), split as in PiSSA
each step minimises ||W - deq(Q) - scale · B A|| over one of the two with the other fixed (the
quantizer's rounding aside), so Q + scale · B A approximates W better than Q alone.

All computation is in float32, on the weight's device (CPU or GPU).
"""

from __future__ import annotations

import torch

from .nf4 import NF4State, dequantize, quantize_nf4


def _split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float):
    """(A, B) = (√(S / scale) Vᵀ, U √(S / scale)): scale · B A = U S Vᵀ."""
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]


def top_singular(w: torch.Tensor, r: int, niter: int | None = None):
    """(U_r (out, r), S_r (r,), V_rᵀ (r, in)) of w: the full SVD, or a randomized one with niter
    subspace iterations (it draws from torch's global generator)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
    return u, s, v.T


def pissa(w: torch.Tensor, r: int, scale: float, niter: int | None = None):
    """(A, B, W_res) of PiSSA for w (out, in); see the module docstring."""
    w = w.float()
    a, b = _split_singular(*top_singular(w, r, niter), scale)
    return a, b, w - scale * b @ a


def olora(w: torch.Tensor, r: int, scale: float):
    """(A, B, W_res) of OLoRA for w (out, in): B the first r columns of Q, A the first r rows of R."""
    w = w.float()
    q, rr = torch.linalg.qr(w)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, w - scale * b @ a


def loftq(w: torch.Tensor, r: int, scale: float, iters: int = 1, blocksize: int = 64,
          double_quant: bool = True) -> tuple[torch.Tensor, torch.Tensor, NF4State]:
    """(A, B, Q) of LoftQ for w (out, in): Q the 4-bit state of the last quantization, in the
    layout nf4.quantize_nf4 writes with this blocksize and double quantization."""
    w = w.float()
    target = w  # what Q should approximate: W - scale · B A of the previous step
    for _ in range(iters):
        state = quantize_nf4(target, blocksize, double_quant)
        a, b = _split_singular(*top_singular(w - dequantize(state, torch.float32), r), scale)
        target = w - scale * b @ a
    return a, b, state


def approximation_error(w: torch.Tensor, q: NF4State, a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||W - (deq(Q) + scale · B A)||_F: what LoftQ minimises."""
    return torch.linalg.matrix_norm(w.float() - dequantize(q, torch.float32) - scale * b.float() @ a.float()).item()
