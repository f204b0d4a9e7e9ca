"""Evaluation: the held-out loss."""

import pytest
from conftest import char_tokenizer, tiny_llama

from lorakit.data import Record, build_dataset
from lorakit.training.evaluate import heldout_loss


def test_heldout_loss_without_a_token_to_score_is_an_error():
    tok = char_tokenizer()
    rows = [Record({"prompt": "<abcdef>=", "completion": "fedcba"}, "mem:0")]
    dataset = build_dataset(rows, tok, max_length=5)  # the answer is truncated away
    assert dataset.supervised_tokens == 0
    with pytest.raises(ValueError, match="none of the 1 held-out examples has a token to score"):
        heldout_loss(tiny_llama(vocab=len(tok)), dataset, 0, 8)
