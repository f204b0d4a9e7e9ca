"""attention.segment_attention: a packed row's attention computed example by example equals
transformers' sdpa under the block-diagonal mask (loss and every gradient, 1e-5), in every decoder
family lorakit tests; it runs one causal SDPA per segment where it applies, and steps aside where
it does not (a sliding window shorter than a segment, gradient checkpointing)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_architectures import TINY, tiny_model

from lorakit import attention, loss
from lorakit.attention import MODEL_TYPES, NAME, segment_attention, segments
from lorakit.data import IGNORE, Dataset, Example, collate, pack
from lorakit.loss import SummedLoss

LENGTHS = (9, 3, 14, 6)


def examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 2 + ids[2:]))
    return out


def loss_and_grads(model, batch, segmented: bool, monkeypatch):
    """SummedLoss over `batch`, with segment attention or with transformers' sdpa alone."""
    monkeypatch.setattr(loss, "segment_attention",
                        segment_attention if segmented else lambda model: contextlib.nullcontext())
    model.zero_grad(set_to_none=True)
    value = SummedLoss(model)(**batch)
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_segments_start_where_positions_restart():
    assert segments(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])) == [(0, 3), (3, 5), (5, 6), (6, 10)]
    assert segments(torch.arange(5)) == [(0, 5)]
    assert segments(torch.tensor([4, 5, 0, 1])) == [(0, 2), (2, 4)]  # a jump, not only a 0, cuts


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("layout", ["padding-free", "packed rows"])
def test_segment_attention_equals_the_masked_sdpa(model_type, layout, monkeypatch):
    model = tiny_model(model_type)  # eval: no dropout, whose draws would differ between the two runs
    model.requires_grad_(True)
    batch = (collate(examples(), pad_id=0, padding_free=True) if layout == "padding-free"
             else collate(pack(Dataset(examples()), 20).examples, pad_id=0))  # 2 rows, padding a block of its own
    reference, ref_grads = loss_and_grads(model, batch, False, monkeypatch)
    seen = calls(monkeypatch)
    value, grads = loss_and_grads(model, batch, True, monkeypatch)
    assert value == pytest.approx(reference, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():  # rounding: within 1e-5 of each gradient's largest element
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-5 * ref_grads[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert model.config._attn_implementation != NAME  # switched back after the forward
    segmented = [n for n, causal, masked in seen if causal and not masked]
    if model_type in MODEL_TYPES:  # one SDPA per example (and per padding block) and layer
        assert len(segmented) == 2 * sum(len(segments(row)) for row in batch["position_ids"])
    else:  # eager families (Gemma 2, gpt-oss) and Falcon, which calls SDPA itself: transformers' path
        assert segmented == []


def calls(monkeypatch):
    """Every F.scaled_dot_product_attention call's (query length, causal, masked)."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
        seen.append((query.shape[2], is_causal, attn_mask is not None))
        return sdpa(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_one_causal_unmasked_sdpa_per_segment_and_layer(monkeypatch):
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    batch = collate(examples(), pad_id=0, padding_free=True)
    seen = calls(monkeypatch)
    with torch.no_grad():
        SummedLoss(model)(**batch)
    assert seen == [(n, True, False) for _layer in range(2) for n in LENGTHS]
    seen.clear()
    with torch.no_grad():  # an ordinary padded batch: sdpa as transformers runs it, the whole row
        SummedLoss(model)(**collate(examples(), pad_id=0))
    assert [n for n, _, _ in seen] == [max(LENGTHS)] * 2


def test_a_sliding_window_shorter_than_a_segment_keeps_the_mask(monkeypatch):
    model = tiny_model("mistral")
    model.requires_grad_(True)
    model.config.sliding_window = 4  # shorter than the 9- and 14-token examples
    batch = collate(examples(), pad_id=0, padding_free=True)
    seen = calls(monkeypatch)
    value, grads = loss_and_grads(model, batch, True, monkeypatch)
    assert seen and all(masked and n == sum(LENGTHS) for n, _, masked in seen)
    reference, ref_grads = loss_and_grads(model, batch, False, monkeypatch)
    assert value == pytest.approx(reference, rel=1e-6)


def test_the_block_mask_is_built_only_where_a_layer_reads_it(monkeypatch):
    """transformers derives a (row, row) block mask from the restarts (1 GiB of bools for a row of
    32k tokens); segment attention reads none, so it is built only for a layer that falls back to
    sdpa (here: a sliding window shorter than a segment), once per forward, and equal to sdpa_mask's."""
    from transformers import masking_utils

    built, sdpa_mask = [], masking_utils.sdpa_mask

    def spy(**kwargs):
        mask = sdpa_mask(**kwargs)
        built.append(mask)
        return mask

    monkeypatch.setattr(masking_utils, "sdpa_mask", spy)
    batch = collate(examples(), pad_id=0, padding_free=True)
    with torch.no_grad():
        SummedLoss(tiny_model("llama"))(**batch)
    assert built == []
    model = tiny_model("mistral")
    model.config.sliding_window = 4
    with torch.no_grad():
        SummedLoss(model)(**batch)
    n = sum(LENGTHS)
    assert len(built) == 1 and built[0].shape == (1, 1, n, n)
    restart = torch.tensor([0, 9, 12, 26])  # the examples' starts in the row
    example = torch.bucketize(torch.arange(n), restart, right=True)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    expected = (example[:, None] == example[None, :]) & (j <= i) & (i - j < 4)  # same example, causal, window
    assert torch.equal(built[0][0, 0], expected)


def test_gradient_checkpointing_keeps_transformers_path(monkeypatch):
    model = tiny_model("llama").train()
    model.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = collate(examples(), pad_id=0, padding_free=True)
    seen = calls(monkeypatch)
    value, grads = loss_and_grads(model, batch, True, monkeypatch)  # recomputed in backward: no error
    assert seen and all(masked for _, _, masked in seen)
    model.gradient_checkpointing_disable()
    reference, _ = loss_and_grads(model, batch, True, monkeypatch)
    assert value == pytest.approx(reference, rel=1e-5)


def test_the_implementation_is_restored_when_the_forward_fails():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"), segment_attention(model):
        assert model.config._attn_implementation == NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS[NAME] is attention.segment_sdpa  # registered with transformers
