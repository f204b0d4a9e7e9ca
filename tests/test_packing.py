"""Exact packing: a packed row's loss is the sum of its examples' losses unpacked, token for token.
Padding-free batches (collate's padding_free, data.padding_free) are a batch joined into one such row.

data.pack puts whole examples into rows, collate gives the rows position ids that restart with each
example, and loss.SummedLoss lets the model derive the block-diagonal causal mask from them. Checked
on the tiny Llama (RoPE) and GPT-2 (learned positions): per-token losses and gradients at 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama

from lorakit.data import IGNORE, Dataset, Example, collate, pack
from lorakit.loss import SummedLoss, supervised_tokens

# length mixes: short and long together, singletons, equal lengths, many small, a row filled exactly
MIXES = [(5, 9, 3, 12, 7), (1, 2, 30), (16, 16), (4,) * 8, (20, 1, 1, 10)]
ROW = 32


def dataset(lengths, seed=0, prompt=2):
    """Random token ids, the first `prompt` tokens of each example without loss."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * min(prompt, n) + ids[prompt:], source=f"e{i}", full_length=n))
    return Dataset(examples, format="prompt_completion", max_length=ROW)


def per_token_losses(model, batch):
    """(B, T-1): the cross-entropy of predicting token t + 1 at position t (0 where ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        inputs = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"], "use_cache": False}
    logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["labels"][:, 1:], ignore_index=IGNORE,
                           reduction="none")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("lengths", MIXES, ids=lambda m: "-".join(map(str, m)))
def test_packed_rows_give_each_example_its_unpacked_per_token_losses(make, lengths):
    model = make()
    data = dataset(lengths)
    packed = pack(data, ROW)
    assert sorted(n for row in packed.examples for n in row.lengths) == sorted(lengths)  # none split, none lost
    assert all(len(row.input_ids) <= ROW for row in packed.examples)
    with torch.no_grad():
        rows = per_token_losses(model, collate(packed.examples, pad_id=0))  # (rows, T-1), padded
        by_source = {e.source: e for e in data.examples}
        compared = 0
        for r, row in enumerate(packed.examples):
            start = 0
            for source, n in zip(row.source.removeprefix("packed: ").split(", "), row.lengths):
                alone = per_token_losses(model, collate([by_source[source]], pad_id=0))[0]  # (n-1,)
                torch.testing.assert_close(rows[r, start:start + n - 1], alone, rtol=1e-5, atol=1e-5)
                compared += n - 1
                start += n
    assert compared == sum(n - 1 for n in lengths)


@pytest.mark.parametrize("lengths", MIXES, ids=lambda m: "-".join(map(str, m)))
def test_packed_batch_loss_and_gradients_equal_the_unpacked_examples(lengths):
    """SummedLoss over a padded batch of packed rows == the sum over the examples one at a time,
    value and every parameter's gradient (the chunked loss path)."""
    model = tiny_llama()
    model.requires_grad_(True)
    data = dataset(lengths, seed=1)
    summed = SummedLoss(model)
    assert summed.chunked

    loss = summed(**collate(pack(data, ROW).examples, pad_id=0))
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = sum(summed(**collate([e], pad_id=0)) for e in data.examples)
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_concatenation_without_the_mask_is_not_exact():
    """The check above can fail: the same rows with plain causal attention (no position ids) differ."""
    model = tiny_llama()
    packed = collate(pack(dataset((5, 9, 3, 12, 7)), ROW).examples, pad_id=0)
    with torch.no_grad():
        exact = per_token_losses(model, packed)
        naive = per_token_losses(model, {k: v for k, v in packed.items() if k != "position_ids"})
    assert (exact - naive).abs().max() > 1e-3


def test_an_example_longer_than_a_row_is_cut_and_counted():
    data = dataset((40, 10, 5))
    packed = pack(data, ROW)
    assert packed.truncated == 1
    assert sorted(n for row in packed.examples for n in row.lengths) == [5, 10, ROW]
    assert packed.supervised_tokens == (ROW - 2) + (10 - 2) + (5 - 2)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("lengths", MIXES, ids=lambda m: "-".join(map(str, m)))
def test_a_padding_free_batch_is_the_padded_batch_without_its_padding(make, lengths):
    """collate(padding_free=True): one row of the batch's tokens, the padded batch's supervised
    tokens, loss and every gradient (1e-5); packed rows joined keep their members' boundaries."""
    model = make()
    model.requires_grad_(True)
    examples = dataset(lengths, seed=2).examples
    summed = SummedLoss(model)

    padded, flat = collate(examples, pad_id=0), collate(examples, pad_id=0, padding_free=True)
    assert flat["input_ids"].shape == (1, sum(lengths)) and int(flat["attention_mask"].sum()) == sum(lengths)
    assert flat["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert supervised_tokens(flat) == supervised_tokens(padded) == sum(max(0, n - 2) for n in lengths)
    grads = []
    for batch in (padded, flat):
        model.zero_grad()
        loss = summed(**batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-5, atol=1e-5, msg=name)

    rows = pack(dataset(lengths, seed=2), ROW).examples
    joined = collate(rows, pad_id=0, padding_free=True)
    assert joined["position_ids"][0].tolist() == [p for row in rows for n in row.lengths for p in range(n)]
    assert supervised_tokens(joined) == supervised_tokens(collate(rows, pad_id=0))
