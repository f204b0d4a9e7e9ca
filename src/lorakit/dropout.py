"""Dropout on the adapters' input, with masks drawn the fast way for each device.

    dropout(x) = x ⊙ m / (1 - p),   m_i ~ Bernoulli(1 - p) independently      (Srivastava et al. 2014)

On the CPU, PyTorch's bernoulli_ draws one Mersenne-Twister number per element, serially (Intel's
MKL path is taken on Intel CPUs only), and x * mask with a bool mask converts the mask to floats
first: together ~8 ms per LoRA layer of SmolLM2 with batch 8 x 128, 14% of a training step here.
So on the CPU the dropped elements are drawn as the positions of a Bernoulli process: the gaps
between consecutive drops are i.i.d. Geometric(p), so ~p·n draws replace n (20x fewer at
p = 0.05), and zeroing them is an index_fill_ of ~p·n elements. The gaps are drawn by inversion
from float64 uniforms in a few vectorised operations (geometric_ computes the same inversion one
element at a time: 3x slower here). The law of the mask is exactly the
same; the random stream is not nn.Dropout's. On CUDA (fast bernoulli, and filtering positions
would synchronise with the host) and for p > 0.5 the mask is a bool tensor, as nn.Dropout's.

A sample is either form; `zero_dropped` applies it to any tensor of x's shape (the input in
forward, the input gradient in backward), so what is kept for backward is the sample itself:
8·p bytes per element as positions (0.4 at p = 0.05), or 1 as a mask.

Under torch.compile, Dynamo cannot trace the draw (the loop reads a tensor's value, and the number
of drops, the result's size, is known only once drawn), so `sample` puts it in the graph as one
opaque operator, lorakit::dropout_mask: the same draw, from the same global generator, returned as
the bool mask of the kept elements (a fixed shape). A compiled model thus drops the same elements
as the eager one under the same seed, and compiles without a graph break at each adapter; the price
is the mask's 1 byte per element kept for backward instead of the positions' 8·p.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sample(n: int, p: float, device: torch.device) -> torch.Tensor:
    """Which of n elements dropout zeroes, each independently with probability p: their flat
    indices (int64, ascending) on the CPU for p <= 0.5, else (or under torch.compile) a bool mask
    of the kept ones."""
    if torch.compiler.is_compiling():  # one opaque operator in the graph instead of a graph break
        return _dropout_mask(n, p, device, _compiled_draws)
    return _eager_sample(n, p, device)


def _eager_sample(n: int, p: float, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or p > 0.5:
        return torch.empty(n, dtype=torch.bool, device=device).bernoulli_(1 - p)
    parts, last = [], -1  # last: the position of the latest drop drawn
    per_log = 1 / math.log1p(-p)
    while last < n - 1:  # until the process has passed the end (rarely more than one round)
        expected = p * (n - 1 - last)
        u = torch.empty(int(expected + 6 * math.sqrt(expected) + 16), dtype=torch.float64).uniform_()
        # Geometric(p) by inversion, ceil(log(1 - u) / log(1 - p)) >= 1: the trials up to the next
        # drop (u = 0 gives 0, hence the clamp; a gap past the end is held at n + 1, inside int64)
        gaps = torch.log1p(u.neg_()).mul_(per_log).ceil_().clamp_(1, n + 1)
        positions = gaps.to(torch.int64).cumsum_(0).add_(last)
        parts.append(positions)
        last = int(positions[-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    # ascending: those below n, copied (what backward keeps is 8 bytes a drop, not the draw's slack)
    return positions[:int(torch.searchsorted(positions, n))].clone()


# Every compiled draw writes this counter, so each one depends on the one before: the compiler can
# neither merge two draws with equal arguments (q, k and v's adapters read one x) nor reorder them,
# which would drop other elements than eager does. nondeterministic_seeded: a draw is kept for
# backward, never recomputed there (a second draw would drop other elements).
_compiled_draws = torch.zeros((), dtype=torch.int64)


@torch.library.custom_op("lorakit::dropout_mask", mutates_args=("draws",), tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_mask(n: int, p: float, device: torch.device, draws: torch.Tensor) -> torch.Tensor:
    """sample's draw as the bool mask of the kept elements (n,); counts itself in `draws`."""
    draws.add_(1)
    dropped = _eager_sample(n, p, device)
    if dropped.dtype == torch.bool:
        return dropped
    return torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, dropped, False)


@_dropout_mask.register_fake
def _(n: int, p: float, device: torch.device, draws: torch.Tensor) -> torch.Tensor:
    return torch.empty(n, dtype=torch.bool, device=device)


def zero_dropped(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of the contiguous tensor t that the sample drops; returns t."""
    if dropped.dtype == torch.bool:
        return t.mul_(dropped.view(t.shape))
    t.view(-1).index_fill_(0, dropped, 0)
    return t


def dropped_copy(x: torch.Tensor, dropped: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x ⊙ m: a contiguous copy of x (in `dtype`, default x's) with the sample's elements zeroed."""
    h = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device).copy_(x)
    return zero_dropped(h, dropped)


def inverse_keep(p: float) -> float:
    return 0.0 if p >= 1 else 1 / (1 - p)  # p = 1 drops everything (nn.Dropout returns zeros)


class Dropout(nn.Module):
    """dropout(x) = x ⊙ m / (1 - p) in training, x otherwise; masks from `sample` (see above).

    LoraLinear's plain path uses it; its fused path (fused.lora_update) draws the same sample in
    the same order, so both give the same loss and gradients under the same seed."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability p={p!r} must be in [0, 1]")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return dropped_copy(x, sample(x.numel(), self.p, x.device)) * inverse_keep(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
