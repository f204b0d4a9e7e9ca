"""dropout.sample draws each element's drop independently with probability p, on both of its
paths (dropped positions from Geometric gaps; a bool mask), and Dropout is x ⊙ m / (1 - p)."""

import math

import pytest
import torch

from lorakit.dropout import Dropout, sample, zero_dropped

CPU = torch.device("cpu")


def as_mask(dropped: torch.Tensor, n: int) -> torch.Tensor:
    """1.0 where an element is dropped."""
    if dropped.dtype == torch.bool:
        return (~dropped).float()
    mask = torch.zeros(n)
    mask[dropped] = 1.0
    return mask


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.5, 0.7])
def test_each_element_is_dropped_independently_with_probability_p(p):
    torch.manual_seed(0)
    n = 400_000
    dropped = sample(n, p, CPU)
    assert dropped.dtype == (torch.int64 if p <= 0.5 else torch.bool)
    if dropped.dtype == torch.int64:  # positions: ascending, distinct, in range
        assert bool((dropped[1:] > dropped[:-1]).all()) and 0 <= int(dropped[0]) and int(dropped[-1]) < n
    m = as_mask(dropped, n)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(m.mean().item() - p) < 5 * sd
    # independence: neighbours (lag 1 and 7) are both dropped with probability p^2
    for lag in (1, 7):
        both = (m[lag:] * m[:-lag]).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n), lag
    # uniform along the tensor: the first and the last quarter drop at the same rate
    q = n // 4
    assert abs(m[:q].mean().item() - m[-q:].mean().item()) < 5 * math.sqrt(2) * 2 * sd


def test_gaps_between_drops_follow_the_geometric_law():
    torch.manual_seed(1)
    p, n = 0.05, 1_000_000
    positions = sample(n, p, CPU)
    gaps = torch.diff(positions)
    counts = torch.bincount(gaps)[1:31].double()  # gap k: P = (1 - p)^(k-1) p
    expected = torch.tensor([(1 - p) ** (k - 1) * p for k in range(1, 31)], dtype=torch.float64) * gaps.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70  # 30 cells: the 99.99th percentile of chi-square(30) is ~67


def test_the_process_runs_past_the_end_of_short_and_tiny_inputs():
    torch.manual_seed(2)
    # small n: the expected count is tiny, the sample must still cover every position
    hits = torch.zeros(5)
    for _ in range(4000):
        hits += as_mask(sample(5, 0.2, CPU), 5)
    assert torch.allclose(hits / 4000, torch.full((5,), 0.2), atol=0.03)
    assert sample(10, 1e-9, CPU).numel() == 0  # one draw: the first gap is ~1e9 long


def test_dropout_is_x_times_mask_over_keep_probability():
    x = torch.randn(6, 50)
    d = Dropout(0.2).train()
    torch.manual_seed(3)
    out = d(x)
    torch.manual_seed(3)
    dropped = sample(x.numel(), 0.2, CPU)
    keep = 1 - as_mask(dropped, x.numel()).view_as(x)
    torch.testing.assert_close(out, x * keep / 0.8)
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert torch.equal(zero_dropped(x.clone(), torch.ones(x.numel(), dtype=torch.bool)), x)
    with pytest.raises(ValueError, match="p=1.5 must be in"):
        Dropout(1.5)
