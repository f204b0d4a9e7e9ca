"""Rank 0's output: the before/after table."""

import math

from lorakit.training.output import before_after_table


def test_before_after_table_keeps_columns_apart():
    table = before_after_table({"val_loss": 2.8, "val_ppl": 16.44}, {"val_loss": 28.1, "val_ppl": math.exp(50)})
    assert table.splitlines() == [
        "                         before       after",
        "held-out loss            2.8000     28.1000",
        "held-out perplexity       16.44   5.185e+21",
    ]
