"""data.group_by_length: batches of examples of similar length (data.grouped_batches), a pure
function of the step like the ungrouped batches; less padding, the same examples each epoch."""

import json
import sys

import pytest
import torch
from conftest import char_tokenizer

from lorakit.config import ConfigError, RunConfig
from lorakit.data import MEGABATCH, PROGRESS_MIN, Dataset, Example, batch_at, epoch_order, grouped_batches, progress
from lorakit.training.setup import load_data


def dataset(lengths, grouped=True):
    """One example per length, token ids all 7, source "e<i>"."""
    examples = [Example([7] * n, [7] * n, source=f"e{i}") for i, n in enumerate(lengths)]
    return Dataset(examples, format="text", group_by_length=grouped)


def padded_tokens(ds, batch_size, seed=0):
    """Tokens of one epoch's batches as collate pads them: batch_size x the longest, per batch."""
    per_epoch = len(ds.examples) // batch_size
    return sum(batch_size * max(len(e.input_ids) for e in batch_at(ds, s, batch_size, seed)) for s in range(per_epoch))


def test_one_megabatch_sorts_the_epoch_so_padding_is_minimal():
    # 16 examples of lengths 1..16, batch 4: the epoch fits in one megabatch, so the batches are
    # the lengths 16-13, 12-9, 8-5, 4-1 (in a shuffled order): 4 x (16 + 12 + 8 + 4) = 160 tokens
    # for 136 real ones, 24 of padding (15%)
    lengths = list(range(1, 17))
    grouped, plain = dataset(lengths), dataset(lengths, grouped=False)
    assert sum(lengths) == 136
    assert padded_tokens(grouped, 4) == 160
    assert padded_tokens(plain, 4) == 228  # epoch_order(16, 0, 0) mixes them: 92 of padding (40%)
    batches = [sorted(len(e.input_ids) for e in batch_at(grouped, s, 4, 0)) for s in range(4)]
    assert sorted(batches) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert batches != sorted(batches, reverse=True)  # the batch order is shuffled, not longest first


def test_megabatches_group_within_shuffled_chunks():
    # batch 2, 250 examples: 125 batches; megabatches of 100 examples (50 batches) then 50
    batch, n = 2, 250
    lengths = [(i * 37) % 61 + 1 for i in range(n)]
    ds = dataset(lengths)
    order = epoch_order(n, 3, 0)
    megas = [set(order[0:100]), set(order[100:200]), set(order[200:250])]
    assert MEGABATCH * batch == 100
    counts = [0, 0, 0]
    for step in range(n // batch):
        members = [int(e.source[1:]) for e in batch_at(ds, step, batch, seed=3)]
        home = [k for k, m in enumerate(megas) if set(members) <= m]
        assert len(home) == 1, f"batch {step} spans megabatches"  # never across a chunk
        counts[home[0]] += 1
    assert counts == [50, 50, 25]
    # within a megabatch the batches are consecutive in length: sorting its lengths and cutting them
    # in pairs gives the padded tokens
    expected = sum(batch * max(pair) for m in megas for s in [sorted((lengths[i] for i in m), reverse=True)]
                   for pair in zip(s[::2], s[1::2]))
    assert padded_tokens(ds, batch, seed=3) == expected == 7790
    assert padded_tokens(dataset(lengths, grouped=False), batch, seed=3) == 10408
    assert sum(lengths) == 7698  # padding: 92 tokens grouped (1.2%), 2710 ungrouped (26%)


def test_every_example_once_an_epoch_and_the_step_alone_decides_the_batch():
    lengths = [(i * 13) % 29 + 1 for i in range(103)]  # 103 = 25 batches of 4 and 3 left over
    ds = dataset(lengths)
    for epoch in range(3):
        grouped = [e.source for s in range(epoch * 25, (epoch + 1) * 25) for e in batch_at(ds, s, 4, seed=5)]
        # the same 100 examples the ungrouped epoch uses (its last 3 are dropped), each exactly once
        assert sorted(grouped) == sorted(f"e{i}" for i in epoch_order(103, 5, epoch)[:100])
        assert len(set(grouped)) == 100
    calls = [[e.source for e in batch_at(ds, 37, 4, seed=5)] for _ in range(3)]
    assert calls[0] == calls[1] == calls[2]  # a resumed run at step 37 sees this batch
    assert grouped_batches(lengths, 4, 5, 1) == grouped_batches(list(lengths), 4, 5, 1)
    assert grouped_batches(lengths, 4, 5, 1) != grouped_batches(lengths, 4, 5, 2)  # a new shuffle each epoch
    assert grouped_batches(lengths, 4, 5, 1) != grouped_batches(lengths, 4, 6, 1)


def test_off_by_default_and_the_ungrouped_batches_are_unchanged():
    assert RunConfig.from_dict({}).data.group_by_length is False
    ds = dataset(range(1, 11), grouped=False)
    order = epoch_order(10, 7, 0)
    assert [e.source for s in range(3) for e in batch_at(ds, s, 3, seed=7)] == [f"e{i}" for i in order[:9]]


def test_refused_with_packing():
    with pytest.raises(ConfigError, match=r"data.group_by_length=true with data.packing=true: .* choose one"):
        RunConfig.from_dict({}, ["data.packing=true", "data.group_by_length=true"])


def test_load_data_marks_the_training_data(tmp_path):
    rows = [{"prompt": f"Q{i}?" + "x" * (i % 9), "completion": f"A{i}"} for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = RunConfig.from_dict({}, [f"data.train={path}", "data.validation_fraction=0",
                                      "data.group_by_length=true"])
    train, _, _ = load_data(config, char_tokenizer(), log=lambda _: None)
    assert train.group_by_length and len(train.examples) == 40
    batch = batch_at(train, 0, 8, config.train.seed)
    assert max(len(e.input_ids) for e in batch) - min(len(e.input_ids) for e in batch) <= 2


def test_progress_bar_only_for_many_records_on_a_terminal_at_rank_0(monkeypatch):
    few, many = list(range(PROGRESS_MIN)), list(range(PROGRESS_MIN + 1))
    assert progress(many, "tokenizing") is many  # pytest's stderr is not a terminal: no bar in tests
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress(few, "tokenizing") is few
    monkeypatch.setenv("RANK", "1")
    assert progress(many, "tokenizing") is many
    monkeypatch.setenv("RANK", "0")
    bar = progress(many, "tokenizing")
    assert bar is not many and bar.total == PROGRESS_MIN + 1
    bar.close()
