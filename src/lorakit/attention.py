"""Segment attention: the causal attention of a packed row computed example by example.

A packed row (data.pack, data.padding_free) holds several examples end to end, its position ids
restarting at 0 with each. transformers' `sdpa` attends over the whole row under the block-diagonal
causal mask it derives from the restarts: (Σ nᵢ)² scores for the Σ nᵢ² / 2 that count, and, a mask
ruling out SDPA's grouped-query path, keys and values copied once per query head. Here each example
(a run of positions 0, 1, 2, ... in a row) attends alone, with SDPA's own causal path:

    out[s:e] = softmax(q[s:e] k[s:e]ᵀ · scale + causal) v[s:e]        for every segment [s, e)

the same values to rounding. On a SmolLM2-135M LoRA step over a row of 923 tokens holding 4
examples this took the step from 4.29 to 3.47 s (bench/README.md, session 9).

segment_attention(model) switches a model that runs transformers' `sdpa` to this function for one
forward (SummedLoss does it for packed batches); it is registered with transformers under NAME,
with a mask function that defers sdpa's mask: the (row, row) block mask transformers derives from
the restarts (1 GiB of bools for a row of 32k tokens) is built only where this path does not apply,
and then it is `sdpa` as before: under torch.compile (segment bounds are data; the mask is built
eagerly there), and when the attention gets no position ids, has a cache, is not causal, or has a
sliding window shorter than a segment.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "lorakit_segments"
# Families whose attention goes through transformers' attention interface and reads nothing else
# from the implementation's name, checked by tests/test_attention.py (Falcon calls SDPA itself and
# would take another path under another name); any other model keeps sdpa.
MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2",
                         "gemma3_text", "gpt2", "gpt_neox"})


def segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] of one row's position ids (T,): a segment starts where the position is not
    the previous one + 1 (as transformers' find_packed_sequence_indices cuts a row)."""
    restart = torch.ones_like(positions, dtype=torch.bool)
    restart[1:] = positions[1:] != positions[:-1] + 1
    starts = restart.nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [positions.numel()]))


class DeferredMask:
    """The mask transformers' sdpa_mask would return for these arguments, built on first use."""

    def __init__(self, arguments: dict):
        self.arguments, self._built = arguments, False

    def build(self) -> torch.Tensor | None:
        if not self._built:
            from transformers.masking_utils import sdpa_mask

            self._mask, self._built, self.arguments = sdpa_mask(**self.arguments), True, None
        return self._mask


def deferred_sdpa_mask(*args, **kwargs):
    """NAME's mask function in transformers' mask interface: sdpa_mask's arguments kept for later (a
    DeferredMask), so that nothing is built when every layer attends segment by segment; sdpa_mask
    itself under torch.compile or when called with positional arguments."""
    if args or torch.compiler.is_compiling():
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(*args, **kwargs)
    return DeferredMask(kwargs)


def segment_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: query (B, H, T, d), key and value (B, H_kv, T, d) -> output
    (B, T, H, d). Attention within each segment of position_ids (kwargs), else transformers' sdpa
    (with the mask deferred_sdpa_mask left unbuilt, built now)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    window = kwargs.get("sliding_window")
    rows = None
    if (positions is not None and positions.dim() == 2 and positions.shape[-1] == query.shape[2] == key.shape[2]
            and getattr(module, "is_causal", True) and not torch.compiler.is_compiling()):
        rows = [segments(p) for p in positions.expand(query.shape[0], -1)]
        if window is not None and max(e - s for row in rows for s, e in row) > window:
            rows = None
    if rows is None:
        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.build()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = key.shape[1] != query.shape[1]
    # Cut with unbind and split, whose backward assembles each input's gradient in one tensor: a
    # slice's backward writes its piece into a zeroed tensor of the whole input, one per segment
    # (32 examples of 100 tokens: 2.5x the attention's forward + backward time, SmolLM2's shapes).
    outputs = []
    for row, q_row, k_row, v_row in zip(rows, query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [e - s for s, e in row]
        pieces = [F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), dropout_p=dropout,
                                                 is_causal=True, scale=scaling, enable_gqa=gqa).squeeze(0)
                  for q, k, v in zip(q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1))]
        outputs.append(torch.cat(pieces, dim=1))  # (H, T, d)
    return torch.stack(outputs).transpose(1, 2).contiguous(), None


def _register() -> None:
    """NAME in transformers' attention and mask interfaces (a dict entry: registering again is a no-op)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segment_sdpa)
    AttentionMaskInterface.register(NAME, deferred_sdpa_mask)


@contextlib.contextmanager
def segment_attention(model: torch.nn.Module):
    """`model` attends segment by segment inside this block when it is of a family in MODEL_TYPES
    running transformers' sdpa without gradient checkpointing; anything else is left as it is."""
    config = getattr(model, "config", None)
    # gradient checkpointing recomputes the blocks in backward, outside this block: with sdpa's
    # path, whose saved tensors differ, which torch.utils.checkpoint refuses
    if (getattr(config, "_attn_implementation", None) != "sdpa" or getattr(model, "is_gradient_checkpointing", False)
            or getattr(config, "model_type", None) not in MODEL_TYPES):
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
